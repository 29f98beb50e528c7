"""Access tokens: where a handshake carries them, how they are verified, how dev tokens are made.

Rules (SPEC 4): HS256 by default; the user id is `sub`, else `user_id`; tokens without `exp`,
with `alg: none` or another algorithm than configured, with a `type` other than `access`, or
with an `aud` that does not contain the app's slug are rejected.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from starlette.requests import cookie_parser

from engine.protocol import CloseReason

DEFAULT_ALGORITHMS: tuple[str, ...] = ("HS256",)
SECRET_FILE_NAME = "jwt_secret"
TOKEN_COOKIES: tuple[str, ...] = ("ws_token", "token")
MAX_CLAIM_PATHS = 256  # placeholder values one token can define; a token is not a database


class AuthError(Exception):
    """A token was refused; `reason` is the short close reason the client sees."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(str(reason))
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """Who is on the other end of a connection."""

    user_id: str | None = None
    email: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    expires_at: float | None = None  # unix time

    @property
    def authenticated(self) -> bool:
        return self.user_id is not None

    def placeholder_values(self) -> dict[str, Any]:
        """Values for scope placeholders: `$user.id`, `$user.email`, `$claims.<name>`."""
        values: dict[str, Any] = {"$user.id": self.user_id, "$user.email": self.email}
        if self.authenticated:
            for name, value in claim_paths(self.claims):
                values.setdefault(f"$claims.{name}", value)
        return values


def claim_paths(claims: Mapping[str, Any], depth: int = 4) -> list[tuple[str, Any]]:
    """Every claim by its name, then claims inside objects by dotted path
    (`realm_access.roles`). A claim whose own name holds dots
    (`https://example.com/roles`) is found by that name: top-level names come first."""
    found: list[tuple[str, Any]] = [(str(name), value) for name, value in claims.items()]
    level = [(str(name), value) for name, value in claims.items() if isinstance(value, Mapping)]
    for _ in range(depth):
        nested = [
            (f"{prefix}.{name}", value)
            for prefix, document in level
            for name, value in document.items()
            if len(found) < MAX_CLAIM_PATHS
        ]
        found.extend(nested)
        level = [(path, value) for path, value in nested if isinstance(value, Mapping)]
        if not level:
            break
    return found[:MAX_CLAIM_PATHS]


ANONYMOUS = Principal()


def _all_values(params: Mapping[str, str], name: str) -> list[str]:
    getlist = getattr(params, "getlist", None)
    if callable(getlist):
        return list(getlist(name))
    value = params.get(name)
    return [value] if value is not None else []


def extract_ticket(query_params: Mapping[str, str]) -> str | None:
    """The `?ticket=` of a handshake; when present it is the credential and tokens are not read."""
    tickets = _all_values(query_params, "ticket")
    if len(set(tickets)) > 1:
        raise AuthError(CloseReason.INVALID_TICKET)
    return tickets[0] if tickets and tickets[0] else None


def extract_token(
    query_params: Mapping[str, str],
    headers: Mapping[str, str],
) -> str | None:
    """The token of a handshake, first found wins: query `token`, Bearer header, cookies."""
    tokens = _all_values(query_params, "token")
    if len(set(tokens)) > 1:
        # `?token=a&token=b`: readers of the URL disagree on which counts; refuse both.
        raise AuthError(CloseReason.INVALID_TOKEN)
    if tokens and tokens[0]:
        return tokens[0]
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    # Starlette's parser, as browsers do: one malformed cookie does not hide the others.
    cookies = cookie_parser(headers.get("cookie", ""))
    for name in TOKEN_COOKIES:
        if cookies.get(name):
            return cookies[name]
    return None


@dataclass(frozen=True)
class TokenVerifier:
    secret: str
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    leeway_seconds: float = 0.0

    def claims(self, token: str) -> dict[str, Any]:
        """The claims of a well-signed, unexpired token (with `exp`); AuthError otherwise."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.secret,
                algorithms=list(self.algorithms),
                leeway=self.leeway_seconds,
                options={"require": ["exp"], "verify_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CloseReason.TOKEN_EXPIRED) from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            raise AuthError(CloseReason.INVALID_TOKEN) from None
        if not _finite_number(claims.get("exp")):
            raise AuthError(CloseReason.INVALID_TOKEN)
        return claims

    def verify(self, token: str, app_slug: str) -> Principal:
        """The principal a token names, or AuthError with the reason to close with."""
        return principal_from_claims(self.claims(token), app_slug)


def principal_from_claims(
    claims: Mapping[str, Any], app_slug: str, *, audience_checked: bool = False
) -> Principal:
    """The principal of verified claims; AuthError when they do not name a user of the app.

    Without a configured audience (`audience_checked` False), an `aud` must name the app.
    """
    if not _type_allowed(claims) or not _finite_number(claims.get("exp")):
        raise AuthError(CloseReason.INVALID_TOKEN)
    if not audience_checked and not _audience_allowed(claims, app_slug):
        raise AuthError(CloseReason.INVALID_TOKEN)
    user_id = claims.get("sub") or claims.get("user_id")
    if user_id is None or isinstance(user_id, dict | list):
        raise AuthError(CloseReason.INVALID_TOKEN)
    email = claims.get("email")
    return Principal(
        user_id=str(user_id),
        email=email if isinstance(email, str) else None,
        claims=dict(claims),
        expires_at=float(claims["exp"]),
    )


def _finite_number(value: Any) -> bool:
    try:
        return (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and (abs(float(value)) < 1e15)
        )
    except OverflowError:
        return False


def _type_allowed(claims: Mapping[str, Any]) -> bool:
    return "type" not in claims or claims["type"] == "access"


def _audience_allowed(claims: Mapping[str, Any], app_slug: str) -> bool:
    if "aud" not in claims:
        return True
    audience = claims["aud"]
    if isinstance(audience, str):
        return audience == app_slug
    return isinstance(audience, list) and app_slug in audience


def issue_token(
    secret: str,
    *,
    app_slug: str,
    user_id: str,
    email: str | None = None,
    ttl_seconds: int = 3600,
    claims: Mapping[str, Any] | None = None,
    algorithm: str = DEFAULT_ALGORITHMS[0],
) -> str:
    """A signed access token for `user_id`, valid for `app_slug` only."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": user_id,
        "aud": app_slug,
        "type": "access",
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if email:
        payload["email"] = email
    payload.update(claims or {})
    return jwt.encode(payload, secret, algorithm=algorithm)


# Where the signing secret comes from, first set wins: the engine's own variable, SECRET_KEY
# (SPEC 2), then the names mdb-engine reads.
SECRET_ENVIRONMENT = (
    "MDB_REALTIME_JWT_SECRET",
    "SECRET_KEY",
    "MDB_ENGINE_JWT_SECRET",
    "MDB_JWT_SECRET",
)


def resolve_secret(data_dir: str | Path, environ: Mapping[str, str] | None = None) -> str:
    """The first variable of SECRET_ENVIRONMENT that is set, else a secret generated once in
    the data folder.

    The generated secret lets `serve` and `token` work together on a fresh machine.
    """
    env = os.environ if environ is None else environ
    for name in SECRET_ENVIRONMENT:
        if env.get(name):
            return env[name]
    path = Path(data_dir) / SECRET_FILE_NAME
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    # Create with owner-only permissions; if another process won the race, use its secret.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(secret)
    return secret
