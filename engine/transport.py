"""Access to the server transport, to abort sockets whose peer stopped reading.

A close frame cannot reach a client that stopped reading: the server's buffer never drains,
so a graceful close never finishes and the socket would linger. This middleware exposes the
transport's `abort` in the scope (where the server's `send` is a bound method of a protocol
with a transport, as uvicorn's are) so such sockets can be cut after a grace period.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

ABORT_SCOPE_KEY = "mdb_realtime.abort"
PROTOCOL_SCOPE_KEY = "mdb_realtime.protocol"


class TransportAbortMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            abort = _transport_abort(send)
            if abort is not None:
                scope[ABORT_SCOPE_KEY] = abort
                scope[PROTOCOL_SCOPE_KEY] = send.__self__  # type: ignore[attr-defined]
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
