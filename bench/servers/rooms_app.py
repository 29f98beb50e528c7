"""The engine with rooms, plus app code that broadcasts to a room or to the whole app.

`python -m bench.servers.rooms_app --manifests DIR`, with MONGODB_URI and MDB_REALTIME_DB in
the environment. It prints its URL like `mdb-realtime serve`.
POST /_bench/broadcast?count=M&size=S calls `broadcast_to_app` M times;
POST /_bench/room_broadcast?room=R&count=M&size=S calls `broadcast_to_room` M times.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request

from bench.servers.common import SLUG, BroadcastRequest, run
from bench.servers.common import run_broadcasts as paced
from bench.servers.engine_app import add_bench_routes
from engine import MongoDBEngine, broadcast_to_room
from engine.cli import serve_app
from engine.settings import EngineSettings

ROOM_BROADCAST_PATH = "/_bench/room_broadcast"


def build(manifests: Path) -> FastAPI:
    engine = MongoDBEngine(os.environ["MONGODB_URI"], os.environ["MDB_REALTIME_DB"])
    app = engine.create_app(manifests)
    add_bench_routes(app)

    @app.post(ROOM_BROADCAST_PATH)
    async def room_broadcast(request: Request) -> dict[str, Any]:
        room = parse_qs(request.url.query)["room"][-1]

        async def to_room(message: dict[str, Any]) -> int:
            await broadcast_to_room(SLUG, room, message)
            return 0

        return await paced(BroadcastRequest.from_query(request.url.query), to_room)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifests", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = build(args.manifests)
    settings = EngineSettings.from_env()
    run(serve_app(app, args.host, args.port, "websockets-sansio", settings, 1), "uvloop")


if __name__ == "__main__":
    main()
