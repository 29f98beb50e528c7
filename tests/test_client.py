"""The Python client (engine/client.py): its side of the protocol against a scripted server,
then against a real engine serving the example app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from engine.auth import issue_token
from engine.client import Backoff, ClientClosed, RealtimeClient
from engine.localview import LocalView, document_key
from tests.conftest import RunningApp
from tests.cut_proxy import CutProxy
from tests.fake_server import change_message, connected_message, fake_server
from tests.support import TEST_SECRET

FAST = Backoff(initial=0.05, maximum=0.2)


# -- the local view, without I/O ---------------------------------------------------------------


def test_local_view_upserts_removes_and_replaces() -> None:
    view = LocalView()
    view.apply(change_message("e1", "insert", "a", {"_id": "a", "n": 1}))
    view.apply(change_message("e2", "update", "a", {"_id": "a", "n": 2}))
    view.apply(change_message("e3", "insert", 1, {"_id": 1}))
    view.apply(change_message("e4", "insert", True, {"_id": True}))
    assert view.get("todos", "a") == {"_id": "a", "n": 2}
    assert len(view.documents("todos")) == 3  # 1 and true are different ids
    left = change_message("e5", "delete", "a") | {"reason": "left_scope"}
    assert view.apply(left) == "todos"
    assert view.apply(change_message("e6", "delete", "never-seen")) is None
    assert view.last_event_id == "e6"
    view.apply(
        {"type": "snapshot", "id": "s", "collection": "todos", "documents": [{"_id": "z"}]}
        | {"event_id": "e9"}
    )
    assert view.documents("todos") == [{"_id": "z"}]
    assert view.last_event_id == "e9"
    assert document_key({"b": 1, "a": 2}) == document_key({"a": 2, "b": 1})
    assert document_key("true") != document_key(True)


def test_backoff_grows_caps_and_jitters() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.5)
    for attempt, ceiling in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 8.0), (10, 8.0)]:
        delays = [backoff.delay(attempt) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1


# -- the protocol, against a scripted server ---------------------------------------------------


async def test_subscribes_resumes_and_resnapshots_on_resync() -> None:
    async with fake_server() as server:
        client = RealtimeClient(f"{server.url}/todo/ws", token="T0", backoff=FAST)
        changes: list[dict[str, Any]] = []
        client.on("change", changes.append)
        await client.subscribe("todos", filter={"done": False}, id="mine")
        connecting = asyncio.create_task(client.connect())
        first = await server.next_session()
        assert first.path == "/todo/ws" and "last_event_id" not in first.query
        assert first.headers["Authorization"] == "Bearer T0"
        await first.send(connected_message())
        assert (await connecting)["type"] == "connected"
        # No position yet: the view is built from a snapshot.
        assert await first.receive() == {
            "type": "subscribe",
            "id": "mine",
            "collection": "todos",
            "filter": {"done": False},
            "snapshot": True,
        }
        await first.send(
            {"type": "snapshot", "id": "mine", "collection": "todos", "event_id": "E0"}
            | {"documents": [{"_id": "a", "title": "A"}]}
        )
        await first.send(change_message("E1", "insert", "b", {"_id": "b", "title": "B"}))
        await first.send({"type": "ping", "timestamp": "2026-01-01T00:00:00Z"})
        assert await first.receive() == {"type": "pong"}
        await client.wait_until(lambda: len(client.documents("todos")) == 2)
        assert [c["id"] for c in changes] == ["E1"]

        first.cut()
        second = await server.next_session()
        # A position: the server replays what was missed, subscriptions only narrow again.
        assert second.query["last_event_id"] == ["E1"]
        await second.send(connected_message())
        assert (await second.receive()).get("snapshot") is None
        await second.send(change_message("E2", "delete", "a"))
        await client.wait_until(lambda: client.last_event_id == "E2")
        assert [d["_id"] for d in client.documents("todos")] == ["b"]

        await second.send({"type": "resync_required", "reason": "history gone"})
        assert (await second.receive())["snapshot"] is True
        await second.send(
            {"type": "snapshot", "id": "mine", "collection": "todos", "event_id": "E7"}
            | {"documents": [{"_id": "c"}]}
        )
        await client.wait_until(lambda: client.last_event_id == "E7")
        assert client.documents("todos") == [{"_id": "c"}]

        await second.close(1008, "invalid token")
        await client.wait_until(lambda: client.state == "closed")
        assert client.failure is not None and client.failure.reason == "invalid token"
        with pytest.raises(asyncio.TimeoutError):
            await server.next_session(timeout=0.5)  # a refused token is not retried
        await client.close()


async def test_token_source_is_asked_again_after_expiry() -> None:
    tokens = iter(["first", "second"])
    async with fake_server() as server:
        client = RealtimeClient(f"{server.url}/todo/ws", token=lambda: next(tokens), backoff=FAST)
        connecting = asyncio.create_task(client.connect())
        first = await server.next_session()
        assert first.headers["Authorization"] == "Bearer first"
        await first.send(connected_message())
        await connecting
        await first.close(1008, "token expired")
        second = await server.next_session()
        assert second.headers["Authorization"] == "Bearer second"
        await client.close()


async def test_connect_raises_when_the_server_refuses() -> None:
    async with fake_server() as server:
        client = RealtimeClient(f"{server.url}/todo/ws", token="bad", backoff=FAST)
        connecting = asyncio.create_task(client.connect())
        session = await server.next_session()
        await session.close(1008, "invalid token")
        with pytest.raises(ClientClosed) as refused:
            await connecting
        assert (refused.value.code, refused.value.reason) == (1008, "invalid token")
        await client.close()


# -- against the engine serving the example app ------------------------------------------------


@pytest.fixture
async def todos(demo_app: RunningApp) -> AsyncIterator[AsyncCollection[dict[str, Any]]]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(demo_app.mongo_uri)
    collection = mongo[demo_app.db_name]["todo_todos"]
    await collection.delete_many({})
    try:
        yield collection
    finally:
        await mongo.close()


def token_for(user: str, **options: Any) -> str:
    return issue_token(TEST_SECRET, app_slug="todo", user_id=user, **options)


def ids(client: RealtimeClient) -> set[Any]:
    return {document["_id"] for document in client.documents("todos")}


async def test_local_view_follows_the_database(
    demo_app: RunningApp, todos: AsyncCollection[dict[str, Any]]
) -> None:
    url = demo_app.server.ws_url("/todo/ws")
    async with (
        RealtimeClient(url, token=token_for("ann")) as ann,
        RealtimeClient(url, token=token_for("bob")) as bob,
    ):
        await todos.insert_one({"_id": "t1", "title": "milk", "owner_id": "ann", "secret": 1})
        await todos.insert_one({"_id": "t2", "title": "bread", "owner_id": "bob"})
        await ann.wait_until(lambda: ids(ann) == {"t1"})
        assert ann.view.get("todos", "t1") == {"_id": "t1", "title": "milk", "owner_id": "ann"}
        await todos.update_one({"_id": "t1"}, {"$set": {"done": True}})
        await ann.wait_until(lambda: (ann.view.get("todos", "t1") or {}).get("done") is True)
        await todos.update_one({"_id": "t1"}, {"$set": {"archived": True}})  # leaves the filter
        await ann.wait_until(lambda: ids(ann) == set())
        await bob.wait_until(lambda: ids(bob) == {"t2"})
        await todos.delete_one({"_id": "t2"})
        await bob.wait_until(lambda: ids(bob) == set())
        assert ann.last_event_id is not None


async def test_refused_token_stops_the_client(demo_app: RunningApp) -> None:
    forged = issue_token("another-secret-that-is-long-enough!", app_slug="todo", user_id="ann")
    client = RealtimeClient(demo_app.server.ws_url("/todo/ws"), token=forged)
    with pytest.raises(ClientClosed) as refused:
        await client.connect()
    assert (refused.value.code, refused.value.reason) == (1008, "invalid token")
    assert client.state == "closed"
    await client.close()


async def test_expired_token_is_replaced_from_its_source(demo_app: RunningApp) -> None:
    issued: list[int] = []

    def token_source() -> str:
        issued.append(1)
        return token_for("ann", ttl_seconds=1 if len(issued) == 1 else 3600)

    client = RealtimeClient(demo_app.server.ws_url("/todo/ws"), token=token_source, backoff=FAST)
    connected: list[dict[str, Any]] = []
    client.on("connected", connected.append)
    async with client:
        await client.wait_until(lambda: len(connected) == 2, timeout=10)
    assert len(issued) == 2


async def test_snapshot_builds_the_view_from_existing_documents(
    demo_app: RunningApp, todos: AsyncCollection[dict[str, Any]]
) -> None:
    """Needs server-side snapshots (SPEC 5, `subscribe` with `snapshot: true`)."""
    await todos.insert_many(
        [
            {"_id": "s1", "title": "before", "owner_id": "ann"},
            {"_id": "s2", "title": "theirs", "owner_id": "bob"},
        ]
    )
    client = RealtimeClient(demo_app.server.ws_url("/todo/ws"), token=token_for("ann"))
    await client.subscribe("todos", snapshot=True)
    async with client:
        snapshot = await client.next_message("snapshot", timeout=5)
        assert snapshot["collection"] == "todos"
        assert ids(client) == {"s1"}
        await todos.insert_one({"_id": "s3", "title": "after", "owner_id": "ann"})
        await client.wait_until(lambda: ids(client) == {"s1", "s3"})


async def test_reconnect_resumes_what_was_missed(
    demo_app: RunningApp, todos: AsyncCollection[dict[str, Any]]
) -> None:
    """Needs server-side resume (SPEC 6, `?last_event_id=`)."""
    server_port = int(demo_app.server.url.rsplit(":", 1)[1])
    proxy = await CutProxy("127.0.0.1", server_port).start()
    url = f"ws://127.0.0.1:{proxy.port}/todo/ws"
    disconnects: list[dict[str, Any]] = []
    try:
        async with RealtimeClient(url, token=token_for("ann"), backoff=FAST) as client:
            client.on("disconnected", disconnects.append)
            await todos.insert_one({"_id": "r1", "title": "seen", "owner_id": "ann"})
            await client.wait_until(lambda: ids(client) == {"r1"})
            await proxy.cut()
            await client.wait_until(lambda: client.state != "open")
            await todos.insert_one({"_id": "r2", "title": "missed", "owner_id": "ann"})
            await todos.delete_one({"_id": "r1"})
            await asyncio.sleep(0.3)  # the client keeps trying meanwhile, and is refused
            proxy.restore()
            await client.wait_until(lambda: ids(client) == {"r2"}, timeout=10)
            assert disconnects and disconnects[0]["code"] == 1006
        assert await resumes_served(demo_app) >= 1
    finally:
        await proxy.close()


async def resumes_served(app: RunningApp) -> float:
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        text = (await http.get("/metrics")).text
    labels = {"app": "todo", "endpoint": "realtime"}
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "mdb_realtime_resumes_total" and sample.labels == labels
    )
