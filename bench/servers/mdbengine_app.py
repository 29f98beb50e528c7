"""mdb-engine 0.1.6's WebSocket layer: its endpoint and its own `broadcast_to_app`.

Runs in a virtualenv that has `mdb-engine==0.1.6` (see bench/README.md), not in the engine's:
`python -m bench.servers.mdbengine_app [--loop uvloop|asyncio]`. The endpoint is mounted the way
mdb-engine's `register_websocket_routes` mounts it (an APIRouter route made by
`create_websocket_endpoint`), without authentication.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from mdb_engine.routing.websockets import (
    broadcast_to_app,
    create_websocket_endpoint,
    get_websocket_manager_sync,
)

from bench.servers.common import (
    BROADCAST_PATH,
    COUNT_PATH,
    SLUG,
    WS_PATH,
    BroadcastRequest,
    run,
    run_broadcasts,
    serve_uvicorn,
)


def build() -> FastAPI:
    app = FastAPI()
    router = APIRouter()
    endpoint = create_websocket_endpoint(
        app_slug=SLUG, path=WS_PATH, endpoint_name="realtime", require_auth=False
    )
    router.websocket(WS_PATH)(endpoint)
    app.include_router(router)

    async def send(message: dict[str, Any]) -> int:
        # mdb-engine adds app_slug and timestamp itself.
        return await broadcast_to_app(SLUG, message)

    @app.post(BROADCAST_PATH)
    async def broadcast(request: Request) -> dict[str, Any]:
        return await run_broadcasts(BroadcastRequest.from_query(request.url.query), send)

    @app.get(COUNT_PATH)
    async def count() -> dict[str, int]:
        return {"connections": get_websocket_manager_sync(SLUG).get_connection_count()}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    run(serve_uvicorn(build(), args.host, args.port), args.loop)


if __name__ == "__main__":
    main()
