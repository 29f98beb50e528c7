"""Per-process realtime state: the apps' connection managers, message handlers and keepalive.

Each engine owns one `Realtime`; the module-level functions of the mdb-engine API use the
default one, which the first engine of the process adopts. Two engines never share state.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from engine import codec, protocol
from engine.hub import WebSocketConnection, WebSocketConnectionManager
from engine.limits import AddressCounter
from engine.protocol import CloseCode, CloseReason, stamp_app_message

logger = logging.getLogger("engine.realtime")

MessageHandler = Callable[..., Awaitable[None]]

KEEPALIVE_CHECK_SECONDS = 1.0  # shortest sweep period
MAX_SWEEP_SECONDS = 5.0


@dataclass(frozen=True)
class RegisteredHandler:
    func: MessageHandler
    wants_connection: bool  # takes (websocket, message, connection)

    async def __call__(
        self, websocket: Any, message: dict[str, Any], connection: WebSocketConnection
    ) -> None:
        if self.wants_connection:
            await self.func(websocket, message, connection)
        else:
            await self.func(websocket, message)


def _wants_connection(handler: MessageHandler) -> bool:
    try:
        parameters = list(inspect.signature(handler).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return True
    positional = [
        p
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    return len(positional) >= 3


class Realtime:
    """Connection managers, handlers and the keepalive sweeper of one engine."""

    def __init__(self) -> None:
        self._managers: dict[str, WebSocketConnectionManager] = {}
        self._handlers: dict[tuple[str, str], RegisteredHandler] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self.claimed = False
        self.addresses = AddressCounter()
        self.ping_intervals: set[float] = set()  # of the endpoints that had connections
        self.owner: Any = None  # the MongoDBEngine using this state, once one does
        # Set by a running engine: carries broadcasts to the other processes (the bus).
        self.publisher: Callable[[str, dict[str, Any], str | None], object] | None = None
        self.rooms: Any = None  # engine.rooms.service.Rooms of the engine that owns this state

    def manager(self, app_slug: str) -> WebSocketConnectionManager:
        manager = self._managers.get(app_slug)
        if manager is None:
            manager = self._managers[app_slug] = WebSocketConnectionManager(app_slug)
        return manager

    def managers(self) -> list[WebSocketConnectionManager]:
        return list(self._managers.values())

    def connections(self) -> Iterator[WebSocketConnection]:
        for manager in list(self._managers.values()):
            yield from manager.active_connections

    def register_handler(self, app_slug: str, endpoint: str, handler: MessageHandler) -> None:
        if not callable(handler):
            raise TypeError(f"message handler for {app_slug}/{endpoint} must be callable")
        self._handlers[(app_slug, endpoint)] = RegisteredHandler(
            handler, _wants_connection(handler)
        )
        logger.info("registered message handler for app %r, endpoint %r", app_slug, endpoint)

    def handler(self, app_slug: str, endpoint: str) -> RegisteredHandler | None:
        return self._handlers.get((app_slug, endpoint))

    def broadcast_local(
        self, app_slug: str, message: dict[str, Any], user_id: str | None = None
    ) -> int:
        """Queue `message` for the app's connections on this process; the count reached."""
        return self._deliver(app_slug, stamp_app_message(_checked(message), app_slug), user_id)

    def _deliver(self, app_slug: str, stamped: dict[str, Any], user_id: str | None) -> int:
        manager = self._managers.get(app_slug)
        frame = codec.dumps(stamped)  # also proves the message can be encoded
        if manager is None:
            return 0
        return manager.broadcast_frame(frame, user_id)

    async def broadcast(
        self, app_slug: str, message: dict[str, Any], user_id: str | None = None
    ) -> int:
        """Broadcast for app code: this process's connections at once, the other processes
        through the bus. Returns the connections reached on this process."""
        stamped = stamp_app_message(_checked(message), app_slug)
        user = str(user_id) if user_id is not None else None
        reached = self._deliver(app_slug, stamped, user)
        if self.publisher is not None:
            self.publisher(app_slug, stamped, user)
        return reached

    def start(self) -> None:
        """Start the keepalive sweeper (idempotent; needs a running event loop)."""
        if self._keepalive is None or self._keepalive.done():
            self._keepalive = asyncio.create_task(self._keepalive_loop(), name="ws-keepalive")

    async def stop(self) -> None:
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keepalive_loop(self) -> None:
        # One sweeper for all sockets instead of a timer per socket: cheap at 10k connections.
        while True:
            await asyncio.sleep(self._sweep_period())
            try:
                self.check_keepalive(time.monotonic())
            except Exception:
                logger.exception("keepalive check failed")

    def _sweep_period(self) -> float:
        """A sixth of the shortest ping interval: pings and 4408 closes are at most that late,
        and long intervals cost fewer sweeps over every connection."""
        shortest = min(self.ping_intervals, default=KEEPALIVE_CHECK_SECONDS * 6)
        return min(MAX_SWEEP_SECONDS, max(KEEPALIVE_CHECK_SECONDS, shortest / 6))

    def check_keepalive(self, now: float) -> None:
        ping_frame: str | None = None
        for connection in self.connections():
            if connection.closing:
                continue
            silent_for = now - connection.last_received
            if silent_for >= 2 * connection.ping_interval:
                connection.close(CloseCode.KEEPALIVE_TIMEOUT, CloseReason.KEEPALIVE_TIMEOUT)
            elif (
                silent_for >= connection.ping_interval
                and connection.last_ping_sent < connection.last_received
            ):
                if ping_frame is None:
                    ping_frame = codec.dumps(protocol.ping_message())
                connection.last_ping_sent = now
                connection.send_if_room(ping_frame)  # a busy socket needs no ping


def _checked(message: Any) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise TypeError(f"a broadcast message must be a dict, not {type(message).__name__}")
    return message


_default: Realtime | None = None


def default_realtime() -> Realtime:
    """The state the module-level mdb-engine functions use."""
    global _default
    if _default is None:
        _default = Realtime()
    return _default


def claim_realtime() -> Realtime:
    """State for a new engine: the default one if no engine has it yet, else a fresh one."""
    state = default_realtime()
    if state.claimed:
        return Realtime()
    state.claimed = True
    return state
