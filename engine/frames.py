"""Encoded messages, and the two ways a connection's frames reach its socket.

A `Frame` is the JSON text of one message; its WebSocket wire form (header + UTF-8 payload,
unmasked as server frames are) is built once and shared by every socket it goes to.

`DirectSink` writes wire frames straight to the server transport: no task, no await, no copy
per socket (the websockets library's own broadcast() works this way). It is used where the
server exposes its transport and the connection has no compression (every uvicorn
implementation; see engine/server_protocols.py). `QueuedSink` is the
portable path: a bounded queue drained by a writer task through the ASGI `send`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from engine.server_protocols import direct_target

logger = logging.getLogger("engine.frames")

_TEXT_FIN = 0x81


class Frame(str):
    """A message's JSON text; `wire` is its WebSocket text frame, encoded once."""

    @functools.cached_property
    def wire(self) -> bytes:
        return wire_frame(self)


def wire_frame(text: str) -> bytes:
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        header = bytes((_TEXT_FIN, size))
    elif size < 65536:
        header = bytes((_TEXT_FIN, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((_TEXT_FIN, 127)) + size.to_bytes(8, "big")
    return header + payload


def wire_of(frame: str) -> bytes:
    return frame.wire if isinstance(frame, Frame) else wire_frame(frame)


class Sink(Protocol):
    def offer(self, frame: str) -> bool: ...
    async def offer_paced(self, frame: str) -> bool: ...
    def stop(self) -> None: ...
    def waiting_frames(self) -> int: ...


class DirectSink:
    """Frames written to the transport at once; its buffer is the connection's queue."""

    __slots__ = ("_closed", "_max_bytes", "_transport", "_writable")

    def __init__(self, transport: Any, writable: Any, max_bytes: int) -> None:
        self._transport = transport
        self._writable = writable  # set while the transport takes writes; None: not known
        self._max_bytes = max_bytes
        self._closed = False

    @classmethod
    def for_protocol(cls, protocol: Any, max_bytes: int) -> DirectSink | None:
        """A direct sink when the server protocol allows it (see engine.server_protocols)."""
        target = direct_target(protocol)
        if target is None:
            return None
        return cls(target.transport, target.writable, max_bytes)

    def offer(self, frame: str) -> bool:
        """Write a frame; False when the socket already holds more than its byte bound."""
        if self._closed or self._transport.is_closing():
            return not self._closed  # a socket going away is not a slow consumer
        data = wire_of(frame)
        buffered = self._transport.get_write_buffer_size()
        if buffered and buffered + len(data) > self._max_bytes:
            return False
        self._transport.write(data)
        return True

    async def offer_paced(self, frame: str) -> bool:
        data = wire_of(frame)
        while not self._closed and not self._transport.is_closing():
            buffered = self._transport.get_write_buffer_size()
            if not buffered or buffered + len(data) <= self._max_bytes:
                self._transport.write(data)
                return True
            if self._writable is None or self._writable.is_set():
                await asyncio.sleep(0.005)  # a bound below the transport's own high mark
            else:
                await self._writable.wait()
        return False

    def stop(self) -> None:
        self._closed = True

    def waiting_frames(self) -> int:
        return 0  # bytes wait in the transport, counted there, not as frames


class QueuedSink:
    """A bounded FIFO of frames drained by one writer task through the ASGI `send`."""

    __slots__ = ("_bytes", "_closed", "_frames", "_limits", "_room", "_wakeup", "_writer")

    def __init__(
        self,
        max_messages: int,
        max_bytes: int,
        send_text: Callable[[str], Awaitable[None]],
        on_broken: Callable[[], None],
        name: str,
    ) -> None:
        self._limits = (max_messages, max_bytes)
        self._frames: deque[str] = deque()
        self._bytes = 0
        self._closed = False
        self._wakeup = asyncio.Event()
        self._room = asyncio.Event()
        self._writer = asyncio.create_task(self._write_loop(send_text, on_broken), name=name)

    def _full_for(self, frame: str) -> bool:
        # One frame larger than the byte bound still goes through an empty queue.
        max_messages, max_bytes = self._limits
        return len(self._frames) >= max_messages or (
            bool(self._frames) and self._bytes + len(frame) > max_bytes
        )

    def offer(self, frame: str) -> bool:
        if self._closed or self._full_for(frame):
            return False
        self._frames.append(frame)
        self._bytes += len(frame)
        self._wakeup.set()
        return True

    async def offer_paced(self, frame: str) -> bool:
        while not self._closed and self._full_for(frame):
            self._room.clear()
            await self._room.wait()
        return self.offer(frame)

    async def _write_loop(
        self, send_text: Callable[[str], Awaitable[None]], on_broken: Callable[[], None]
    ) -> None:
        try:
            while True:
                while not self._frames:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                frame = self._frames.popleft()
                self._bytes -= len(frame)
                self._room.set()
                await send_text(frame)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # the socket went away mid-send: stop writing, quietly
            logger.debug("writer stopped: %r", error)
            on_broken()

    def stop(self) -> None:
        self._closed = True
        self._frames.clear()
        self._bytes = 0
        self._room.set()
        self._writer.cancel()

    def waiting_frames(self) -> int:
        return len(self._frames)
