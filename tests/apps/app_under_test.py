"""An app as users write it: engine, manifests, handlers, app code that broadcasts.

Run as `python -m tests.apps.app_under_test`; prints its URL like `mdb-realtime serve`.
Test-only HTTP routes let tests trigger app code (broadcasts) inside the server process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.websockets import WebSocket

from engine import (
    MongoDBEngine,
    WebSocketConnection,
    broadcast_to_app,
    broadcast_to_room,
    create_websocket_endpoint,
    get_presence,
    get_websocket_manager,
    register_message_handler,
)
from engine.cli import serve_app
from engine.settings import EngineSettings
from engine.transport import scope_protocol


# Registered before any engine exists, as mdb-engine apps often do at import time.
async def echo(websocket: WebSocket, message: dict[str, Any]) -> None:
    if message["type"] == "explode":
        raise RuntimeError("handler failure on purpose")
    manager = await get_websocket_manager("alpha")
    await manager.send_to_connection(websocket, {"type": "echo", "received": message})


register_message_handler("alpha", "realtime", echo)


async def whoami(
    websocket: WebSocket, message: dict[str, Any], connection: WebSocketConnection
) -> None:
    manager = await get_websocket_manager("alpha")
    await manager.send_to_connection(
        websocket,
        {"type": "you_are", "user_id": connection.user_id, "endpoint": connection.endpoint},
    )


def build() -> FastAPI:
    engine = MongoDBEngine(os.environ["MONGODB_URI"], os.environ["MDB_REALTIME_DB"])
    app = engine.create_app(Path(os.environ["TEST_MANIFESTS"]))
    # Registered after the routes: handlers are looked up per message.
    register_message_handler("alpha", "events", whoami)

    # mdb-engine's own way of mounting an endpoint, beside the manifest's.
    app.router.add_websocket_route(
        "/_test/compat", create_websocket_endpoint("alpha", "/_test/compat", "compat")
    )

    @app.post("/_test/broadcast")
    async def broadcast(body: dict[str, Any]) -> dict[str, int]:
        reached = await broadcast_to_app(body["slug"], body["message"], body.get("user_id"))
        return {"reached": reached}

    @app.post("/_test/broadcast_bson/{slug}")
    async def broadcast_bson(slug: str) -> dict[str, int]:
        import datetime as dt

        from bson import Decimal128, ObjectId

        message = {
            "type": "bson",
            "oid": ObjectId("0123456789abcdef01234567"),
            "when": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
            "amount": Decimal128("12.50"),
        }
        return {"reached": await broadcast_to_app(slug, message)}

    @app.post("/_test/flood/{slug}")
    async def flood(slug: str, body: dict[str, int]) -> dict[str, int]:
        """`count` broadcasts of `size` bytes as fast as app code can call it."""
        padding = "x" * body["size"]
        reached = 0
        for seq in range(body["count"]):
            reached += await broadcast_to_app(slug, {"type": "flood", "seq": seq, "pad": padding})
            if seq % 10 == 0:  # a fast producer (~5,000/s), but one that readers can follow
                await asyncio.sleep(0.002)
        return {"reached": reached}

    @app.post("/_test/room_broadcast")
    async def room_broadcast(body: dict[str, Any]) -> dict[str, str]:
        message_id = await broadcast_to_room(body["slug"], body["room"], body["message"])
        return {"message_id": message_id}

    @app.get("/_test/presence/{slug}")
    async def presence(slug: str, room: str) -> dict[str, list[dict[str, Any]]]:
        return {"members": await get_presence(slug, room)}

    @app.get("/_test/rooms/{slug}")
    async def rooms_of_connections(slug: str) -> dict[str, list[list[str]]]:
        """The rooms each connection is in, as handlers see them (`connection.rooms`)."""
        manager = await get_websocket_manager(slug)
        return {"rooms": [sorted(c.rooms) for c in manager.active_connections]}

    @app.get("/_test/sinks/{slug}")
    async def sinks(slug: str) -> dict[str, list[str]]:
        manager = await get_websocket_manager(slug)
        return {"sinks": sorted({type(c.sink).__name__ for c in manager.active_connections})}

    @app.get("/_test/protocols/{slug}")
    async def protocols(slug: str) -> dict[str, list[dict[str, Any]]]:
        """What the server's protocol object of each connection still holds."""
        manager = await get_websocket_manager(slug)
        return {
            "protocols": [
                _protocol_state(scope_protocol(c.websocket.scope))
                for c in manager.active_connections
            ]
        }

    @app.get("/_test/counts/{slug}")
    async def counts(slug: str, user: str | None = None) -> dict[str, int]:
        manager = await get_websocket_manager(slug)
        return {
            "total": manager.get_connection_count(),
            "user": manager.get_connection_count_by_user(user) if user else 0,
        }

    return app


def _protocol_state(protocol: Any) -> dict[str, Any]:
    parser_frame = protocol.conn.parser.gi_frame
    handshake = parser_frame.f_locals.get("request") if parser_frame is not None else None
    return {
        "class": type(protocol).__name__,
        "queue": type(protocol.queue).__name__,
        "writable": type(protocol.writable).__name__,
        "request": protocol.request is not None,
        "response": protocol.response is not None,
        "parser_request_headers": len(handshake.headers) if handshake is not None else None,
        "scope_headers": len(protocol.scope["headers"]),
    }


if __name__ == "__main__":
    app = build()
    ws = os.environ.get("TEST_WS_IMPLEMENTATION", "websockets-sansio")
    asyncio.run(serve_app(app, "127.0.0.1", 0, ws, EngineSettings.from_env(), 0))
