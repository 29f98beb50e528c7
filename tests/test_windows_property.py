"""Property: a client applying a window's messages holds exactly
`find(filter ∧ scope).sort(sort).limit(limit)` (SPEC 13), against the real database.

Writes come one at a time (then the window must be exact after the one frame a write may
cause) or several at once (then every window seen on the way must be a valid one, and the
last one exact). Sort keys mix numbers, strings, booleans, null and missing fields, with
ties; documents move in and out of the scope, the filter and the window's edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError
from websockets.asyncio.client import ClientConnection

from engine.localview import LocalView
from tests.conftest import CHANGE_MANIFESTS, RunningApp, start_app_server
from tests.support import receive_json
from tests.test_resume import open_ws
from tests.test_windows import window_queries

MISSING = "<missing>"
SORT_VALUES = st.one_of(st.integers(-2, 2), st.sampled_from(["a", "b", MISSING, True]), st.none())
OWNERS = st.sampled_from(["ann", "ann", "bob"])
SLOTS = 14  # document ids drawn from this many: more than a window and its reserve

document = st.fixed_dictionaries(
    {"owner_id": OWNERS, "grp": st.integers(0, 1), "k": SORT_VALUES, "j": SORT_VALUES}
)
update = st.one_of(
    st.tuples(st.just("k"), SORT_VALUES),
    st.tuples(st.just("j"), SORT_VALUES),
    st.tuples(st.just("owner_id"), OWNERS),
    st.tuples(st.just("grp"), st.integers(0, 1)),
)
operation = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, SLOTS - 1), document),
    st.tuples(st.just("update"), st.integers(0, SLOTS - 1), update),
    st.tuples(st.just("delete"), st.integers(0, SLOTS - 1), st.none()),
)
step = st.one_of(operation.map(lambda op: [op]), st.lists(operation, min_size=2, max_size=4))
window_sorts = st.sampled_from(
    [{"k": 1}, {"k": -1}, {"k": 1, "j": -1}, {"j": -1, "k": 1}, {"grp": 1, "k": -1}]
)
window = st.fixed_dictionaries(
    {
        "sort": window_sorts,
        "limit": st.integers(1, 3),
        "by_group": st.booleans(),
    }
)


def stored(fields: dict[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value != MISSING}


async def write(db: AsyncDatabase[dict[str, Any]], tag: str, op: tuple[Any, ...]) -> None:
    kind, slot, argument = op
    plain = db["shop_plain"]
    document_id = f"{tag}-{slot}"
    if kind == "insert":
        with contextlib.suppress(DuplicateKeyError):  # that slot holds a document already
            await plain.insert_one({"_id": document_id, "tag": tag, "v": 0, **stored(argument)})
    elif kind == "update":
        field, value = argument
        change: dict[str, Any] = {"$inc": {"v": 1}}
        if value == MISSING:
            change["$unset"] = {field: ""}
        else:
            change["$set"] = {field: value}
        await plain.update_one({"_id": document_id}, change)
    else:
        await plain.delete_one({"_id": document_id})


async def expected(
    db: AsyncDatabase[dict[str, Any]], query: dict[str, Any], sort: dict[str, int], limit: int
) -> list[dict[str, Any]]:
    order = [*sort.items(), ("_id", 1)]
    scoped = {"$and": [query, {"owner_id": "ann"}]}
    return [d async for d in db["shop_plain"].find(scoped).sort(order).limit(limit)]


async def next_window_frame(ws: ClientConnection, timeout: float) -> dict[str, Any]:
    while True:
        message = await receive_json(ws, timeout)
        if message["type"] == "ping":
            await ws.send('{"type": "pong"}')
        elif "window" in message and message["type"] != "subscribed":
            return message


async def next_plain_change(ws: ClientConnection) -> dict[str, Any]:
    while True:
        message = await receive_json(ws, 10)
        if message["type"] == "ping":
            await ws.send('{"type": "pong"}')
        elif message["type"] == "change":
            return message


def assert_valid(shown: list[dict[str, Any]], query: dict[str, Any], limit: int) -> None:
    """A window that could exist: not too long, only documents it may hold."""
    assert len(shown) <= limit
    for document in shown:
        assert document["owner_id"] == "ann" and document["tag"] == query["tag"]
        if "grp" in query:
            assert document["grp"] == query["grp"]


async def catch_up(
    ws: ClientConnection,
    view: LocalView,
    want: list[dict[str, Any]],
    query: dict[str, Any],
    limit: int,
) -> None:
    """Apply frames until the window is `want`, each window on the way a valid one."""
    while (shown := view.window("w")) != want:
        assert shown is not None
        assert_valid(shown, query, limit)
        try:
            view.apply(await next_window_frame(ws, 10))
        except TimeoutError:
            raise AssertionError(f"never reached {want}, holds {shown}") from None


async def scenario(
    app: RunningApp,
    initial: list[dict[str, Any]],
    spec: dict[str, Any],
    steps: list[list[tuple[Any, ...]]],
) -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(app.mongo_uri)
    db = client[app.db_name]
    tag = uuid.uuid4().hex
    query: dict[str, Any] = {"tag": tag, **({"grp": 0} if spec["by_group"] else {})}
    sort, limit = spec["sort"], spec["limit"]
    ws = await open_ws(app)
    view = LocalView()
    try:
        for slot, fields in enumerate(initial):
            await write(db, tag, ("insert", slot, fields))
        # Their changes reach this connection first: the window starts after them.
        for _ in range(sum(fields["owner_id"] == "ann" for fields in initial)):
            assert (await next_plain_change(ws))["operation"] == "insert"
        request = {"type": "subscribe", "id": "w", "collection": "plain", "filter": query}
        await ws.send(json.dumps(request | {"sort": sort, "limit": limit}))
        snapshot = await next_window_frame(ws, 10)
        view.apply(snapshot)
        assert view.window("w") == await expected(db, query, sort, limit)
        for writes in steps:
            if len(writes) == 1:
                before = view.window("w")
                await write(db, tag, writes[0])
                want = await expected(db, query, sort, limit)
                if view.window("w") != want:
                    try:
                        frame = await next_window_frame(ws, 10)
                    except TimeoutError:
                        raise AssertionError(f"no frame: {writes} {want} {before}") from None
                    view.apply(frame)
                    assert view.window("w") == want, (writes, frame, before)
                continue
            await asyncio.gather(*(write(db, tag, op) for op in writes))
            await catch_up(ws, view, await expected(db, query, sort, limit), query, limit)
            # Writes that cancel out (insert, then delete) may leave the window as it was
            # while their frames are still on the way: a write that changes a member, or
            # briefly adds one, ends the step only once its own frame came, after theirs.
            want = await expected(db, query, sort, limit)
            marker = want[0]["_id"] if want else f"{tag}-marker"
            if want:
                await db["shop_plain"].update_one({"_id": marker}, {"$inc": {"v": 1}})
            else:
                marked = {"_id": marker, "tag": tag, "v": 0, "owner_id": "ann", "grp": 0}
                await db["shop_plain"].insert_one(marked)
                await catch_up(ws, view, await expected(db, query, sort, limit), query, limit)
                await db["shop_plain"].delete_one({"_id": marker})
            await catch_up(ws, view, await expected(db, query, sort, limit), query, limit)
    finally:
        await ws.close()
        await client.close()


@pytest.fixture(scope="module")
def no_reserve_app(
    mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """The change app with windows that keep no document beyond them: every departure makes
    a refill query, so those run under concurrent writes too."""
    folder = tmp_path_factory.mktemp("no_reserve_app")
    running = start_app_server(mongo_uri, folder, CHANGE_MANIFESTS, MDB_REALTIME_WINDOW_RESERVE="0")
    try:
        yield running
    finally:
        running.server.stop()


scenarios = given(
    initial=st.lists(document, max_size=SLOTS - 2),
    spec=window,
    steps=st.lists(step, min_size=1, max_size=10),
)
examples = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@examples
@scenarios
def test_a_window_is_always_the_query_it_stands_for(
    change_app: RunningApp,
    initial: list[dict[str, Any]],
    spec: dict[str, Any],
    steps: list[list[tuple[Any, ...]]],
) -> None:
    asyncio.run(scenario(change_app, initial, spec, steps))


# Many matching documents beyond a small window, and writes that take its members away.
draining = st.one_of(
    st.tuples(st.just("delete"), st.integers(0, SLOTS - 1), st.none()),
    st.tuples(st.just("update"), st.integers(0, SLOTS - 1), st.tuples(st.just("k"), SORT_VALUES)),
    operation,
)
draining_window = st.fixed_dictionaries(
    {"sort": window_sorts, "limit": st.integers(1, 2), "by_group": st.just(False)}
)


@settings(examples, max_examples=100)
@given(
    initial=st.lists(document, min_size=SLOTS // 2, max_size=SLOTS - 2),
    spec=draining_window,
    steps=st.lists(
        st.one_of(draining.map(lambda op: [op]), st.lists(draining, min_size=2, max_size=4)),
        min_size=3,
        max_size=12,
    ),
)
def test_a_window_without_reserve_is_always_the_query_it_stands_for(
    no_reserve_app: RunningApp,
    initial: list[dict[str, Any]],
    spec: dict[str, Any],
    steps: list[list[tuple[Any, ...]]],
) -> None:
    asyncio.run(scenario(no_reserve_app, initial, spec, steps))


async def test_without_a_reserve_each_departure_asks_the_database(
    no_reserve_app: RunningApp,
) -> None:
    """`MDB_REALTIME_WINDOW_RESERVE=0` reaches the windows: the first departure refills."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(no_reserve_app.mongo_uri)
    plain = client[no_reserve_app.db_name]["shop_plain"]
    tag = uuid.uuid4().hex
    await plain.insert_many(
        [{"_id": f"{tag}-{n}", "tag": tag, "owner_id": "ann", "k": n} for n in range(4)]
    )
    ws = await open_ws(no_reserve_app)
    view = LocalView()
    try:
        request = {"type": "subscribe", "id": "w", "collection": "plain", "filter": {"tag": tag}}
        await ws.send(json.dumps(request | {"sort": {"k": 1}, "limit": 2}))
        view.apply(await next_window_frame(ws, 10))
        before = await window_queries(no_reserve_app)
        await plain.delete_one({"_id": f"{tag}-0"})
        view.apply(await next_window_frame(ws, 10))
        assert [d["_id"] for d in view.window("w") or []] == [f"{tag}-1", f"{tag}-2"]
        assert (await window_queries(no_reserve_app))["refill"] == before["refill"] + 1
    finally:
        await ws.close()
        await client.close()
