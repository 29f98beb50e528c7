"""A user's own FastAPI app that mounts the engine the mdb-engine way, run by plain uvicorn.

Two apps, one per way of mounting, each with a route and a middleware of its own:

- `routes_app`: `engine.register_websocket_routes(app, "bench")` in the app's lifespan;
- `endpoint_app`: `app.add_api_websocket_route("/bench/ws", create_websocket_endpoint(...))`.

`python -m uvicorn bench.servers.user_app:routes_app --port 0 [--ws ...]`, with MONGODB_URI and
MDB_REALTIME_DB in the environment, exactly as a user starts an app: uvicorn's defaults
(its default WebSocket implementation, uvloop where installed, its access log).
POST /_bench/broadcast?count=M&size=S&interval=I calls `broadcast_to_app` M times.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response

from bench.servers.common import SLUG, WS_PATH
from bench.servers.engine_app import add_bench_routes
from engine import (
    MongoDBEngine,
    create_websocket_endpoint,
)

BENCH_MANIFEST = Path(__file__).resolve().parent.parent / "manifests" / "bench" / "manifest.json"


def _user_app(lifespan: Callable[[FastAPI], Any]) -> FastAPI:
    """What the user's app has besides the engine: a route, a middleware, app code."""
    app = FastAPI(lifespan=lifespan)

    @app.middleware("http")
    async def served_by(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        response: Response = await call_next(request)
        response.headers["x-served-by"] = "user-app"
        return response

    @app.get("/items")
    async def items() -> list[dict[str, Any]]:
        return [{"id": 1}]

    add_bench_routes(app)
    return app


def _engine_lifespan(
    engine: MongoDBEngine, mount: Callable[[FastAPI], None] | None
) -> Callable[[FastAPI], Any]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.initialize()
        manifest = await engine.load_manifest(BENCH_MANIFEST)
        await engine.register_app(manifest)
        if mount is not None:
            mount(app)
        try:
            yield
        finally:
            await engine.shutdown()

    return lifespan


@functools.cache  # one engine per process: uvicorn may look the app up more than once
def build_routes_app() -> FastAPI:
    engine = MongoDBEngine()
    return _user_app(
        _engine_lifespan(engine, lambda app: engine.register_websocket_routes(app, SLUG))
    )


@functools.cache
def build_endpoint_app() -> FastAPI:
    engine = MongoDBEngine()
    app = _user_app(_engine_lifespan(engine, None))
    endpoint = create_websocket_endpoint(SLUG, WS_PATH, "realtime", require_auth=False)
    app.add_api_websocket_route(WS_PATH, endpoint)
    return app


def __getattr__(name: str) -> FastAPI:
    # Built when uvicorn asks for it, so importing one never starts an engine for the other.
    if name == "routes_app":
        return build_routes_app()
    if name == "endpoint_app":
        return build_endpoint_app()
    raise AttributeError(name)
