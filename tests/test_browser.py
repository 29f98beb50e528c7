"""The demo page and the browser client in a real browser (headless Chromium via Playwright).

Chromium comes from Debian (`/usr/bin/chromium`): Playwright's own browser download does not
work here. Skipped when either is missing; `.ci/run` installs both.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from engine.auth import issue_token
from tests.conftest import RunningApp
from tests.cut_proxy import CutProxy
from tests.fake_server import change_message, connected_message, fake_server
from tests.support import TEST_SECRET

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.async_api")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            tab = await browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda error: errors.append(str(error)))
            yield tab
            assert not errors, f"errors in the page: {errors}"
        finally:
            await browser.close()


@pytest.fixture
async def db(demo_app: RunningApp) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(demo_app.mongo_uri)
    database = mongo[demo_app.db_name]
    await database["todo_todos"].delete_many({})
    try:
        yield database
    finally:
        await mongo.close()


def token_for(user: str, **claims: Any) -> str:
    return issue_token(TEST_SECRET, app_slug="todo", user_id=user, claims=claims)


async def open_demo(page: Any, base_url: str, user: str = "ann") -> None:
    await page.goto(f"{base_url}/todo/?token={token_for(user)}")
    await page.wait_for_selector("#status.open", timeout=10_000)


async def test_page_shows_writes_live(
    page: Any, demo_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    await open_demo(page, demo_app.server.url)
    assert "token=" not in page.url  # taken out of the address bar
    assert await page.inner_text("#who") == "ann"
    todos = db["todo_todos"]

    await todos.insert_one({"_id": "milk", "title": "Buy <b>milk</b>", "owner_id": "ann"})
    await todos.insert_one({"_id": "bobs", "title": "Not for ann", "owner_id": "bob"})
    milk = page.locator('#todos li[data-id="milk"]')
    await milk.wait_for(timeout=5_000)
    assert await milk.locator(".title").inner_text() == "Buy <b>milk</b>"  # text, not markup

    await todos.update_one({"_id": "milk"}, {"$set": {"done": True}})
    await page.wait_for_selector('#todos li.done[data-id="milk"]', timeout=5_000)
    await db["todo_announcements"].insert_one({"_id": "a1", "text": "Standup in 5"})
    await page.wait_for_selector('#announcements li[data-id="a1"]', timeout=5_000)

    service = token_for("backend", role="service")
    async with httpx.AsyncClient(base_url=demo_app.server.url) as http:
        response = await http.post(
            "/todo/broadcast",
            json={"message": {"type": "notice", "text": "deploy at 5"}, "user_id": "ann"},
            headers={"Authorization": f"Bearer {service}"},
        )
    assert response.json() == {"reached": 1}
    await page.wait_for_function(
        "document.querySelector('#notices').innerText.includes('deploy at 5')", timeout=5_000
    )

    await todos.delete_one({"_id": "milk"})
    await page.wait_for_selector('#todos li[data-id="milk"]', state="detached", timeout=5_000)
    assert await page.locator('#todos li[data-id="bobs"]').count() == 0


async def test_page_catches_up_after_losing_its_socket(
    page: Any, demo_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    """Needs server-side resume (SPEC 6): the page reconnects with `last_event_id`."""
    port = int(demo_app.server.url.rsplit(":", 1)[1])
    proxy = await CutProxy("127.0.0.1", port).start()
    try:
        todos = db["todo_todos"]
        await todos.insert_one({"_id": "before", "title": "there before", "owner_id": "ann"})
        await open_demo(page, proxy.url)
        await page.wait_for_selector('#todos li[data-id="before"]', timeout=5_000)
        await todos.insert_one({"_id": "seen", "title": "seen live", "owner_id": "ann"})
        await page.wait_for_selector('#todos li[data-id="seen"]', timeout=5_000)

        await proxy.cut()
        await page.wait_for_function("window.realtime.state !== 'open'", timeout=5_000)
        await todos.insert_one({"_id": "missed", "title": "written while away", "owner_id": "ann"})
        await todos.delete_one({"_id": "seen"})
        await page.wait_for_timeout(300)  # the page keeps trying meanwhile, and is refused
        proxy.restore()

        await page.wait_for_selector('#todos li[data-id="missed"]', timeout=15_000)
        await page.wait_for_selector('#todos li[data-id="seen"]', state="detached", timeout=5_000)
        assert await page.locator('#todos li[data-id="before"]').count() == 1
        assert await page.inner_text("#status") == "live"
        # The page joined its presence room again, on the new connection.
        await page.wait_for_function(
            "window.realtime.members('page').map(m => m.connection_id).join() === "
            "window.realtime.connected.connection_id",
            timeout=10_000,
        )
    finally:
        await proxy.close()


async def test_two_pages_see_who_is_looking_and_one_leaving(
    page: Any, demo_app: RunningApp
) -> None:
    """The demo's "page" room tracks presence: each tab lists the others, live (SPEC 11)."""
    await open_demo(page, demo_app.server.url, "ann")
    await page.wait_for_selector('#viewers li:has-text("ann (you)")', timeout=10_000)
    context = await page.context.browser.new_context()  # a second browser window
    other = await context.new_page()
    try:
        await open_demo(other, demo_app.server.url, "bob")
        await page.wait_for_selector('#viewers li:has-text("bob")', timeout=10_000)
        await other.wait_for_selector('#viewers li:has-text("ann")', timeout=10_000)
        assert await other.inner_text('#viewers li:has-text("bob")') == "bob (you)"
        members = await page.evaluate("window.realtime.members('page').map(m => m.user_id).sort()")
        assert members == ["ann", "bob"]
        # The page's room takes no client messages: the promise rejects with the code.
        refused = await page.evaluate("window.realtime.publish('page', {x: 1}).catch(e => e.code)")
        assert refused == "forbidden_publish"
    finally:
        await context.close()
    await page.wait_for_selector('#viewers li:has-text("bob")', state="detached", timeout=15_000)
    assert await page.locator("#viewers li").count() == 1


async def test_page_without_token_asks_for_one(page: Any, demo_app: RunningApp) -> None:
    await page.goto(f"{demo_app.server.url}/todo/")
    await page.wait_for_selector("#login:not(.hidden)", timeout=5_000)
    await page.fill("#token-input", "not-a-token")
    await page.click("#login button")
    await page.wait_for_selector("#login-error:has-text('invalid token')", timeout=10_000)


CLIENT_SETUP = """async (url) => {
    const { RealtimeClient } = await import("/static/realtime.js");
    const client = new RealtimeClient(url, { token: "T0", backoff: { initialMs: 50, maxMs: 200 } });
    window.client = client;
    window.seen = [];
    client.on("*", (message) => window.seen.push(message));
    client.on("closed", (message) => window.seen.push(message));
    client.subscribe("todos", { id: "mine", filter: { done: false } });
    client.connect();
}"""


async def test_js_client_protocol(page: Any, demo_app: RunningApp) -> None:
    """What realtime.js sends at each step, against a scripted server."""
    await page.goto(f"{demo_app.server.url}/static/realtime.js")  # an origin to import from
    async with fake_server() as server:
        await page.evaluate(CLIENT_SETUP, f"{server.url}/todo/ws")
        first = await server.next_session()
        assert first.query["token"] == ["T0"] and "last_event_id" not in first.query
        await first.send(connected_message())
        assert await first.receive() == {
            "type": "subscribe",
            "id": "mine",
            "collection": "todos",
            "filter": {"done": False},
            "snapshot": True,
        }
        await first.send(
            {"type": "snapshot", "id": "mine", "collection": "todos", "event_id": "E0"}
            | {"documents": [{"_id": "a"}, {"_id": {"k": 1}}]}
        )
        await first.send(change_message("E1", "insert", 7, {"_id": 7}))
        await first.send(change_message("E2", "delete", {"k": 1}))
        await first.send({"type": "ping", "timestamp": "2026-01-01T00:00:00Z"})
        assert await first.receive() == {"type": "pong"}
        await expect_documents(page, ["a", 7])

        first.cut()
        second = await server.next_session()
        assert second.query["last_event_id"] == ["E2"]
        await second.send(connected_message())
        assert "snapshot" not in await second.receive()
        await second.send({"type": "resync_required", "reason": "history gone"})
        assert (await second.receive())["snapshot"] is True
        await second.send(
            {"type": "snapshot", "id": "mine", "collection": "todos", "event_id": "E9"}
            | {"documents": [{"_id": "z"}]}
        )
        await expect_documents(page, ["z"])
        assert await page.evaluate("window.client.lastEventId") == "E9"

        await second.close(1008, "invalid token")
        await page.wait_for_function("window.client.state === 'closed'", timeout=5_000)
        closed = await page.evaluate("window.seen.at(-1)")
        assert closed == {"type": "closed", "code": 1008, "reason": "invalid token"}


async def expect_documents(page: Any, expected: list[Any]) -> None:
    """Wait until the client's view of `todos` holds these `_id`s, in this order."""
    await page.wait_for_function(
        "(want) => JSON.stringify(window.client.documents('todos').map(d => d._id)) === want",
        arg=json.dumps(expected, separators=(",", ":")),
        timeout=5_000,
    )
