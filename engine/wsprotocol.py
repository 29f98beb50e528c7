"""uvicorn's websockets-sansio protocol, answering handshakes it cannot parse.

A handshake over the parser's limits (a header line over 8 KiB, too many headers) makes the
sans-I/O parser prepare a 4xx response; uvicorn 0.54 never writes it nor closes the socket,
so the client waits forever and the server holds the descriptor. This subclass sends that
response and closes. Everything else is uvicorn's.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

WEBSOCKETS_SANSIO = "engine.wsprotocol:EngineWebSocketProtocol"


class EngineWebSocketProtocol(WebSocketsSansIOProtocol):
    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_complete and self.conn.handshake_exc is not None:
            # The parser refused the handshake and prepared its 4xx: send it, then close.
            self.transport.write(b"".join(self.conn.data_to_send()))
            self.handshake_complete = True
            self.close_sent = True
            self.transport.close()


def protocol_for(name: str) -> str:
    """The uvicorn `ws` setting for an implementation name of `serve --ws`."""
    return WEBSOCKETS_SANSIO if name == "websockets-sansio" else name
