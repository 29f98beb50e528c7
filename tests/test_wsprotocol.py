"""The engine's server protocol: lean per-connection state that behaves like uvicorn's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest

from engine.auth import issue_token
from engine.wsprotocol import Flag, Inbox
from tests.conftest import RunningApp, start_app_server
from tests.support import TEST_MANIFESTS, TEST_SECRET, connect, receive_json, receive_until


@pytest.fixture(scope="module")
def sansio_app(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    folder = tmp_path_factory.mktemp("wsprotocol")
    app = start_app_server(
        mongo_uri, folder, TEST_MANIFESTS, TEST_WS_IMPLEMENTATION="websockets-sansio"
    )
    try:
        yield app
    finally:
        app.server.stop()


async def test_connections_keep_no_handshake_and_still_talk_both_ways(
    sansio_app: RunningApp,
) -> None:
    token = issue_token(TEST_SECRET, app_slug="alpha", user_id="u")
    url = sansio_app.server.ws_url("/alpha/ws", token=token)
    extra = {"X-Padding": "p" * 2000, "X-Other": "o"}
    async with await connect(url, additional_headers=extra) as first, await connect(url) as second:
        for ws in (first, second):
            assert (await receive_json(ws))["type"] == "connected"
        async with httpx.AsyncClient(base_url=sansio_app.server.url) as http:
            states = (await http.get("/_test/protocols/alpha")).json()["protocols"]
            assert len(states) == 2
            for state in states:
                assert state["class"] == "EngineWebSocketProtocol"
                assert (state["queue"], state["writable"]) == ("Inbox", "Flag")
                assert state["request"] is False and state["response"] is False
                assert state["parser_request_headers"] == 0  # emptied after the handshake
                assert state["scope_headers"] >= 5  # the app still sees every header
            body = {"slug": "alpha", "message": {"type": "hello"}}
            assert (await http.post("/_test/broadcast", json=body)).json()["reached"] == 2
        for ws in (first, second):
            assert (await receive_until(ws, "hello"))["type"] == "hello"
            for number in range(3):  # several messages in a row through the Inbox
                await ws.send(json.dumps({"type": "echo-me", "n": number}))
            for number in range(3):
                assert (await receive_until(ws, "echo"))["received"]["n"] == number


async def test_inbox_is_first_in_first_out_and_waits_when_empty() -> None:
    inbox = Inbox()
    inbox.put_nowait(1)
    inbox.put_nowait(2)
    assert (inbox.qsize(), inbox.empty()) == (2, False)
    assert [await inbox.get(), await inbox.get()] == [1, 2]
    assert inbox.empty()
    getter = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    assert not getter.done()
    inbox.put_nowait(3)
    assert await asyncio.wait_for(getter, 1) == 3


async def test_an_event_woken_for_a_cancelled_reader_goes_to_the_next() -> None:
    inbox = Inbox()
    first = asyncio.create_task(inbox.get())
    second = asyncio.create_task(inbox.get())
    await asyncio.sleep(0)
    inbox.put_nowait("event")  # wakes the first reader...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 1) == "event"
    assert first.cancelled()
    assert inbox.empty()


async def test_flag_wakes_every_waiter_and_can_be_cleared() -> None:
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    flag.set()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert await flag.wait() is True  # already set: no wait
    flag.clear()
    late = asyncio.create_task(flag.wait())
    await asyncio.sleep(0.01)
    assert not late.done()
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    assert Flag(is_set=True).is_set()
