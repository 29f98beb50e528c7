"""Live windows (SPEC 13): `subscribe` with `sort` and `limit` against the real database."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo.asynchronous.database import AsyncDatabase
from websockets.asyncio.client import ClientConnection

from engine.localview import LocalView
from tests.conftest import RunningApp
from tests.support import receive_json
from tests.test_resume import open_ws


async def next_message(ws: ClientConnection, timeout: float = 10.0) -> dict[str, Any]:
    """The next message, skipping pings and the plain changes sent before a subscription."""
    while True:
        message = await receive_json(ws, timeout)
        if message["type"] == "ping":
            await ws.send('{"type": "pong"}')
            continue
        if message["type"] == "change" and "window" not in message:
            continue
        return message


async def subscribe_window(
    ws: ClientConnection, view: LocalView, sub_id: str, **request: Any
) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "subscribe", "id": sub_id, **request}))
    snapshot = await next_message(ws)
    assert snapshot["type"] == "snapshot", snapshot
    view.apply(snapshot)
    subscribed = await next_message(ws)
    assert subscribed == {"type": "subscribed", "id": sub_id, "window": snapshot["window"]}
    return snapshot


async def expected(
    db: AsyncDatabase[dict[str, Any]], collection: str, query: dict[str, Any], sort: Any, limit: int
) -> list[Any]:
    cursor = db[collection].find(query).sort([*sort, ("_id", 1)]).limit(limit)
    return [document["_id"] async for document in cursor]


def ids(documents: list[dict[str, Any]] | None) -> list[Any]:
    assert documents is not None
    return [document["_id"] for document in documents]


async def test_a_window_keeps_the_top_documents_across_moves_and_deletes(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    tag = uuid.uuid4().hex
    news = db["shop_news"]
    await news.insert_many([{"_id": f"{tag}-{n}", "tag": tag, "score": n} for n in range(6)])
    ws = await open_ws(change_app)
    view = LocalView()
    try:
        snapshot = await subscribe_window(
            ws, view, "top", collection="news", filter={"tag": tag}, sort={"score": -1}, limit=3
        )
        assert ids(snapshot["documents"]) == [f"{tag}-5", f"{tag}-4", f"{tag}-3"]

        # Into the window from below: it enters, the last member leaves, in one frame.
        await news.update_one({"_id": f"{tag}-0"}, {"$set": {"score": 10}})
        frame = await next_message(ws)
        assert frame["type"] == "transaction"
        assert {(c["operation"], c.get("reason")) for c in frame["changes"]} == {
            ("delete", "left_window"),
            ("insert", "entered_window"),
        }
        view.apply(frame)
        assert ids(view.window("top")) == [f"{tag}-0", f"{tag}-5", f"{tag}-4"]

        # Out of a full window: the next one comes from the database, in the same frame.
        await news.delete_one({"_id": f"{tag}-5"})
        frame = await next_message(ws)
        assert frame["type"] == "transaction"
        assert [(c["operation"], c.get("reason"), c["document_id"]) for c in frame["changes"]] == [
            ("delete", None, f"{tag}-5"),
            ("insert", "entered_window", f"{tag}-3"),
        ]
        view.apply(frame)
        assert ids(view.window("top")) == [f"{tag}-0", f"{tag}-4", f"{tag}-3"]

        # A member moving to the last place, with a better document outside: they swap.
        await news.update_one({"_id": f"{tag}-0"}, {"$set": {"score": 1.5}})
        frame = await next_message(ws)
        view.apply(frame)
        assert ids(view.window("top")) == [f"{tag}-4", f"{tag}-3", f"{tag}-2"]

        # Moving inside the window: an update with the full document.
        await news.update_one({"_id": f"{tag}-2"}, {"$set": {"score": 99}})
        frame = await next_message(ws)
        assert (frame["type"], frame["operation"]) == ("change", "update")
        assert frame["document"]["score"] == 99
        view.apply(frame)
        assert ids(view.window("top")) == await expected(
            db, "shop_news", {"tag": tag}, [("score", -1)], 3
        )
    finally:
        await ws.close()


async def window_queries(app: RunningApp) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        text = (await http.get("/metrics")).text
    return {
        sample.labels.get("kind", sample.name): sample.value
        for family in text_string_to_metric_families(text)
        if family.name in ("mdb_realtime_window_queries", "mdb_realtime_window_departures")
        for sample in family.samples
        if sample.name.endswith("_total")
    }


async def test_departures_are_replaced_from_the_reserve_and_a_short_window_asks_once(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    tag = uuid.uuid4().hex
    news = db["shop_news"]
    await news.insert_many([{"_id": f"{tag}-{n}", "tag": tag, "score": n} for n in range(8)])
    ws = await open_ws(change_app)
    view = LocalView()
    try:
        # Window of 2 and a reserve of 2: scores 7, 6 shown; 5, 4 known.
        await subscribe_window(
            ws, view, "top", collection="news", filter={"tag": tag}, sort={"score": -1}, limit=2
        )
        before = await window_queries(change_app)
        for n, refills in ((7, 0), (6, 0), (5, 1), (4, 1), (3, 1), (2, 2)):
            await news.delete_one({"_id": f"{tag}-{n}"})
            frame = await next_message(ws)
            view.apply(frame)
            assert ids(view.window("top")) == await expected(
                db, "shop_news", {"tag": tag}, [("score", -1)], 2
            )
            now = await window_queries(change_app)
            assert now["refill"] - before["refill"] == refills, n
        assert (
            now["mdb_realtime_window_departures_total"]
            - before["mdb_realtime_window_departures_total"]
            == 6
        )
        assert now["load"] == before["load"]
    finally:
        await ws.close()


async def test_a_window_holds_only_documents_of_its_app(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    """Documents written for another app (`app_id`) never enter, not even from the database."""
    tag = uuid.uuid4().hex
    news = db["shop_news"]
    foreign = [("null", 10, None), ("blog", 9, "blog"), ("blog2", 2.5, "blog")]
    await news.insert_many(
        [
            {"_id": f"{tag}-{name}", "tag": tag, "score": score, "app_id": app}
            for name, score, app in foreign
        ]
        + [{"_id": f"{tag}-p{n}", "tag": tag, "score": 3 - n} for n in range(3)]
        + [{"_id": f"{tag}-own", "tag": tag, "score": 0, "app_id": "shop"}]
    )
    ws = await open_ws(change_app)
    view = LocalView()
    try:
        # A window of 1 and a reserve of 1: p0 shown, p1 known.
        snapshot = await subscribe_window(
            ws, view, "top", collection="news", filter={"tag": tag}, sort={"score": -1}, limit=1
        )
        assert ids(snapshot["documents"]) == [f"{tag}-p0"]
        await news.insert_one({"_id": f"{tag}-late", "tag": tag, "score": 9, "app_id": "blog"})
        for gone, shown in (("p0", "p1"), ("p1", "p2"), ("p2", "own")):
            # After p1 the window runs short: the refill query leaves blog2 out.
            await news.delete_one({"_id": f"{tag}-{gone}"})
            view.apply(await next_message(ws))
            assert ids(view.window("top")) == [f"{tag}-{shown}"]
    finally:
        await ws.close()


async def test_clients_with_the_same_window_share_it(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    tag = uuid.uuid4().hex
    request = {"collection": "news", "filter": {"tag": tag}, "sort": {"n": 1}, "limit": 2}
    first, second = await open_ws(change_app), await open_ws(change_app, user="bob")
    try:
        a = await subscribe_window(first, LocalView(), "a", **request)
        b = await subscribe_window(second, LocalView(), "b", **request)
        assert a["window"] == b["window"]
        await db["shop_news"].insert_one({"_id": f"{tag}-x", "tag": tag, "n": 1})
        seen = [await next_message(first), await next_message(second)]
        assert seen[0] == seen[1]
        assert seen[0]["reason"] == "entered_window"
    finally:
        await first.close()
        await second.close()


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"sort": {"n": 1}}, "bad_message", "needs a `limit`"),
        ({"sort": {"n": 1}, "limit": 0}, "bad_message", "1 to 1000"),
        ({"sort": {"n": 1}, "limit": 1001}, "bad_message", "1 to 1000"),
        ({"sort": {"n": 1}, "limit": True}, "bad_message", "1 to 1000"),
        ({"sort": {"n": 2}, "limit": 5}, "forbidden_filter", "1 or -1"),
        ({"sort": {"$n": 1}, "limit": 5}, "forbidden_filter", "not a field path"),
        ({"sort": [], "limit": 5}, "forbidden_filter", "non-empty object"),
    ],
)
async def test_bad_windows_get_clear_errors(
    change_app: RunningApp, request_fields: dict[str, Any], code: str, words: str
) -> None:
    ws = await open_ws(change_app)
    try:
        await ws.send(
            json.dumps({"type": "subscribe", "id": "w", "collection": "news", **request_fields})
        )
        error = await next_message(ws)
        assert (error["type"], error["code"], error["ref"]) == ("error", code, "w")
        assert words in error["message"]
    finally:
        await ws.close()


async def test_a_transaction_that_reorders_a_window_arrives_as_one_frame(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    tag = uuid.uuid4().hex
    news = db["shop_news"]
    ws = await open_ws(change_app)
    view = LocalView()
    try:
        await news.insert_many([{"_id": f"{tag}-{n}", "tag": tag, "n": n} for n in range(4)])
        for _ in range(4):  # the plain changes of the inserts come first
            assert (await receive_json(ws, 10))["operation"] == "insert"
        await subscribe_window(
            ws, view, "low", collection="news", filter={"tag": tag}, sort={"n": 1}, limit=2
        )
        async with db.client.start_session() as session, await session.start_transaction():
            await news.update_one({"_id": f"{tag}-0"}, {"$set": {"n": 10}}, session=session)
            await news.update_one({"_id": f"{tag}-3"}, {"$set": {"n": -1}}, session=session)
        frame = await next_message(ws)
        assert frame["type"] == "transaction"
        view.apply(frame)
        assert ids(view.window("low")) == [f"{tag}-3", f"{tag}-1"]
        assert ids(view.window("low")) == await expected(
            db, "shop_news", {"tag": tag}, [("n", 1)], 2
        )
    finally:
        await ws.close()


async def test_unsubscribe_ends_a_window(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    tag = uuid.uuid4().hex
    ws = await open_ws(change_app)
    try:
        await subscribe_window(
            ws, LocalView(), "gone", collection="news", filter={"tag": tag}, limit=2
        )
        await ws.send(json.dumps({"type": "unsubscribe", "id": {"not": "an id"}}))
        assert (await next_message(ws))["code"] == "bad_message"
        await ws.send(json.dumps({"type": "unsubscribe", "id": "gone"}))
        assert await next_message(ws) == {"type": "unsubscribed", "id": "gone"}
        await db["shop_news"].insert_one({"_id": f"{tag}-late", "tag": tag})
        plain = await receive_json(ws, 10)  # back to the whole collection, no window frame
        assert plain["type"] == "change" and "window" not in plain
        assert plain["document_id"] == f"{tag}-late"
    finally:
        await ws.close()
