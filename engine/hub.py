"""Connections of one app: registry, per-socket bounded queues and writers, broadcasts.

Every connection owns an outgoing queue bounded in messages and bytes, and one writer task
that drains it. Broadcasting only appends to queues, so a socket that stops reading never
delays anybody else; when its queue overflows it is closed with 1013 (slow consumer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine import codec
from engine.auth import ANONYMOUS, Principal
from engine.protocol import CloseCode, CloseReason, stamp_app_message
from engine.stats import EndpointStats

logger = logging.getLogger("engine.hub")


@dataclass(frozen=True)
class QueueLimits:
    """Bounds of one connection's outgoing queue; overflowing either closes it with 1013."""

    max_messages: int = 1024
    max_bytes: int = 4 * 1024 * 1024


SendText = Callable[[str], Awaitable[None]]
CloseSocket = Callable[[int, str], Awaitable[None]]


class Outbox:
    """A bounded FIFO of encoded frames drained by one writer task."""

    __slots__ = ("_bytes", "_closed", "_frames", "_limits", "_room", "_wakeup")

    def __init__(self, limits: QueueLimits) -> None:
        self._limits = limits
        self._frames: deque[str] = deque()
        self._bytes = 0
        self._closed = False
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()

    def _full_for(self, frame: str) -> bool:
        # One frame larger than the byte bound still goes through an empty queue.
        return len(self._frames) >= self._limits.max_messages or (
            bool(self._frames) and self._bytes + len(frame) > self._limits.max_bytes
        )

    def put(self, frame: str) -> bool:
        """Queue a frame; False when the queue is full (the frame is not queued)."""
        if self._closed or self._full_for(frame):
            return False
        self._frames.append(frame)
        self._bytes += len(frame)
        self._wakeup.set()
        return True

    async def put_when_room(self, frame: str) -> bool:
        """Queue a frame, waiting for room (replays pace themselves); False once closed."""
        while not self._closed and self._full_for(frame):
            self._room.clear()
            await self._room.wait()
        return self.put(frame)

    async def get(self) -> str:
        while not self._frames:
            self._wakeup.clear()
            await self._wakeup.wait()
        frame = self._frames.popleft()
        self._bytes -= len(frame)
        self._room.set()
        return frame

    def close(self) -> None:
        """Drop what is queued and release anyone waiting for room."""
        self._closed = True
        self._frames.clear()
        self._bytes = 0
        self._room.set()

    def __len__(self) -> int:
        return len(self._frames)


@dataclass(eq=False)
class WebSocketConnection:
    """One client connection and who it belongs to (the mdb-engine fields come first)."""

    websocket: Any
    app_slug: str
    user_id: str | None = None
    user_email: str | None = None
    connected_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    endpoint: str = ""
    principal: Principal = ANONYMOUS
    connection_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ping_interval: float = 30.0
    last_received: float = field(default_factory=time.monotonic)
    last_ping_sent: float = 0.0
    outbox: Outbox | None = None
    closing: bool = False
    stats: EndpointStats | None = None  # counters shared by the endpoint's connections
    views: dict[str, Any] = field(default_factory=dict)  # collection -> router.View
    pending: Any = None  # router.PendingEvents while being brought up to date
    catch_up: asyncio.Future[None] | None = None  # the resume replay, while it runs
    _writer: asyncio.Task[None] | None = None
    _expiry: asyncio.TimerHandle | None = None
    _on_close: Callable[[WebSocketConnection, int], None] | None = None
    _closing: asyncio.Task[None] | None = None

    def start(
        self,
        send_text: SendText,
        close: CloseSocket,
        limits: QueueLimits,
        on_close: Callable[[WebSocketConnection, int], None] | None = None,
    ) -> None:
        """Start the writer; after this, `send` queues frames for the socket."""
        self.outbox = Outbox(limits)
        self._send_text = send_text
        self._close_socket = close
        self._on_close = on_close
        self._writer = asyncio.create_task(
            self._write_loop(), name=f"ws-writer-{self.connection_id}"
        )
        if self.principal.expires_at is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self.principal.expires_at - time.time())
            self._expiry = loop.call_at(
                loop.time() + delay,
                self.close,
                CloseCode.POLICY_VIOLATION,
                CloseReason.TOKEN_EXPIRED,
            )

    def send(self, frame: str) -> bool:
        """Queue an encoded frame. False if the connection is closing or just overflowed."""
        if self.closing or self.outbox is None:
            return False
        if self.outbox.put(frame):
            if self.stats is not None:
                self.stats.frames_out += 1
            return True
        if self.stats is not None:
            # The frame that overflowed and every frame still queued are lost with the socket.
            self.stats.dropped += 1 + len(self.outbox)
            self.stats.slow_consumer_closes += 1
        logger.warning(
            "closing slow consumer %s of app %r (%d frames queued)",
            self.connection_id,
            self.app_slug,
            len(self.outbox),
        )
        self.close(CloseCode.TRY_AGAIN_LATER, CloseReason.SLOW_CONSUMER)
        return False

    async def send_paced(self, frame: str) -> bool:
        """Queue a frame, waiting while the queue is full instead of overflowing it."""
        if self.closing or self.outbox is None:
            return False
        return await self.outbox.put_when_room(frame)

    def send_message(self, message: dict[str, Any]) -> bool:
        return self.send(codec.dumps(message))

    async def _write_loop(self) -> None:
        assert self.outbox is not None
        try:
            while True:
                frame = await self.outbox.get()
                await self._send_text(frame)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the socket went away mid-send: stop writing, quietly
            logger.debug("writer of %s stopped: %r", self.connection_id, error)
            self.closing = True

    def close(self, code: int, reason: str = "") -> None:
        """Close the connection without waiting: drop what is queued and close the socket."""
        if self.closing:
            return
        self.closing = True
        self.stop()
        if self._on_close is not None:
            self._on_close(self, code)
        self._closing = asyncio.get_running_loop().create_task(
            self._close_socket_quietly(code, reason)
        )

    async def wait_closed(self) -> None:
        """Wait until a close started by the server has been sent."""
        if self._closing is not None:
            await asyncio.shield(self._closing)

    async def _close_socket_quietly(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self._close_socket(code, reason)

    def stop(self) -> None:
        """Stop the writer, timers and replay; called on close and when the client has gone."""
        if self.catch_up is not None and not self.catch_up.done():
            self.catch_up.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        if self.outbox is not None:
            self.outbox.close()

    async def drain(self, timeout: float = 1.0) -> None:
        """Wait briefly until queued frames are written (used before a normal close)."""
        deadline = time.monotonic() + timeout
        while self.outbox and len(self.outbox) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class WebSocketConnectionManager:
    """The connections of one app on this process (mdb-engine's manager, same names)."""

    def __init__(self, app_slug: str) -> None:
        self.app_slug = app_slug
        self._connections: dict[int, WebSocketConnection] = {}

    @property
    def active_connections(self) -> list[WebSocketConnection]:
        return list(self._connections.values())

    def add(self, connection: WebSocketConnection) -> None:
        self._connections[id(connection.websocket)] = connection

    def remove(self, connection: WebSocketConnection) -> None:
        if self._connections.get(id(connection.websocket)) is connection:
            del self._connections[id(connection.websocket)]
        connection.stop()

    def find(self, websocket: Any) -> WebSocketConnection | None:
        return self._connections.get(id(websocket))

    async def connect(
        self, websocket: Any, user_id: str | None = None, user_email: str | None = None
    ) -> WebSocketConnection:
        """Register an already accepted socket that is driven by code outside the engine."""
        connection = WebSocketConnection(websocket, self.app_slug, user_id, user_email)
        connection.start(websocket.send_text, _closer(websocket), QueueLimits())
        self.add(connection)
        return connection

    def disconnect(self, websocket: Any) -> None:
        connection = self.find(websocket)
        if connection is not None:
            self.remove(connection)

    def get_connection_count(self) -> int:
        return len(self._connections)

    def get_connections_by_user(self, user_id: str) -> list[WebSocketConnection]:
        return [c for c in self._connections.values() if c.user_id == user_id]

    def get_connection_count_by_user(self, user_id: str) -> int:
        return len(self.get_connections_by_user(user_id))

    async def send_to_connection(self, websocket: Any, message: dict[str, Any]) -> None:
        """Queue a message for one socket of this app (never waits for the socket)."""
        connection = self.find(websocket)
        if connection is not None:
            connection.send(codec.dumps(stamp_app_message(message, self.app_slug)))

    async def broadcast(self, message: dict[str, Any], filter_by_user: str | None = None) -> int:
        return self.broadcast_now(message, filter_by_user)

    def broadcast_now(self, message: dict[str, Any], filter_by_user: str | None = None) -> int:
        """Queue a message for every connection of the app (or of one user); the count queued."""
        return self.broadcast_frame(
            codec.dumps(stamp_app_message(message, self.app_slug)), filter_by_user
        )

    def broadcast_frame(self, frame: str, filter_by_user: str | None = None) -> int:
        return self.send_frame(frame, self._recipients(filter_by_user))

    def _recipients(self, user_id: str | None) -> Iterable[WebSocketConnection]:
        connections = list(self._connections.values())
        if user_id is None:
            return connections
        return [c for c in connections if c.user_id == str(user_id)]

    @staticmethod
    def send_frame(frame: str, connections: Iterable[WebSocketConnection]) -> int:
        return sum(1 for connection in connections if connection.send(frame))


def _closer(websocket: Any) -> CloseSocket:
    async def close(code: int, reason: str) -> None:
        await websocket.close(code=code, reason=reason)

    return close
