"""`{"type": "auth", "id", "token"}`: a client hands over a fresh token without reconnecting.

A valid token for the same identity moves the connection's expiry to the new token's and is
answered `auth_ok`. "The same identity" is the same user id and the same values for every
placeholder the endpoint's scopes read (`$user.email`, `$claims.org_id`, ...): what the
connection may see was decided with those values, so a token that changes them closes the
connection with 1008 `identity changed` (the client reconnects with it and gets fresh views).
An anonymous connection cannot become a user's either. An invalid token is answered
`error` `invalid_token` and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from engine import protocol
from engine.hub import WebSocketConnection
from engine.identity.providers import AppIdentity
from engine.identity.tokens import AuthError, Principal
from engine.protocol import CloseCode, CloseReason, ErrorCode


def identity_key(principal: Principal, placeholders: Iterable[str]) -> tuple[Any, ...]:
    values = principal.placeholder_values()
    return (principal.user_id, *(values.get(name) for name in sorted(placeholders)))


async def refresh(
    connection: WebSocketConnection,
    message: Mapping[str, Any],
    identity: AppIdentity,
    placeholders: Iterable[str],
) -> None:
    ref = message.get("id")
    if not isinstance(ref, str | int | float | None) or isinstance(ref, bool):
        ref = None
    token = message.get("token")
    if not isinstance(token, str) or not token:
        _refuse(connection, "`token` must be a non-empty string", ref)
        return
    try:
        principal = await identity.verify(token)
    except AuthError as refused:
        _refuse(connection, f"token refused ({refused.reason}); nothing changed", ref)
        return
    if connection.closing:
        return
    wanted = tuple(placeholders)
    if identity_key(principal, wanted) != identity_key(connection.principal, wanted):
        connection.close(CloseCode.POLICY_VIOLATION, CloseReason.IDENTITY_CHANGED)
        return
    connection.principal = principal
    connection.user_email = principal.email
    connection.set_expiry(principal.expires_at)
    connection.send_message(protocol.auth_ok_message(ref, principal.expires_at))


def _refuse(connection: WebSocketConnection, text: str, ref: Any) -> None:
    connection.send_message(protocol.error_message(ErrorCode.INVALID_TOKEN, text, ref))
