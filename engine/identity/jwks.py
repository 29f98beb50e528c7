"""Public keys of an identity provider, from its JWKS URL, cached and refreshed.

PyJWT fetches and parses the key set (`PyJWKClient`, `PyJWKSet`); this module decides when
to fetch. Fetches run in a thread, so the event loop never waits on the provider. A token
whose `kid` is unknown triggers one refetch, at most once per `min_refetch_seconds` however
many such tokens arrive (a flood of made-up `kid`s cannot hammer the provider). Keys are
also refreshed in the background once they are `max_age_seconds` old, so a key the provider
withdrew stops being accepted. When a fetch fails the keys already held keep working.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import jwt
from jwt import PyJWK, PyJWKClient, PyJWKSet

logger = logging.getLogger("engine.identity.jwks")

DEFAULT_MIN_REFETCH_SECONDS = 10.0
DEFAULT_MAX_AGE_SECONDS = 300.0
FETCH_TIMEOUT_SECONDS = 5.0

# Symmetric keys have no place in a provider's public key set: never verify with one.
_PUBLIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})


@dataclass(frozen=True)
class JwksTiming:
    min_refetch_seconds: float = DEFAULT_MIN_REFETCH_SECONDS
    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS
    fetch_timeout_seconds: float = FETCH_TIMEOUT_SECONDS


class JwksKeys:
    """The keys behind one JWKS URL."""

    def __init__(
        self,
        url: str,
        timing: JwksTiming | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timing = timing or JwksTiming()
        self._clock = clock
        self._client = PyJWKClient(
            url,
            cache_jwk_set=False,
            cache_keys=False,
            timeout=self.timing.fetch_timeout_seconds,
        )
        self._keys: dict[str | None, PyJWK] | None = None  # None: never fetched
        self._fetched_at = 0.0  # when the keys held were fetched
        self._attempted_at: float | None = None  # when the last fetch started
        self._fetching: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.fetches = 0

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    async def key_for(self, kid: str | None) -> PyJWK | None:
        """The key a token's `kid` names; None when the provider does not have it."""
        key = self._lookup(kid)
        if key is not None:
            if self._clock() - self._fetched_at >= self.timing.max_age_seconds:
                self._refresh_in_background()
            return key
        if self._fetching is None and not self.may_fetch():
            return None  # asked too recently: the key set is what the provider had just now
        await self.refresh()
        return self._lookup(kid)

    async def refresh(self) -> None:
        """Fetch the key set now (joining a fetch in progress); keeps the old keys on failure."""
        if self._fetching is None:
            self._fetching = asyncio.create_task(self._fetch(), name=f"jwks {self.url}")
        await asyncio.shield(self._fetching)

    def may_fetch(self) -> bool:
        if self._attempted_at is None:
            return True
        return self._clock() - self._attempted_at >= self.timing.min_refetch_seconds

    def _refresh_in_background(self) -> None:
        if self._fetching is None and self.may_fetch():
            self._fetching = asyncio.create_task(self._fetch(), name=f"jwks {self.url}")

    async def _fetch(self) -> None:
        self._attempted_at = self._clock()
        self.fetches += 1
        try:
            key_set = await asyncio.to_thread(self._client.get_jwk_set, True)
            self._keys = _index(key_set)
            self._fetched_at = self._clock()
            self.last_error = None
        except (jwt.PyJWTError, OSError, ValueError) as error:
            self.last_error = f"{type(error).__name__}: {error}"
            logger.warning("cannot fetch the JWKS at %s: %s", self.url, self.last_error)
        finally:
            self._fetching = None

    def _lookup(self, kid: str | None) -> PyJWK | None:
        if self._keys is None:
            return None
        if kid is None:
            # A token without `kid` is only unambiguous when the provider has one key.
            keys = list(self._keys.values())
            return keys[0] if len(keys) == 1 else None
        return self._keys.get(kid)


def _index(key_set: PyJWKSet) -> dict[str | None, PyJWK]:
    return {
        key.key_id: key
        for key in key_set.keys
        if key.key_type in _PUBLIC_KEY_TYPES and key.public_key_use in (None, "sig")
    }
