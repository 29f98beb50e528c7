"""The engine as users run it, plus app code that broadcasts: the engine's benchmark target.

`python -m bench.servers.engine_app --manifests DIR [--loop uvloop|asyncio]`, with
MONGODB_URI and MDB_REALTIME_DB in the environment. It prints its URL like `mdb-realtime serve`.
POST /_bench/broadcast?count=M&size=S&interval=I calls `broadcast_to_app` M times.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from bench.servers.common import BROADCAST_PATH, COUNT_PATH, SLUG, BroadcastRequest, run
from bench.servers.common import run_broadcasts as paced
from engine import MongoDBEngine, broadcast_to_app, get_websocket_manager
from engine.cli import serve_app
from engine.settings import EngineSettings


def build(manifests: Path) -> FastAPI:
    engine = MongoDBEngine(os.environ["MONGODB_URI"], os.environ["MDB_REALTIME_DB"])
    app = engine.create_app(manifests)
    add_bench_routes(app)
    return app


def add_bench_routes(app: FastAPI) -> None:
    """POST BROADCAST_PATH (`broadcast_to_app` M times, paced) and GET COUNT_PATH."""

    async def send(message: dict[str, Any]) -> int:
        return await broadcast_to_app(SLUG, message)

    @app.post(BROADCAST_PATH)
    async def broadcast(request: Request) -> dict[str, Any]:
        return await paced(BroadcastRequest.from_query(request.url.query), send)

    @app.get(COUNT_PATH)
    async def count() -> dict[str, int]:
        return {"connections": (await get_websocket_manager(SLUG)).get_connection_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifests", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    app = build(args.manifests)
    settings = EngineSettings.from_env()
    run(serve_app(app, args.host, args.port, "websockets-sansio", settings, 1), args.loop)


if __name__ == "__main__":
    main()
