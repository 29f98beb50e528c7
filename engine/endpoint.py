"""The WebSocket endpoint: origin check, authentication, the receive loop, app handlers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from engine import codec, protocol
from engine.hub import QueueLimits, WebSocketConnection
from engine.identity.providers import AppIdentity
from engine.identity.refresh import refresh
from engine.identity.tokens import ANONYMOUS, AuthError, Principal, extract_ticket, extract_token
from engine.limits import ClientLimits, MessageRate
from engine.protocol import CloseCode, CloseReason, ErrorCode
from engine.realtime import Realtime
from engine.server_protocols import (
    decline_compression,
    find_server_protocol,
    handshake_written,
    transport_abort,
)
from engine.stats import EndpointStats
from engine.transport import scope_abort

logger = logging.getLogger("engine.endpoint")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
CLOSE_GRACE_SECONDS = 5.0  # how long a closing peer has to read its close frame


@dataclass(frozen=True)
class EndpointSettings:
    """Everything one WebSocket endpoint needs to know about itself."""

    app_slug: str
    name: str
    path: str
    require_auth: bool = True
    allow_anonymous: bool = False
    ping_interval: int = 30
    allowed_origins: tuple[str, ...] | None = None  # None: any Origin (see same_origin)
    same_origin: bool = False  # without allowed_origins, browsers only from this host
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    queue_limits: QueueLimits = field(default_factory=QueueLimits)
    client_limits: ClientLimits = field(default_factory=ClientLimits)
    # Placeholders the endpoint's scopes read: a refreshed token must keep their values.
    identity_placeholders: tuple[str, ...] = ()


# A hook for protocol message types the engine answers itself (subscribe, unsubscribe).
ProtocolHandler = Callable[[WebSocketConnection, dict[str, Any]], Awaitable[None] | None]


def origin_allowed(
    origin: str | None,
    allowed: tuple[str, ...] | None,
    host: str | None = None,
    same_origin: bool = False,
) -> bool:
    """Browsers always send Origin; other clients may not, and are not cross-site attackers.

    With no list of allowed origins, `same_origin` admits only pages served by the host the
    handshake was sent to (cross-site WebSocket hijacking: a CSRF check for sockets).
    """
    if origin is None:
        return True
    if allowed is None:
        return not same_origin or _origin_host(origin) == (host or "").lower()
    return "*" in allowed or origin.rstrip("/") in {o.rstrip("/") for o in allowed}


def _origin_host(origin: str) -> str:
    """`host[:port]` of an Origin such as `https://example.com:8443`."""
    return origin.partition("://")[2].rstrip("/").lower()


async def authenticate(
    settings: EndpointSettings,
    identity: AppIdentity,
    query_params: Mapping[str, str],
    headers: Mapping[str, str],
) -> Principal:
    """The connection's principal; AuthError when it must be refused.

    A `?ticket=` is the credential when present. A token that is present is always verified,
    even where anonymous access is allowed.
    """
    ticket = extract_ticket(query_params)
    if ticket is not None:
        return await identity.redeem_ticket(ticket)
    token = extract_token(query_params, headers)
    if token is None:
        if settings.require_auth and not settings.allow_anonymous:
            raise AuthError(CloseReason.AUTH_REQUIRED)
        return ANONYMOUS
    return await identity.verify(token)


class Endpoint:
    """An ASGI WebSocket route handler for one manifest endpoint."""

    def __init__(
        self,
        settings: EndpointSettings,
        realtime: Realtime,
        identity: Callable[[], AppIdentity],
        protocol_handlers: Mapping[str, ProtocolHandler] | None = None,
        on_connect: Callable[[WebSocketConnection], Awaitable[None] | None] | None = None,
        on_disconnect: Callable[[WebSocketConnection], None] | None = None,
        stats: EndpointStats | None = None,
    ) -> None:
        self.settings = settings
        self.realtime = realtime
        self._identity = identity
        self._protocol_handlers = dict(protocol_handlers or {})
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._stats = stats

    async def __call__(self, websocket: WebSocket) -> None:
        settings = self.settings
        origin, host = websocket.headers.get("origin"), websocket.headers.get("host")
        if not origin_allowed(origin, settings.allowed_origins, host, settings.same_origin):
            # Closing before accept makes the server answer the handshake with HTTP 403.
            await websocket.close(code=CloseCode.POLICY_VIOLATION)
            return
        try:
            principal = await authenticate(
                settings, self._identity(), websocket.query_params, websocket.headers
            )
        except AuthError as refused:
            await websocket.accept()
            await websocket.close(code=CloseCode.POLICY_VIOLATION, reason=str(refused.reason))
            return
        server_protocol = find_server_protocol(websocket)
        decline_compression(server_protocol)  # shared frames need uncompressed sockets
        await websocket.accept()
        await handshake_written(server_protocol)
        address = websocket.client.host if websocket.client else "unknown"
        refusal = self._over_connection_limits(principal, address)
        if refusal is not None:
            await websocket.close(code=CloseCode.POLICY_VIOLATION, reason=refusal)
            return
        connection = self._open(websocket, principal, server_protocol)
        try:
            await self._receive_loop(websocket, connection)
            await connection.wait_closed()  # the server's close frame goes out before we end
        finally:
            self.realtime.addresses.remove(address)
            self.realtime.manager(settings.app_slug).remove(connection)
            if self._on_disconnect is not None:
                self._on_disconnect(connection)

    def _over_connection_limits(self, principal: Principal, address: str) -> str | None:
        """The close reason when this connection would exceed a limit, else None (counted)."""
        limits = self.settings.client_limits
        manager = self.realtime.manager(self.settings.app_slug)
        if (
            principal.user_id is not None
            and limits.connections_per_user > 0
            and manager.get_connection_count_by_user(principal.user_id)
            >= limits.connections_per_user
        ):
            return CloseReason.TOO_MANY_CONNECTIONS
        if not self.realtime.addresses.try_add(address, limits.connections_per_ip):
            return CloseReason.TOO_MANY_CONNECTIONS
        return None

    def _open(
        self, websocket: WebSocket, principal: Principal, server_protocol: Any
    ) -> WebSocketConnection:
        settings = self.settings
        connection = WebSocketConnection(
            websocket=websocket,
            app_slug=settings.app_slug,
            user_id=principal.user_id,
            user_email=principal.email,
            endpoint=settings.name,
            principal=principal,
            ping_interval=settings.ping_interval,
            stats=self._stats,
        )
        manager = self.realtime.manager(settings.app_slug)
        connection.start(
            websocket.send_text,
            _closer(websocket, transport_abort(server_protocol) or scope_abort(websocket.scope)),
            settings.queue_limits,
            on_close=lambda closed, _code: manager.remove(closed),
            server_protocol=server_protocol,
        )
        # `connected` is queued before the connection is visible, so it always comes first.
        connection.send_message(
            protocol.connected_message(
                app_slug=settings.app_slug,
                endpoint=settings.name,
                connection_id=connection.connection_id,
                user_id=principal.user_id,
                user_email=principal.email,
                ping_interval=settings.ping_interval,
            )
        )
        manager.add(connection)
        self.realtime.ping_intervals.add(settings.ping_interval)
        self.realtime.start()
        if self._on_connect is not None:
            catching_up = self._on_connect(connection)
            if catching_up is not None:
                # Replaying history runs beside the receive loop, so pongs keep flowing.
                connection.catch_up = asyncio.ensure_future(catching_up)
        return connection

    async def _receive_loop(self, websocket: WebSocket, connection: WebSocketConnection) -> None:
        limits = self.settings.client_limits
        rate = MessageRate(limits.messages_per_second, limits.message_burst)
        while not connection.closing:
            try:
                frame = await websocket.receive()
            except (WebSocketDisconnect, RuntimeError):
                return
            if frame["type"] == "websocket.disconnect":
                return
            connection.last_received = time.monotonic()
            if connection.closing:  # closed by the server meanwhile: process nothing more
                return
            if not rate.allow(connection.last_received):
                self._refuse_for_rate(connection, rate)
                continue
            await self._handle_frame(websocket, connection, frame)

    def _refuse_for_rate(self, connection: WebSocketConnection, rate: MessageRate) -> None:
        limits = self.settings.client_limits
        if rate.strikes > limits.message_burst:
            connection.close(CloseCode.POLICY_VIOLATION, CloseReason.RATE_LIMITED)
            return
        if rate.strikes == 1:  # one answer per run of refusals, not one per message
            _reply_error(
                connection,
                ErrorCode.RATE_LIMITED,
                f"more than {limits.messages_per_second:g} messages per second: message dropped",
            )

    async def _handle_frame(
        self, websocket: WebSocket, connection: WebSocketConnection, frame: Mapping[str, Any]
    ) -> None:
        message = self._decode(connection, frame)
        if message is None:
            return
        kind = message["type"]
        if kind == protocol.PONG:
            return
        if kind == protocol.AUTH:
            placeholders = self.settings.identity_placeholders
            await refresh(connection, message, self._identity(), placeholders)
            return
        protocol_handler = self._protocol_handlers.get(kind)
        if protocol_handler is not None:
            outcome = protocol_handler(connection, message)
            if outcome is not None:
                await outcome
            return
        handler = self.realtime.handler(self.settings.app_slug, self.settings.name)
        if handler is None:
            _reply_error(
                connection,
                ErrorCode.UNKNOWN_TYPE,
                f"no handler for message type {kind!r} on this endpoint",
                message,
            )
            return
        try:
            await handler(websocket, message, connection)
        except Exception:
            if self._stats is not None:
                self._stats.handler_errors += 1
            logger.exception(
                "message handler of %s/%s failed on type %r",
                self.settings.app_slug,
                self.settings.name,
                kind,
            )
            _reply_error(connection, ErrorCode.HANDLER_ERROR, "the message handler failed", message)

    def _decode(
        self, connection: WebSocketConnection, frame: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """The frame as a JSON object with a string `type`, or None after an error reply."""
        text = frame.get("text")
        if text is None:
            _reply_error(connection, ErrorCode.BAD_MESSAGE, "binary frames are not supported")
            return None
        limit = self.settings.max_message_bytes
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            _reply_error(
                connection, ErrorCode.BAD_MESSAGE, f"message larger than {limit} bytes dropped"
            )
            return None
        try:
            message = codec.loads(text)
        except ValueError:
            _reply_error(connection, ErrorCode.BAD_MESSAGE, "message is not valid JSON")
            return None
        if not isinstance(message, dict):
            _reply_error(connection, ErrorCode.BAD_MESSAGE, "message must be a JSON object")
            return None
        if not isinstance(message.get("type"), str):
            _reply_error(
                connection, ErrorCode.BAD_MESSAGE, "message needs a string `type`", message
            )
            return None
        return message


def _reply_error(
    connection: WebSocketConnection,
    code: ErrorCode,
    text: str,
    message: Mapping[str, Any] | None = None,
) -> None:
    ref = message.get("id") if message is not None else None
    if not isinstance(ref, str | int | float | None) or isinstance(ref, bool):
        ref = None
    connection.send_message(protocol.error_message(code, text, ref))


def _closer(
    websocket: WebSocket, abort: Callable[[], None] | None
) -> Callable[[int, str], Awaitable[None]]:
    async def close(code: int, reason: str) -> None:
        try:
            if websocket.application_state is WebSocketState.CONNECTED:
                await asyncio.wait_for(
                    websocket.close(code=code, reason=reason), CLOSE_GRACE_SECONDS
                )
        finally:
            # A peer that stopped reading never receives the close frame: cut the socket.
            if abort is not None:
                asyncio.get_running_loop().call_later(CLOSE_GRACE_SECONDS, abort)

    return close
