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
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from engine import codec
from engine.auth import ANONYMOUS, Principal
from engine.delivery.members import Members
from engine.frames import DirectSink, QueuedSink, Sink
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


@dataclass(eq=False, slots=True)
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
    sink: Sink | None = None  # where frames go: the transport directly, or a queued writer
    closing: bool = False
    stats: EndpointStats | None = None  # counters shared by the endpoint's connections
    views: dict[str, Any] = field(default_factory=dict)  # collection -> router.View
    pending: Any = None  # router.PendingEvents while being brought up to date
    catch_up: asyncio.Future[None] | None = None  # the resume replay, while it runs
    rooms: set[str] = field(default_factory=set)  # names of the rooms joined (engine.rooms)
    _expiry: asyncio.TimerHandle | None = None
    _on_close: Callable[[WebSocketConnection, int], None] | None = None
    _closing: asyncio.Task[None] | None = None
    _close_socket: CloseSocket | None = None

    def start(
        self,
        send_text: SendText,
        close: CloseSocket,
        limits: QueueLimits,
        on_close: Callable[[WebSocketConnection, int], None] | None = None,
        server_protocol: Any = None,
    ) -> None:
        """Set up the sink; after this, `send` delivers frames to the socket."""
        self._close_socket = close
        self._on_close = on_close
        direct = DirectSink.for_protocol(server_protocol, limits.max_bytes)
        if direct is not None:
            self.sink = direct
        else:
            self.sink = QueuedSink(
                limits.max_messages,
                limits.max_bytes,
                send_text,
                self._broken,
                f"ws-writer-{self.connection_id}",
            )
        self.set_expiry(self.principal.expires_at)

    def set_expiry(self, expires_at: float | None) -> None:
        """Close with 1008 `token expired` at `expires_at` (unix time; None: never)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if expires_at is not None and not self.closing:
            loop = asyncio.get_running_loop()
            delay = max(0.0, expires_at - time.time())
            self._expiry = loop.call_at(
                loop.time() + delay,
                self.close,
                CloseCode.POLICY_VIOLATION,
                CloseReason.TOKEN_EXPIRED,
            )

    def send(self, frame: str) -> bool:
        """Send an encoded frame. False if the connection is closing or just overflowed."""
        if self.closing or self.sink is None:
            return False
        if self.sink.offer(frame):
            if self.stats is not None:
                self.stats.frames_out += 1
            return True
        if self.stats is not None:
            # The frame that overflowed and every frame still waiting are lost with the socket.
            self.stats.dropped += 1 + self.sink.waiting_frames()
            self.stats.slow_consumer_closes += 1
        logger.warning("closing slow consumer %s of app %r", self.connection_id, self.app_slug)
        self.close(CloseCode.TRY_AGAIN_LATER, CloseReason.SLOW_CONSUMER)
        return False

    def send_if_room(self, frame: str) -> bool:
        """Send a frame only if the socket has room; never closes the connection."""
        if self.closing or self.sink is None:
            return False
        return self.sink.offer(frame)

    async def send_paced(self, frame: str) -> bool:
        """Send a frame, waiting while the queue is full instead of overflowing it."""
        if self.closing or self.sink is None:
            return False
        return await self.sink.offer_paced(frame)

    def send_message(self, message: dict[str, Any]) -> bool:
        return self.send(codec.dumps(message))

    def _broken(self) -> None:
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
            if self._close_socket is not None:
                await self._close_socket(code, reason)

    def stop(self) -> None:
        """Stop the writer, timers and replay; called on close and when the client has gone."""
        if self.catch_up is not None and not self.catch_up.done():
            self.catch_up.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        if self.sink is not None:
            self.sink.stop()


class WebSocketConnectionManager:
    """The connections of one app on this process (mdb-engine's manager, same names)."""

    def __init__(self, app_slug: str) -> None:
        self.app_slug = app_slug
        self._connections = Members()  # keyed by id(websocket)

    @property
    def active_connections(self) -> list[WebSocketConnection]:
        return self._connections.all()

    def add(self, connection: WebSocketConnection) -> None:
        self._connections.add(id(connection.websocket), connection)

    def remove(self, connection: WebSocketConnection) -> None:
        if self._connections.get(id(connection.websocket)) is connection:
            self._connections.remove(id(connection.websocket))
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
        return self._connections.of_user(user_id)

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
        if user_id is None:
            return self._connections.all()
        return self._connections.of_user(str(user_id))

    @staticmethod
    def send_frame(frame: str, connections: Iterable[WebSocketConnection]) -> int:
        return sum(1 for connection in connections if connection.send(frame))


def _closer(websocket: Any) -> CloseSocket:
    async def close(code: int, reason: str) -> None:
        await websocket.close(code=code, reason=reason)

    return close
