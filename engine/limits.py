"""Limits that keep one client, user or address from taking more than its share."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientLimits:
    """Per-connection and per-principal bounds (0 disables a bound)."""

    connections_per_user: int = 100  # per app
    # Off by default: behind a proxy every user comes from its address. Counts the address
    # uvicorn reports, which is the real client's when proxy headers are trusted.
    connections_per_ip: int = 0  # per engine process
    messages_per_second: float = 50.0  # sustained, per connection
    message_burst: int = 100  # messages allowed at once above the rate
    subscriptions_per_connection: int = 100


class MessageRate:
    """A token bucket: `rate` messages per second, bursts up to `burst`.

    `allow` answers for each incoming message; `strikes` counts refusals in a row, so a client
    that keeps sending after being told is closed rather than answered forever.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens", "strikes")

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self.strikes = 0

    def allow(self, now: float | None = None) -> bool:
        if self._rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            self.strikes = 0
            return True
        self.strikes += 1
        return False


class AddressCounter:
    """Open connections per client address on this process."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()

    def try_add(self, address: str, limit: int) -> bool:
        if limit > 0 and self._open[address] >= limit:
            return False
        self._open[address] += 1
        return True

    def remove(self, address: str) -> None:
        self._open[address] -= 1
        if self._open[address] <= 0:
            del self._open[address]
