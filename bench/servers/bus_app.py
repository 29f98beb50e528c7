"""An engine process of the bus benchmark (bench/bus_cost.py): run two or more on one database.

`python -m bench.servers.bus_app --manifests DIR [--loop asyncio|uvloop]`, with MONGODB_URI and
MDB_REALTIME_DB in the environment; prints its URL like `mdb-realtime serve`.

- POST /_bench/broadcast?count=M&size=S&interval=I&bus=1: M broadcasts from app code.
  `bus=1` calls `broadcast_to_app` (this process's clients at once, the others through the
  bus); `bus=0` delivers to this process's clients only, as a lone process would.
- GET /_bench/count: connections of the bench app on this process.
- GET /_bench/bus: broadcasts this process has published to the bus so far.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from bench.servers.common import BROADCAST_PATH, COUNT_PATH, SLUG, BroadcastRequest, run
from bench.servers.common import run_broadcasts as paced
from engine import MongoDBEngine
from engine.cli import serve_app
from engine.settings import EngineSettings

BUS_PATH = "/_bench/bus"


def build(manifests: Path) -> FastAPI:
    engine = MongoDBEngine(os.environ["MONGODB_URI"], os.environ["MDB_REALTIME_DB"])
    app = engine.create_app(manifests)

    async def with_bus(message: dict[str, Any]) -> int:
        return await engine.broadcast_to_app(SLUG, message)

    async def local_only(message: dict[str, Any]) -> int:
        return engine.realtime.broadcast_local(SLUG, message)

    @app.post(BROADCAST_PATH)
    async def broadcast(request: Request, bus: int = 1) -> dict[str, Any]:
        send = with_bus if bus else local_only
        return await paced(BroadcastRequest.from_query(request.url.query), send)

    @app.get(COUNT_PATH)
    async def count() -> dict[str, int]:
        return {"connections": engine.get_websocket_manager(SLUG).get_connection_count()}

    @app.get(BUS_PATH)
    async def bus() -> dict[str, int]:
        published = engine.bus.published if engine.bus is not None else 0
        return {"published": published}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifests", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="asyncio")
    args = parser.parse_args()
    app = build(args.manifests)
    settings = EngineSettings.from_env()
    run(serve_app(app, args.host, args.port, "websockets-sansio", settings, 1), args.loop)


if __name__ == "__main__":
    main()
