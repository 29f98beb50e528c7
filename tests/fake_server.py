"""A scripted WebSocket server: tests play the engine's side of the protocol message by message,
to check what a client sends (URL, token, subscriptions, pongs) at each step."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve


class FakeSession:
    """One connection as the server sees it."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        assert ws.request is not None
        self.path = urlsplit(ws.request.path).path
        self.query = parse_qs(urlsplit(ws.request.path).query)
        self.headers = ws.request.headers
        self.ended = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return message

    async def close(self, code: int, reason: str) -> None:
        await self.ws.close(code, reason)

    def cut(self) -> None:
        """Drop the TCP connection without a close frame."""
        self.ws.transport.abort()


class FakeServer:
    def __init__(self) -> None:
        self.sessions: asyncio.Queue[FakeSession] = asyncio.Queue()
        self.url = ""

    async def _handle(self, ws: ServerConnection) -> None:
        session = FakeSession(ws)
        await self.sessions.put(session)
        await ws.wait_closed()
        session.ended.set()

    async def next_session(self, timeout: float = 5.0) -> FakeSession:
        return await asyncio.wait_for(self.sessions.get(), timeout)


@asynccontextmanager
async def fake_server() -> AsyncIterator[FakeServer]:
    fake = FakeServer()
    async with serve(fake._handle, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        fake.url = f"ws://127.0.0.1:{port}"
        yield fake


def connected_message(user_id: str = "ann") -> dict[str, Any]:
    return {
        "type": "connected",
        "app_slug": "todo",
        "endpoint": "realtime",
        "connection_id": "c1",
        "authenticated": True,
        "user_id": user_id,
        "user_email": None,
        "ping_interval": 30,
        "protocol": 1,
        "timestamp": "2026-01-01T00:00:00Z",
    }


def change_message(
    event_id: str, operation: str, document_id: Any, document: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "type": "change",
        "id": event_id,
        "app_slug": "todo",
        "endpoint": "realtime",
        "collection": "todos",
        "operation": operation,
        "document_id": document_id,
        "document": document,
        "update": None,
        "timestamp": "2026-01-01T00:00:00Z",
    }
