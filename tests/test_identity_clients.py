"""The Python and browser clients with a token callback: tickets on connect, refresh in place.

Tokens live 3 seconds here, so a client that did not refresh would be closed (`token
expired`) and reconnect; one that refreshes keeps its first connection for longer.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from engine.auth import issue_token
from engine.client import RealtimeClient
from engine.identity.client_tokens import refresh_delay, ticket_url, token_expiry
from tests.conftest import RunningApp
from tests.support import TEST_SECRET

TOKEN_SECONDS = 3


def short_token(user: str = "ann") -> str:
    return issue_token(TEST_SECRET, app_slug="todo", user_id=user, ttl_seconds=TOKEN_SECONDS)


class TokenSource:
    """A get_token callback that counts its calls."""

    def __init__(self, user: str = "ann") -> None:
        self.user = user
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)
        return short_token(self.user)


def test_ticket_url_and_refresh_timing() -> None:
    assert ticket_url("ws://127.0.0.1:8000/todo/ws?x=1") == "http://127.0.0.1:8000/todo/ticket"
    assert ticket_url("wss://h.example/todo/a/b") == "https://h.example/todo/ticket"
    token = short_token()
    expiry = token_expiry(token)
    assert expiry is not None and abs(expiry - (time.time() + TOKEN_SECONDS)) < 2
    assert token_expiry("garbage") is None
    assert refresh_delay(1000.0 + 3600, now=1000.0) == 3600 - 60  # a minute early
    assert refresh_delay(1000.0 + 3, now=1000.0) == pytest.approx(2.4)  # a fifth early
    assert refresh_delay(990.0, now=1000.0) == 0.0


async def test_python_client_refreshes_without_reconnecting(demo_app: RunningApp) -> None:
    source = TokenSource()
    url = demo_app.server.url.replace("http://", "ws://") + "/todo/ws"
    client = RealtimeClient(url, get_token=source)
    refreshed: list[dict[str, Any]] = []
    disconnects: list[dict[str, Any]] = []
    client.on("auth_ok", refreshed.append)
    client.on("disconnected", disconnects.append)
    try:
        hello = await client.connect()
        assert hello["user_id"] == "ann"
        await client.wait_until(lambda: len(refreshed) >= 2, timeout=30)
        assert disconnects == []
        assert client.connected_message is not None
        assert client.connected_message["connection_id"] == hello["connection_id"]
        assert source.calls >= 3  # connect, then each refresh
    finally:
        await client.close()


async def test_python_client_connects_with_tickets(demo_app: RunningApp) -> None:
    source = TokenSource("bob")
    url = demo_app.server.url.replace("http://", "ws://") + "/todo/ws"
    client = RealtimeClient(url, get_token=source, use_ticket=True)
    try:
        hello = await client.connect()
        assert hello["user_id"] == "bob" and source.calls == 1
        reply = client.next_message("auth_ok", timeout=30)
        assert (await reply)["expires_at"].endswith("Z")
    finally:
        await client.close()
    assert "token=" not in demo_app.server.logs()


def test_python_client_takes_a_token_or_a_callback_not_both() -> None:
    with pytest.raises(ValueError, match="either token or get_token"):
        RealtimeClient("ws://127.0.0.1:1/todo/ws", token="t", get_token=lambda: "t")


# -- the browser client ------------------------------------------------------------------------


@pytest.fixture
def page_module() -> Iterator[Any]:
    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no Chromium at /usr/bin/chromium (apt-get install chromium)")
    yield pytest.importorskip("tests.test_browser")


BROWSER_CLIENT = """async ([useTicket]) => {
    const { RealtimeClient } = await import("/static/realtime.js");
    window.seen = [];
    const client = new RealtimeClient("/todo/ws", {
        getToken: () => window.mintToken(),
        useTicket,
        backoff: { initialMs: 50, maxMs: 200 },
    });
    client.on("*", (message) => window.seen.push(message));
    client.on("disconnected", (message) => window.seen.push(message));
    window.client = client;
    client.connect();
}"""


@pytest.mark.parametrize("use_ticket", [True, False])
async def test_browser_client_uses_get_token_for_tickets_and_refresh(
    page_module: Any, demo_app: RunningApp, use_ticket: bool
) -> None:
    from playwright.async_api import async_playwright

    minted: list[str] = []

    def mint() -> str:
        minted.append(short_token("ann"))
        return minted[-1]

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=page_module.CHROMIUM_ARGS
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            sockets: list[str] = []
            page.on("websocket", lambda ws: sockets.append(ws.url))
            await page.expose_function("mintToken", mint)
            await page.goto(f"{demo_app.server.url}/static/realtime.js")
            await page.evaluate(BROWSER_CLIENT, [use_ticket])
            await page.wait_for_function(
                "window.seen.filter(m => m.type === 'auth_ok').length >= 2", timeout=30_000
            )
            seen = await page.evaluate("window.seen")
            assert errors == []
        finally:
            await browser.close()
    kinds = [message["type"] for message in seen]
    assert kinds.count("connected") == 1 and "disconnected" not in kinds, kinds
    assert len(minted) >= 3
    assert len(sockets) == 1
    if use_ticket:
        assert "ticket=mrt_" in sockets[0] and "token=" not in sockets[0]
    else:
        assert "token=" in sockets[0]
