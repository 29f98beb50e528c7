"""The naive FastAPI pattern: a list of sockets and `await ws.send_text(...)` in a loop.

This is the ConnectionManager of FastAPI's WebSocket tutorial, under uvicorn's defaults.
`python -m bench.servers.naive_app [--loop uvloop|asyncio]`.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

from bench.servers.common import (
    BROADCAST_PATH,
    COUNT_PATH,
    WS_PATH,
    BroadcastRequest,
    run,
    run_broadcasts,
    serve_uvicorn,
    stamp,
)


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        if websocket in self.active_connections:
            self.active_connections.remove(websocket)

    async def broadcast(self, message: str) -> int:
        sent = 0
        for connection in list(self.active_connections):
            try:
                await connection.send_text(message)
                sent += 1
            except Exception:  # a client that went away mid-broadcast: skip it
                self.disconnect(connection)
        return sent


def build() -> FastAPI:
    app = FastAPI()
    manager = ConnectionManager()

    @app.websocket(WS_PATH)
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await manager.connect(websocket)
        try:
            while True:
                await websocket.receive_text()
        except WebSocketDisconnect:
            pass
        finally:
            manager.disconnect(websocket)

    async def send(message: dict[str, Any]) -> int:
        return await manager.broadcast(json.dumps(stamp(message), separators=(",", ":")))

    @app.post(BROADCAST_PATH)
    async def broadcast(request: Request) -> dict[str, Any]:
        return await run_broadcasts(BroadcastRequest.from_query(request.url.query), send)

    @app.get(COUNT_PATH)
    async def count() -> dict[str, int]:
        return {"connections": len(manager.active_connections)}

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
