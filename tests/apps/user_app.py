"""A user's own FastAPI app that mounts the engine the way mdb-engine's docs show, both ways.

Run by plain uvicorn, as users run their apps: `python -m uvicorn tests.apps.user_app:app`
(with MONGODB_URI, MDB_REALTIME_DB and TEST_MANIFEST, a manifest file, in the environment).
It has routes and middleware of its own; the manifest's app is mounted with
`engine.register_websocket_routes`, and
`/custom/ws` of app `beta` with `app.add_api_websocket_route(path, create_websocket_endpoint(...))`.
Test-only routes report what the engine's connections write through.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from engine import (
    MongoDBEngine,
    broadcast_to_app,
    create_websocket_endpoint,
    get_websocket_manager,
)
from engine.server_protocols import find_server_protocol, implementation_of

CUSTOM_PATH = "/custom/ws"


class TracingMiddleware:
    """Pure ASGI middleware that wraps both `receive` and `send`, as tracing tools do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def traced_receive() -> Message:
            return await receive()

        async def traced_send(message: Message) -> None:
            self.sent += 1
            await send(message)

        await self.app(scope, traced_receive, traced_send)


class _Channel:
    """A callable object standing in for `receive` or `send`: nothing leads back to the server."""

    def __init__(self, inner: Any) -> None:
        self._call = inner

    async def __call__(self, *args: Any) -> Any:
        return await self._call(*args)


class OpaqueMiddleware:
    """Hides the server's protocol from the app, as a server unknown to the engine would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, _Channel(receive), _Channel(send))


async def echo(websocket: WebSocket, message: dict[str, Any]) -> None:
    manager = await get_websocket_manager("beta")
    await manager.send_to_connection(websocket, {"type": "echo", "received": message})


engine = MongoDBEngine()  # MONGODB_URI and MDB_REALTIME_DB from the environment


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # In the order of mdb-engine's docs: routes are added once the engine is up.
    await engine.initialize()
    manifest = await engine.load_manifest(Path(os.environ["TEST_MANIFEST"]))
    await engine.register_app(manifest)
    engine.register_websocket_routes(app, manifest["slug"])
    try:
        yield
    finally:
        await engine.shutdown()


app = FastAPI(lifespan=lifespan)
app.add_middleware(TracingMiddleware)
if os.environ.get("TEST_OPAQUE_MIDDLEWARE"):
    app.add_middleware(OpaqueMiddleware)


@app.middleware("http")
async def server_header(request: Request, call_next: Any) -> Response:
    response: Response = await call_next(request)
    response.headers["x-user-app"] = "yes"
    return response


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


app.add_api_websocket_route(
    CUSTOM_PATH,
    create_websocket_endpoint("beta", CUSTOM_PATH, "realtime", handler=echo, require_auth=False),
)


@app.get("/_test/connections/{slug}")
async def connections(slug: str) -> dict[str, Any]:
    """How each connection of an app writes: its sink and its server's implementation."""
    manager = await get_websocket_manager(slug)
    return {
        "count": manager.get_connection_count(),
        "sinks": sorted({type(c.sink).__name__ for c in manager.active_connections}),
        "implementations": sorted(
            {
                getattr(implementation_of(find_server_protocol(c.websocket)), "value", "none")
                for c in manager.active_connections
            }
        ),
    }


@app.post("/_test/broadcast/{slug}")
async def broadcast(slug: str, body: dict[str, Any]) -> dict[str, int]:
    return {"reached": await broadcast_to_app(slug, body)}
