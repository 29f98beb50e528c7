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


# Client message types the engine answers itself; every other type goes to the app's handler.
PONG = "pong"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
AUTH = "auth"


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
