"""A lean WebSocket client for load generation: raw handshake and a tiny frame parser.

A full client library spends more CPU per message than the servers under test, and one core
could then not receive what one server core sends. This one only splits the byte stream into
frames and counts the broadcasts; the few connections sampled for latency also read the send
time from the message. It answers protocol pings and the engine's JSON pings, so connections
can be held idle for minutes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

BROADCAST_MARKS = (b'{"type":"bcast"', b'{"type": "bcast"')  # orjson / json.dumps spacing
JSON_PING_MARKS = (b'"type":"ping"', b'"type": "ping"')
TIME_KEY = b'"t":'
_PONG_TEXT = b'{"type":"pong"}'
_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA


@dataclass
class Tally:
    """What all clients of one run received, added up."""

    broadcasts: int = 0
    other_text: int = 0
    pings: int = 0  # protocol pings and the engine's JSON pings
    payload_bytes: int = 0
    last_received: float = 0.0
    latencies: list[float] = field(default_factory=list)
    close_codes: dict[int, int] = field(default_factory=dict)
    lost_connections: int = 0
    recording: bool = True  # sampled clients record latency (off for throughput runs: cheaper)
    target: int = 0  # broadcasts expected in total; `done` is set when reached
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def expect(self, total: int) -> None:
        self.broadcasts = 0
        self.payload_bytes = 0
        self.latencies.clear()
        self.target = total
        self.done.clear()


def _masked(opcode: int, payload: bytes) -> bytes:
    # Clients must mask; an all-zero key keeps the payload as is and is still valid framing.
    if len(payload) >= 126:
        raise ValueError("control replies are short")
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


class WsClient(asyncio.Protocol):
    """One connection. `sampled` ones record latency from the `t` field of each broadcast."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        tally: Tally,
        sampled: bool,
        marks: tuple[bytes, ...] = BROADCAST_MARKS,
    ) -> None:
        self.tally = tally
        self.marks = marks  # how the messages counted begin
        self.sampled = sampled
        self.received = 0  # broadcasts on this connection
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_text: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._handshaking = True
        self._closed_by_us = False
        key = base64.b64encode(os.urandom(16)).decode()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc!r}"))
        elif not self._closed_by_us:
            self.tally.lost_connections += 1

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if self._handshaking:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            self._accept_handshake(buffer[: end + 4])
            buffer = buffer[end + 4 :]
        self._buffer = self._frames(buffer)

    def _accept_handshake(self, head: bytes) -> None:
        self._handshaking = False
        if not head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101")):
            self.opened.set_exception(ConnectionError(head.split(b"\r\n", 1)[0].decode()))
            assert self.transport is not None
            self.transport.close()
            return
        self.opened.set_result(None)

    def _frames(self, buffer: bytes) -> bytes:
        """Consume the complete frames at the start of `buffer`; the rest is returned."""
        position, size, counted = 0, len(buffer), 0
        sampled = self.sampled and self.tally.recording
        while size - position >= 2:
            length = buffer[position + 1] & 0x7F
            start = position + 2
            if length == 126:
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            opcode = buffer[position] & 0x0F
            if opcode == _OP_TEXT and buffer.startswith(self.marks, start):
                counted += 1
                if sampled:
                    self._record_latency(buffer, start, end)
            else:
                self._control(opcode, buffer[start:end])
            position = end
        if counted:
            self._count(counted, size)
        return buffer[position:]

    def _count(self, counted: int, size: int) -> None:
        tally = self.tally
        self.received += counted
        tally.broadcasts += counted
        tally.payload_bytes += size
        tally.last_received = time.time()
        if tally.target and tally.broadcasts >= tally.target:
            tally.done.set()

    def _record_latency(self, buffer: bytes, start: int, end: int) -> None:
        at = buffer.find(TIME_KEY, start, end) + len(TIME_KEY)
        stop = buffer.find(b",", at, end)
        self.tally.latencies.append(time.time() - float(buffer[at:stop]))

    def _control(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == _OP_TEXT:
            self.tally.other_text += 1
            if not self.first_text.done():
                self.first_text.set_result(None)
            if any(mark in payload for mark in JSON_PING_MARKS):
                self.tally.pings += 1
                self.transport.write(_masked(_OP_TEXT, _PONG_TEXT))
        elif opcode == _OP_PING:
            self.tally.pings += 1
            self.transport.write(_masked(_OP_PONG, payload))
        elif opcode == _OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.tally.close_codes[code] = self.tally.close_codes.get(code, 0) + 1
            self.transport.write(_masked(_OP_CLOSE, payload[:2]))
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._closed_by_us = True  # a close we asked for is not a lost connection
            self.transport.write(_masked(_OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


async def open_clients(
    host: str,
    port: int,
    path: str,
    count: int,
    tally: Tally,
    samples: int = 0,
    concurrency: int = 64,
    paths: Sequence[str] | None = None,
    marks: tuple[bytes, ...] = BROADCAST_MARKS,
) -> list[WsClient]:
    """Open `count` connections, `concurrency` handshakes at a time.

    `paths`, if given, holds each connection's own path (e.g. its own token); `marks` how the
    messages to count begin (broadcasts by default).

    `samples` connections, spread evenly over the connection order (servers usually fan out in
    that order), record latency.
    """
    loop = asyncio.get_running_loop()
    step = max(1, count // samples) if samples else 0
    clients: list[WsClient] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        sampled = bool(step) and index % step == 0 and index // step < samples
        own_path = paths[index] if paths is not None else path
        async with gate:
            _, client = await loop.create_connection(
                lambda: WsClient(host, port, own_path, tally, sampled, marks), host, port
            )
            await asyncio.wait_for(client.opened, 30)
            clients.append(client)

    await asyncio.gather(*(one(i) for i in range(count)))
    return clients


def close_clients(clients: list[WsClient]) -> None:
    for client in clients:
        client.close()
