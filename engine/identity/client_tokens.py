"""The client side of identity: tickets and token refresh for `engine.client.RealtimeClient`.

A client with a token callback (`get_token`) asks it for a token when it connects, trades it
for a ticket when told to (so the token never travels in a URL), and before the token
expires asks for a fresh one and sends `{"type": "auth"}`, so the connection stays open.
The browser client (`engine/static/realtime.js`) follows the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import jwt

logger = logging.getLogger("engine.client")

GetToken = Callable[[], str | Awaitable[str]]
SendMessage = Callable[[dict[str, Any]], Awaitable[None]]

REFRESH_MARGIN_SECONDS = 60.0  # refresh this long before expiry (less for short tokens)
RETRY_SECONDS = 5.0  # after a refused refresh, try again this soon (if time is left)


class TicketRefused(Exception):
    """`POST /<slug>/ticket` did not give a ticket."""

    def __init__(self, status: int | None, detail: str) -> None:
        super().__init__(f"ticket refused ({status}): {detail}" if status else detail)
        self.status = status
        self.detail = detail


async def call_token_source(get_token: GetToken) -> str:
    token = get_token()
    return await token if inspect.isawaitable(token) else token


def token_expiry(token: str) -> float | None:
    """The token's `exp` as the client reads it (no signature check: the server does that)."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def ticket_url(websocket_url: str) -> str:
    """`ws(s)://host/<slug>/<path>` -> `http(s)://host/<slug>/ticket`."""
    parts = urlsplit(websocket_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    slug = parts.path.strip("/").split("/", 1)[0]
    return urlunsplit((scheme, parts.netloc, f"/{slug}/ticket", "", ""))


async def fetch_ticket(url: str, token: str, timeout: float = 10.0) -> str:
    """A ticket for `token` (the request runs in a thread: the event loop does not wait)."""

    def post() -> str:
        request = urllib.request.Request(
            url, method="POST", data=b"", headers={"Authorization": f"Bearer {token}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            with contextlib.closing(error):
                detail = error.read().decode("utf-8", "replace")
            raise TicketRefused(error.code, detail) from None
        except (OSError, ValueError) as error:
            raise TicketRefused(None, f"cannot get a ticket: {error}") from None
        ticket = body.get("ticket") if isinstance(body, dict) else None
        if not isinstance(ticket, str):
            raise TicketRefused(None, "the ticket answer has no ticket")
        return ticket

    return await asyncio.to_thread(post)


def refresh_delay(expires_at: float, now: float | None = None) -> float:
    """Seconds until a token expiring at `expires_at` should be refreshed."""
    remaining = expires_at - (time.time() if now is None else now)
    margin = min(REFRESH_MARGIN_SECONDS, remaining / 5)
    return max(0.0, remaining - margin)


class TokenRefresher:
    """Refreshes one open connection's token before it expires."""

    def __init__(self, get_token: GetToken, send: SendMessage) -> None:
        self._get_token = get_token
        self._send = send
        self._task: asyncio.Task[None] | None = None
        self._expires_at: float | None = None
        self._count = 0
        self._waiting_for: str | None = None  # id of the `auth` message sent

    def start(self, token: str | None) -> None:
        """The connection opened with `token`: schedule its refresh."""
        self.schedule(token_expiry(token) if token else None)

    def schedule(self, expires_at: float | None) -> None:
        self.stop()
        self._expires_at = expires_at
        if expires_at is not None:
            self._task = asyncio.create_task(self._refresh_at(refresh_delay(expires_at)))

    def stop(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None

    def on_message(self, message: dict[str, Any]) -> None:
        """Watch the server's answers to our `auth` messages."""
        waiting, kind = self._waiting_for, message.get("type")
        if waiting is None:
            return
        if kind == "auth_ok" and message.get("id") == waiting:
            self._waiting_for = None
            self.schedule(_unix_time(message.get("expires_at")))
        elif kind == "error" and message.get("ref") == waiting:
            self._waiting_for = None
            logger.warning("token refresh refused: %s", message.get("message"))
            remaining = (self._expires_at or 0.0) - time.time()
            if remaining > RETRY_SECONDS:
                self._task = asyncio.create_task(self._refresh_at(RETRY_SECONDS))

    async def _refresh_at(self, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            token = await call_token_source(self._get_token)
        except Exception:
            logger.exception("the token source failed; the connection closes at expiry")
            return
        self._count += 1
        self._waiting_for = f"auth-{self._count}"
        with contextlib.suppress(Exception):  # a closed socket: the client reconnects anyway
            await self._send({"type": "auth", "id": self._waiting_for, "token": token})


def _unix_time(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
