"""Message shapes, close codes and error codes of the WebSocket protocol (SPEC 5)."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any

from engine.codec import iso_utc, utc_now_iso

PROTOCOL_VERSION = 1


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008  # authentication failures
    TRY_AGAIN_LATER = 1013  # slow consumer: the outgoing queue overflowed
    KEEPALIVE_TIMEOUT = 4408  # nothing received for 2 x ping_interval


class CloseReason(StrEnum):
    AUTH_REQUIRED = "authentication required"
    INVALID_TOKEN = "invalid token"
    TOKEN_EXPIRED = "token expired"
    SLOW_CONSUMER = "slow consumer"
    KEEPALIVE_TIMEOUT = "keepalive timeout"
    TOO_MANY_CONNECTIONS = "too many connections"
    RATE_LIMITED = "rate limited"
    INVALID_TICKET = "invalid ticket"
    IDENTITY_CHANGED = "identity changed"


class ErrorCode(StrEnum):
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    FORBIDDEN_FILTER = "forbidden_filter"
    HANDLER_ERROR = "handler_error"
    RATE_LIMITED = "rate_limited"
    INVALID_TOKEN = "invalid_token"
    FORBIDDEN_ROOM = "forbidden_room"  # the room's join rule refused this connection
    UNKNOWN_ROOM = "unknown_room"  # no room pattern of the endpoint matches the name
    FORBIDDEN_PUBLISH = "forbidden_publish"  # the room takes no messages from this connection


# Client message types the engine answers itself; every other type goes to the app's handler.
PONG = "pong"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
AUTH = "auth"
JOIN = "join"  # rooms (SPEC 11), on endpoints that declare `rooms`
LEAVE = "leave"
PUBLISH = "publish"


def connected_message(
    *,
    app_slug: str,
    endpoint: str,
    connection_id: str,
    user_id: str | None,
    user_email: str | None,
    ping_interval: int,
) -> dict[str, Any]:
    return {
        "type": "connected",
        "app_slug": app_slug,
        "endpoint": endpoint,
        "connection_id": connection_id,
        "authenticated": user_id is not None,
        "user_id": user_id,
        "user_email": user_email,
        "ping_interval": ping_interval,
        "protocol": PROTOCOL_VERSION,
        "timestamp": utc_now_iso(),
    }


def ping_message() -> dict[str, Any]:
    return {"type": "ping", "timestamp": utc_now_iso()}


def error_message(code: ErrorCode, message: str, ref: Any = None) -> dict[str, Any]:
    return {"type": "error", "code": str(code), "message": message, "ref": ref}


def auth_ok_message(ref: Any, expires_at: float | None) -> dict[str, Any]:
    """The answer to `auth`: the connection now closes at `expires_at` (ISO-8601 UTC)."""
    return {"type": "auth_ok", "id": ref, "expires_at": iso_utc(expires_at)}


def stamp_app_message(message: dict[str, Any], app_slug: str) -> dict[str, Any]:
    """An app message with `app_slug` and `timestamp` added where absent, never overwritten."""
    stamped = dict(message)
    stamped.setdefault("app_slug", app_slug)
    stamped.setdefault("timestamp", utc_now_iso())
    return stamped


# -- rooms (SPEC 11) -------------------------------------------------------------------------


def joined_message(
    ref: Any,
    room: str,
    members: list[dict[str, Any]] | None = None,
    history: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": "joined", "id": ref, "room": room}
    if members is not None:
        message["members"] = members
    if history is not None:
        message["history"] = history
    return message


def left_message(ref: Any, room: str) -> dict[str, Any]:
    return {"type": "left", "id": ref, "room": room}


def published_message(ref: Any, message_id: str) -> dict[str, Any]:
    return {"type": "published", "id": ref, "message_id": message_id}


def room_message(
    room: str,
    message_id: str,
    sender: dict[str, Any],
    data: Any,
    timestamp: str,
    event_id: str | None = None,
) -> dict[str, Any]:
    """A message to a room's members; `id`, when known, is its resume position (SPEC 6)."""
    message: dict[str, Any] = {
        "type": "room_message",
        "room": room,
        "message_id": message_id,
        "from": sender,
        "data": data,
        "timestamp": timestamp,
    }
    if event_id is not None:
        message["id"] = event_id
    return message
