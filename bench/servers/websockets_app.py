"""The `websockets` library's own server, broadcasting with `websockets.asyncio.server.broadcast`.

`python -m bench.servers.websockets_app [--loop uvloop|asyncio]`. The library answers plain HTTP
only to GET, so here the broadcast route is GET /_bench/broadcast?count=M&size=S&interval=I.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request, Response

from bench.servers.common import (
    BROADCAST_PATH,
    COUNT_PATH,
    WS_PATH,
    BroadcastRequest,
    announce,
    run,
    run_broadcasts,
    stamp,
)

CLIENTS: set[ServerConnection] = set()


async def handler(websocket: ServerConnection) -> None:
    # The broadcast pattern of the library's documentation: register, wait for the close.
    if websocket.request is None or websocket.request.path != WS_PATH:
        await websocket.close(1008, "unknown path")
        return
    CLIENTS.add(websocket)
    try:
        await websocket.wait_closed()
    finally:
        CLIENTS.discard(websocket)


async def send(message: dict[str, Any]) -> int:
    clients = list(CLIENTS)
    broadcast(clients, json.dumps(stamp(message), separators=(",", ":")))
    return len(clients)


async def process_request(connection: ServerConnection, request: Request) -> Response | None:
    path, _, query = request.path.partition("?")
    if path == BROADCAST_PATH:
        result = await run_broadcasts(BroadcastRequest.from_query(query), send)
        return connection.respond(200, json.dumps(result) + "\n")
    if path == COUNT_PATH:
        return connection.respond(200, json.dumps({"connections": len(CLIENTS)}) + "\n")
    return None


async def main(host: str, port: int) -> None:
    # open_timeout=None: the broadcast route runs inside the opening handshake and a paced run
    # outlasts the default 10 s; it changes nothing for WebSocket clients that handshake at once.
    async with serve(handler, host, port, process_request=process_request, open_timeout=None) as s:
        announce(host, next(iter(s.sockets)).getsockname()[1])
        await s.serve_forever()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    run(main(args.host, args.port), args.loop)


if __name__ == "__main__":
    cli()
