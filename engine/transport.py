"""Access to the server transport, to abort sockets whose peer stopped reading.

A close frame cannot reach a client that stopped reading: the server's buffer never drains,
so a graceful close never finishes and the socket would linger. This middleware exposes the
transport's `abort` in the scope (where the server's `send` is a bound method of a protocol
with a transport, as uvicorn's are) so such sockets can be cut after a grace period.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

ABORT_SCOPE_KEY = "mdb_realtime.abort"
PROTOCOL_SCOPE_KEY = "mdb_realtime.protocol"


class TransportAbortMiddleware:
    """Puts the server transport in WebSocket scopes and, for the engine's own endpoints,
    calls them directly: an idle connection then holds a short chain of coroutine frames
    instead of the whole routing stack (memory per connection)."""

    def __init__(
        self,
        app: ASGIApp,
        websocket_routes: Mapping[str, Callable[[WebSocket], Awaitable[None]]] | None = None,
    ) -> None:
        self.app = app
        self.websocket_routes = websocket_routes if websocket_routes is not None else {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            abort = _transport_abort(send)
            if abort is not None:
                scope[ABORT_SCOPE_KEY] = abort
                scope[PROTOCOL_SCOPE_KEY] = send.__self__  # type: ignore[attr-defined]
            endpoint = self.websocket_routes.get(scope["path"])
            if endpoint is not None:
                await endpoint(WebSocket(scope, receive, send))
                return
        await self.app(scope, receive, send)


def _transport_abort(send: Send) -> Callable[[], None] | None:
    transport: Any = getattr(getattr(send, "__self__", None), "transport", None)
    abort = getattr(transport, "abort", None)
    return abort if callable(abort) else None


def scope_protocol(scope: Scope) -> Any:
    """The server's protocol object of this connection, where the middleware found one."""
    return scope.get(PROTOCOL_SCOPE_KEY)


def scope_abort(scope: Scope) -> Callable[[], None] | None:
    abort = scope.get(ABORT_SCOPE_KEY)
    return abort if callable(abort) else None


def outermost(app: Any) -> Any:
    """The app wrapped so that the engine's WebSocket routes are dispatched before anything
    else (the FastAPI stack stays for everything but the engine's own sockets)."""
    engine = getattr(getattr(app, "state", None), "engine", None)
    routes = getattr(engine, "websocket_routes", None)
    if routes is None:
        return app
    return TransportAbortMiddleware(app, websocket_routes=routes)
