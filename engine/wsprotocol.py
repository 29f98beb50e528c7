"""uvicorn's websockets-sansio protocol, leaner per connection and answering handshakes it
cannot parse.

Each idle connection holds one of these, so its footprint is the engine's memory per
connection. uvicorn builds an `asyncio.Queue` (three deques and an Event, about 3 KiB even
when empty) for the one reader of incoming events, an `asyncio.Event` (a 760-byte deque) for
write readiness, and keeps the parsed handshake request and response for the connection's
lifetime. This subclass uses a list-backed `Inbox` and `Flag` instead and lets the handshake
go once it is answered (about 7 KiB less per connection, measured with tracemalloc).

A handshake over the parser's limits (a header line over 8 KiB, too many headers) makes the
sans-I/O parser prepare a 4xx response; uvicorn 0.54 never writes it nor closes the socket,
so the client waits forever and the server holds the descriptor. This subclass sends that
response and closes. Everything else is uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request

WEBSOCKETS_SANSIO = "engine.wsprotocol:EngineWebSocketProtocol"


class Inbox:
    """A FIFO of ASGI receive events for one reader; holds at most a few events at a time
    (the protocol pauses reading while one waits), so a list is enough."""

    __slots__ = ("_events", "_getters")

    def __init__(self) -> None:
        self._events: list[Any] = []
        self._getters: list[asyncio.Future[None]] = []

    def put_nowait(self, event: Any) -> None:
        self._events.append(event)
        self._wake_one()

    def _wake_one(self) -> None:
        for getter in self._getters:
            if not getter.done():
                getter.set_result(None)
                return

    def empty(self) -> bool:
        return not self._events

    def qsize(self) -> int:
        return len(self._events)

    async def get(self) -> Any:
        while not self._events:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if self._events:
                    self._wake_one()  # this reader was woken for an event it will not take
                raise
            finally:
                self._getters.remove(getter)
        return self._events.pop(0)


class Flag:
    """`asyncio.Event`'s interface over a list of waiters (no deque per connection)."""

    __slots__ = ("_is_set", "_waiters")

    def __init__(self, is_set: bool = False) -> None:
        self._is_set = is_set
        self._waiters: list[asyncio.Future[bool]] = []

    def is_set(self) -> bool:
        return self._is_set

    def set(self) -> None:
        if not self._is_set:
            self._is_set = True
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._is_set = False

    async def wait(self) -> bool:
        if self._is_set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            self._waiters.remove(waiter)


class EngineWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag(is_set=True)  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_complete and self.conn.handshake_exc is not None:
            # The parser refused the handshake and prepared its 4xx: send it, then close.
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.handshake_complete = True
            self.close_sent = True
            self.transport.close()

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        # The scope has its own copy of the headers. The request itself stays referenced by
        # the parser's generator frame for the connection's lifetime, so empty it too.
        self.request = None
        event.headers = Headers()

    async def send(self, message: Any) -> None:
        await super().send(message)
        if self.handshake_complete and getattr(self, "response", None) is not None:
            self.response = None  # written: the handshake response is not needed again


def protocol_for(name: str) -> str:
    """The uvicorn `ws` setting for an implementation name of `serve --ws`."""
    return WEBSOCKETS_SANSIO if name == "websockets-sansio" else name
