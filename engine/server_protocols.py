"""What the engine knows about each uvicorn WebSocket implementation, to write frames directly.

A broadcast's frame is encoded once and written as is to every socket's transport
(`frames.DirectSink`). That needs three things from the server's protocol object of a
connection, which differ per implementation:

- finding it: `TransportAbortMiddleware` (installed by `create_app`) puts it in the scope; on a
  user's own app the endpoint finds it behind the ASGI `receive` / `send` it was given, which
  are bound methods of the protocol, possibly wrapped in closures by middleware;
- declining per-message compression before the handshake is answered: a compressed socket
  needs its own bytes per frame, so the engine's endpoints never negotiate it;
- after the handshake (which the legacy implementation writes in a task of its own after
  `accept` returns), its transport and, where it has one, its write-readiness flag.

Supported: uvicorn's `websockets-sansio` (uvicorn's default, and the engine's own
`engine.wsprotocol.EngineWebSocketProtocol`), `websockets` (legacy) and `wsproto`. Any other
server, or a connection that negotiated compression anyway, gets the queued path through the
ASGI `send` (`frames.QueuedSink`): slower, same messages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from starlette.websockets import WebSocket

from engine.transport import scope_protocol

_WRAPPER_DEPTH = 4  # closures followed from `receive` / `send` to the server's bound method


class Implementation(Enum):
    WEBSOCKETS_SANSIO = "websockets-sansio"
    WEBSOCKETS_LEGACY = "websockets"
    WSPROTO = "wsproto"


_CLASSES = {
    ("uvicorn.protocols.websockets.websockets_sansio_impl", "WebSocketsSansIOProtocol"): (
        Implementation.WEBSOCKETS_SANSIO
    ),
    ("uvicorn.protocols.websockets.websockets_impl", "WebSocketProtocol"): (
        Implementation.WEBSOCKETS_LEGACY
    ),
    ("uvicorn.protocols.websockets.wsproto_impl", "WSProtocol"): Implementation.WSPROTO,
}


def implementation_of(protocol: Any) -> Implementation | None:
    """Which uvicorn implementation a protocol object is (subclasses included), if any.

    Matched by class name, so the legacy implementation is never imported for nothing.
    """
    if protocol is None:
        return None
    for cls in type(protocol).__mro__:
        found = _CLASSES.get((cls.__module__, cls.__qualname__))
        if found is not None:
            return found
    return None


def find_server_protocol(websocket: WebSocket) -> Any:
    """The uvicorn protocol object of this connection, or None where it cannot be found."""
    known = scope_protocol(websocket.scope)
    if implementation_of(known) is not None:
        return known
    for channel in (getattr(websocket, "_receive", None), getattr(websocket, "_send", None)):
        found = _owner_behind(channel, _WRAPPER_DEPTH)
        if found is not None:
            return found
    return None


def _owner_behind(channel: Any, depth: int) -> Any:
    """The protocol whose bound method `channel` is, or that a wrapper closure calls."""
    owner = getattr(channel, "__self__", None)
    if implementation_of(owner) is not None:
        return owner
    if depth == 0:
        return None
    for cell in getattr(channel, "__closure__", None) or ():
        try:
            inner = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if callable(inner):
            found = _owner_behind(inner, depth - 1)
            if found is not None:
                return found
    return None


def decline_compression(protocol: Any) -> None:
    """Answer the handshake without per-message compression (call before `accept`)."""
    kind = implementation_of(protocol)
    if kind is Implementation.WEBSOCKETS_SANSIO:
        # uvicorn negotiated when the request arrived; the response is sent at accept.
        protocol.conn.extensions = []
        response = getattr(protocol, "response", None)
        if response is not None and "Sec-WebSocket-Extensions" in response.headers:
            del response.headers["Sec-WebSocket-Extensions"]
    elif kind is Implementation.WEBSOCKETS_LEGACY:
        # The handshake negotiates from this list (its own per connection) after accept.
        protocol.available_extensions.clear()
    elif kind is Implementation.WSPROTO:
        # uvicorn reads the setting at accept: give this connection a copy that says no.
        config = copy.copy(protocol.config)
        config.ws_per_message_deflate = False
        protocol.config = config


async def handshake_written(protocol: Any) -> None:
    """Wait until the handshake response is on the wire (call after `accept`).

    The legacy implementation answers the handshake in its own task after `accept` returns;
    frames written to the transport before that would precede the response.
    """
    if implementation_of(protocol) is Implementation.WEBSOCKETS_LEGACY:
        await protocol.handshake_completed_event.wait()


@dataclass(frozen=True, slots=True)
class DirectTarget:
    """Where a connection's frames can be written: the transport, and a flag that is set
    while the transport accepts writes (None: the protocol keeps no such flag)."""

    transport: Any
    writable: Any


def direct_target(protocol: Any) -> DirectTarget | None:
    """The transport to write frames to, after the handshake, or None when this connection
    cannot take shared frames (unknown server, compression negotiated, no transport)."""
    kind = implementation_of(protocol)
    transport = getattr(protocol, "transport", None)
    if kind is None or transport is None:
        return None
    if kind is Implementation.WEBSOCKETS_SANSIO:
        if protocol.conn.extensions != []:
            return None
        return DirectTarget(transport, protocol.writable)
    if kind is Implementation.WEBSOCKETS_LEGACY:
        if getattr(protocol, "extensions", None) != []:
            return None
        return DirectTarget(transport, None)
    connection = getattr(protocol.conn, "connection", None)  # wsproto, after the handshake
    frame_protocol = getattr(connection, "_proto", None)
    if getattr(frame_protocol, "extensions", None) != []:
        return None
    return DirectTarget(transport, protocol.writable)


def transport_abort(protocol: Any) -> Callable[[], None] | None:
    abort = getattr(getattr(protocol, "transport", None), "abort", None)
    return abort if callable(abort) else None
