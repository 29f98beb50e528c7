"""Token verification for one app: the engine secret (HS256) or an identity provider's keys.

A token's `alg` header picks the way: an algorithm of the engine secret (HS256 by default)
is checked with the secret, as before; an asymmetric one (RS256, ES256, EdDSA, ...) with the
provider's key that the token's `kid` names, fetched from the configured JWKS URL, with the
configured `issuer` and `audience`. Nothing in a token chooses its own key: tokens carrying
`jku`, `x5u`, `x5c` or an embedded `jwk` are refused, a JWKS key verifies only tokens of its
own algorithm, and symmetric keys from a JWKS are never used (so a token "signed" with a
provider's public key as an HMAC secret has nothing to verify against).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import jwt
from jwt import PyJWK

from engine.identity.jwks import JwksKeys, JwksTiming
from engine.identity.tokens import AuthError, Principal, TokenVerifier, principal_from_claims
from engine.protocol import CloseReason

if TYPE_CHECKING:
    from engine.identity.tickets import TicketStore

PROVIDER_ALGORITHMS: tuple[str, ...] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
DEFAULT_PROVIDER_ALGORITHMS: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
UNTRUSTED_KEY_HEADERS: tuple[str, ...] = ("jku", "x5u", "x5c", "jwk")
DEFAULT_TICKET_TTL_SECONDS = 30
# A provider's clock and ours may differ a little: `iat` and `nbf` get this much slack
# (a token issued "in the future" by a few seconds is fine). `exp` gets none, so that a
# connection is never accepted with a token its expiry timer would close at once.
PROVIDER_CLOCK_SKEW_SECONDS = 30.0


def check_jwks_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http(s) URL, got {url!r}")
    return url


def check_algorithms(algorithms: Sequence[str]) -> tuple[str, ...]:
    unknown = [a for a in algorithms if a not in PROVIDER_ALGORITHMS]
    if unknown or not algorithms:
        raise ValueError(
            f"must list provider algorithms among {', '.join(PROVIDER_ALGORITHMS)}"
            + (f"; not {', '.join(map(repr, unknown))}" if unknown else "")
            + " (HS256 tokens are checked with the engine secret)"
        )
    return tuple(algorithms)


@dataclass(frozen=True)
class ProviderConfig:
    """Where an identity provider's keys are and what its tokens must say."""

    jwks_url: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()  # the token's `aud` must hold one of them
    algorithms: tuple[str, ...] = DEFAULT_PROVIDER_ALGORITHMS

    def overridden_by(self, values: Mapping[str, Any]) -> ProviderConfig:
        """This configuration with the keys an app's `auth.jwt` sets replacing the engine's."""
        changes: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        if isinstance(changes.get("audience"), str):
            changes["audience"] = (changes["audience"],)
        for name in ("audience", "algorithms"):
            if name in changes:
                changes[name] = tuple(changes[name])
        return replace(self, **changes)


class AppIdentity:
    """Verifies the tokens and tickets of one app."""

    def __init__(
        self,
        app_slug: str,
        secret: TokenVerifier,
        provider: ProviderConfig | None = None,
        keys: JwksKeys | None = None,
        identity: Identity | None = None,
        ticket_ttl_seconds: int = DEFAULT_TICKET_TTL_SECONDS,
    ) -> None:
        self.app_slug = app_slug
        self.secret = secret
        self.provider = provider if provider is not None and provider.jwks_url else None
        self.keys = keys
        self._identity = identity
        self.ticket_ttl_seconds = ticket_ttl_seconds

    @property
    def tickets(self) -> TicketStore | None:
        return self._identity.tickets if self._identity is not None else None

    async def verify(self, token: str) -> Principal:
        """The principal a token names, or AuthError with the reason to close with."""
        header = _header(token)
        if any(name in header for name in UNTRUSTED_KEY_HEADERS):
            raise AuthError(CloseReason.INVALID_TOKEN)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError(CloseReason.INVALID_TOKEN)
        if alg in self.secret.algorithms:
            return self.secret.verify(token, self.app_slug)
        provider, keys = self.provider, self.keys
        if provider is None or keys is None or alg not in provider.algorithms:
            raise AuthError(CloseReason.INVALID_TOKEN)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(CloseReason.INVALID_TOKEN)
        key = await keys.key_for(kid)
        if key is None:
            raise AuthError(CloseReason.INVALID_TOKEN)
        claims = self._provider_claims(token, key, alg, provider)
        principal = principal_from_claims(
            claims, self.app_slug, audience_checked=bool(provider.audience)
        )
        if principal.expires_at is not None and principal.expires_at <= time.time():
            raise AuthError(CloseReason.TOKEN_EXPIRED)
        return principal

    def _provider_claims(
        self, token: str, key: PyJWK, alg: str, provider: ProviderConfig
    ) -> dict[str, Any]:
        required = ["exp"]
        if provider.issuer is not None:
            required.append("iss")
        if provider.audience:
            required.append("aud")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,  # a PyJWK: PyJWT verifies with the key's own algorithm only
                algorithms=[alg],
                issuer=provider.issuer,
                audience=list(provider.audience) or None,
                leeway=max(self.secret.leeway_seconds, PROVIDER_CLOCK_SKEW_SECONDS),
                options={"require": required, "verify_aud": bool(provider.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(CloseReason.TOKEN_EXPIRED) from None
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            raise AuthError(CloseReason.INVALID_TOKEN) from None
        return claims

    async def redeem_ticket(self, ticket: str) -> Principal:
        """The principal a ticket was issued to; the ticket is used up. AuthError otherwise."""
        store = self.tickets
        principal = None if store is None else await store.redeem(self.app_slug, ticket)
        if principal is None:
            raise AuthError(CloseReason.INVALID_TICKET)
        return principal


def _header(token: str) -> dict[str, Any]:
    try:
        header: dict[str, Any] = jwt.get_unverified_header(token)
    except (jwt.PyJWTError, ValueError, TypeError):
        raise AuthError(CloseReason.INVALID_TOKEN) from None
    return header


class Identity:
    """The engine's identity settings: its secret, its default provider, every app's view."""

    def __init__(
        self,
        secret: TokenVerifier,
        provider: ProviderConfig | None = None,
        timing: JwksTiming | None = None,
    ) -> None:
        self.secret = secret
        self.provider = provider or ProviderConfig()
        self.timing = timing or JwksTiming()
        self.tickets: TicketStore | None = None  # set once the engine has a database
        self._keys: dict[str, JwksKeys] = {}
        self._apps: dict[str, AppIdentity] = {}
        if self.provider.jwks_url:
            self.keys_at(self.provider.jwks_url)

    def keys_at(self, url: str) -> JwksKeys:
        """One key cache per JWKS URL, shared by the apps that use it."""
        keys = self._keys.get(url)
        if keys is None:
            keys = self._keys[url] = JwksKeys(url, self.timing)
        return keys

    def for_app(
        self,
        app_slug: str,
        app_jwt: Mapping[str, Any] | None = None,
        ticket_ttl_seconds: int = DEFAULT_TICKET_TTL_SECONDS,
    ) -> AppIdentity:
        """The verifier of an app (built once; later calls return the same one)."""
        existing = self._apps.get(app_slug)
        if existing is not None:
            return existing
        provider = self.provider.overridden_by(app_jwt or {})
        keys = self.keys_at(provider.jwks_url) if provider.jwks_url else None
        app = AppIdentity(app_slug, self.secret, provider, keys, self, ticket_ttl_seconds)
        self._apps[app_slug] = app
        return app

    async def start(self) -> None:
        """Fetch every provider's keys once (failures are reported by `problems`)."""
        for keys in self._keys.values():
            await keys.refresh()

    async def problems(self) -> list[str]:
        """Key sets that could not be fetched yet (retried here, at most as often as a token
        with an unknown `kid` may retry)."""
        found = []
        for url, keys in self._keys.items():
            if not keys.loaded and keys.may_fetch():
                await keys.refresh()
            if not keys.loaded:
                found.append(f"JWKS {url} cannot be fetched ({keys.last_error or 'not yet'})")
        return found
