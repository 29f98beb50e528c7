"""Limits per user, per address, per connection (messages, subscriptions), over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from engine.auth import issue_token
from engine.limits import MessageRate
from tests.conftest import RunningApp, start_app_server
from tests.support import CHANGE_MANIFESTS, TEST_SECRET, connect, receive_json, receive_until

LIMITS = {
    "MDB_REALTIME_MAX_CONNECTIONS_PER_USER": "2",
    "MDB_REALTIME_MAX_CONNECTIONS_PER_IP": "6",
    "MDB_REALTIME_MESSAGES_PER_SECOND": "5",
    "MDB_REALTIME_MESSAGE_BURST": "5",
    "MDB_REALTIME_MAX_SUBSCRIPTIONS": "2",
}


@pytest.fixture(scope="module")
def limited(mongo_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningApp]:
    app = start_app_server(
        mongo_uri, tmp_path_factory.mktemp("limited"), CHANGE_MANIFESTS, **LIMITS
    )
    try:
        yield app
    finally:
        app.server.stop()


async def open_as(app: RunningApp, user: str) -> ClientConnection:
    token = issue_token(TEST_SECRET, app_slug="shop", user_id=user)
    return await connect(app.server.ws_url("/shop/ws", token=token))


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await receive_json(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_connections_per_user_and_per_address(limited: RunningApp) -> None:
    first, second = await open_as(limited, "ann"), await open_as(limited, "ann")
    for ws in (first, second):
        assert (await receive_json(ws))["type"] == "connected"
    third = await open_as(limited, "ann")
    assert await closed_with(third) == (1008, "too many connections")
    others = [await open_as(limited, f"user{n}") for n in range(4)]  # 6 from this address
    for ws in others:
        assert (await receive_json(ws))["type"] == "connected"
    seventh = await open_as(limited, "someone-else")
    assert await closed_with(seventh) == (1008, "too many connections")
    await first.close()
    await asyncio.sleep(0.3)
    again = await open_as(limited, "ann")  # room again once one closed
    assert (await receive_json(again))["type"] == "connected"
    for ws in (second, *others, again):
        await ws.close()


async def test_message_rate_answers_then_closes(limited: RunningApp) -> None:
    ws = await open_as(limited, "chatty")
    await receive_json(ws)
    for _ in range(8):  # 5 allowed at once, then refused
        await ws.send('{"type": "pong"}')
    error = await receive_until(ws, "error")
    assert error["code"] == "rate_limited"
    await asyncio.sleep(1.2)  # the bucket refills: messages are served again
    await ws.send(json.dumps({"type": "subscribe", "id": "ok", "collection": "news"}))
    assert (await receive_until(ws, "subscribed"))["id"] == "ok"
    for _ in range(40):  # keeps sending past every warning
        await ws.send('{"type": "pong"}')
    assert await closed_with(ws) == (1008, "rate limited")


async def test_subscriptions_per_connection(limited: RunningApp) -> None:
    ws = await open_as(limited, "subscriber")
    await receive_json(ws)
    for sub_id in ("a", "b"):
        await ws.send(json.dumps({"type": "subscribe", "id": sub_id, "collection": "news"}))
        assert (await receive_until(ws, "subscribed"))["id"] == sub_id
    await ws.send(json.dumps({"type": "subscribe", "id": "c", "collection": "news"}))
    error = await receive_until(ws, "error")
    assert (error["code"], error["ref"]) == ("rate_limited", "c")
    # Replacing an existing subscription is not a new one.
    await ws.send(json.dumps({"type": "subscribe", "id": "a", "collection": "orders"}))
    assert (await receive_until(ws, "subscribed"))["id"] == "a"
    await ws.close()


def test_message_rate_bucket() -> None:
    rate = MessageRate(rate=2.0, burst=3)
    start = time.monotonic()
    assert [rate.allow(start) for _ in range(4)] == [True, True, True, False]
    assert rate.strikes == 1
    assert rate.allow(start + 0.5) is True and rate.strikes == 0  # 0.5 s at 2/s: one more
    assert MessageRate(rate=0, burst=0).allow() is True  # 0 disables the bound
