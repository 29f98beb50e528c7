"""Rooms and presence (SPEC 11) against real server processes sharing one database."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bson import ObjectId
from pymongo import AsyncMongoClient
from websockets.asyncio.client import ClientConnection

from engine.auth import issue_token
from engine.client import Backoff, RealtimeClient, RoomError
from tests.cut_proxy import CutProxy
from tests.support import (
    REPO,
    TEST_SECRET,
    ServerProcess,
    app_under_test_command,
    connect,
    engine_env,
    receive_json,
)

ROOM_MANIFESTS = REPO / "tests" / "manifests_rooms"
# Short heartbeats so that a killed process is noticed in seconds, not the default 15-20 s.
FAST_PRESENCE = {
    "MDB_REALTIME_PRESENCE_HEARTBEAT_SECONDS": "0.5",
    "MDB_REALTIME_PRESENCE_TIMEOUT_SECONDS": "2",
}


def start_server(mongo_uri: str, folder: Path, db: str, name: str) -> ServerProcess:
    env = engine_env(
        mongo_uri, folder, MDB_REALTIME_DB=db, TEST_MANIFESTS=str(ROOM_MANIFESTS), **FAST_PRESENCE
    )
    return ServerProcess(app_under_test_command(), env, folder / f"{name}.log").start()


@pytest.fixture(scope="module")
def database_name() -> str:
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def servers(
    mongo_uri: str, database_name: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("rooms")
    first = start_server(mongo_uri, folder, database_name, "first")
    try:
        second = start_server(mongo_uri, folder, database_name, "second")
    except BaseException:
        first.stop()
        raise
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
async def db(mongo_uri: str, database_name: str) -> AsyncIterator[Any]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    try:
        yield mongo[database_name]
    finally:
        await mongo.close()


class Client:
    """A raw WebSocket client that keeps every message it receives, by type."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.connection_id: str = hello["connection_id"]
        self.messages: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            if message.get("type") == "ping":
                await self.ws.send('{"type": "pong"}')
            self.messages.append(message)
            self._arrived.set()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    async def request(self, message: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        """Send a message with an id; the answer with that id (or an error about it)."""
        ref = message.setdefault("id", uuid.uuid4().hex[:8])
        await self.send(message)
        return await self.wait_for(
            lambda m: m.get("id") == ref or m.get("ref") == ref, timeout=timeout
        )

    async def wait_for(self, predicate: Any, timeout: float = 15.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for message in self.messages[seen:]:
                if predicate(message):
                    return message
            seen = len(self.messages)
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no such message; got {self.messages[-5:]}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("type") == kind]

    def presence_events(self, room: str) -> list[tuple[str, str]]:
        """(event, connection_id) in arrival order, from both frame shapes."""
        events = []
        for message in self.of_type("presence"):
            if message["room"] != room:
                continue
            for item in message.get("events", [message]):
                events.append((item["event"], item["member"]["connection_id"]))
        return events

    def members_now(self, room: str) -> set[str]:
        """Members as a client keeps them: `joined.members`, then presence events applied."""
        members: set[str] = set()
        for message in self.messages:
            if message.get("room") != room:
                continue
            if message["type"] == "joined":
                members = {m["connection_id"] for m in message.get("members", [])}
            elif message["type"] == "presence":
                for item in message.get("events", [message]):
                    if item["event"] == "join":
                        members.add(item["member"]["connection_id"])
                    else:
                        members.discard(item["member"]["connection_id"])
        return members

    async def wait_members(self, room: str, expected: set[str], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while self.members_now(room) != expected:
            if time.monotonic() > deadline:
                raise AssertionError(f"members {self.members_now(room)} != {expected}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), max(0.01, deadline - time.monotonic()))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def open_client(
    server: ServerProcess, user: str, path: str = "/hall/ws", **query: str
) -> Client:
    claims = {k: v for k, v in query.items() if k.startswith("claim_")}
    others = {k: v for k, v in query.items() if not k.startswith("claim_")}
    token = issue_token(
        TEST_SECRET,
        app_slug="hall",
        user_id=user,
        claims={k.removeprefix("claim_"): v for k, v in claims.items()},
    )
    ws = await connect(server.ws_url(path, token=token, **others))
    hello = await receive_json(ws, 10)
    assert hello["type"] == "connected"
    return Client(ws, hello)


async def test_members_on_two_processes_see_each_other_join_and_leave(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = servers
    ann = await open_client(first, "ann")
    bob = await open_client(second, "bob")
    cy = await open_client(first, "cy")
    try:
        joined = await ann.request({"type": "join", "room": "lobby", "info": {"name": "Ann"}})
        assert joined["type"] == "joined" and joined["room"] == "lobby"
        assert joined["members"] == [
            {"user_id": "ann", "connection_id": ann.connection_id, "info": {"name": "Ann"}}
        ]
        joined = await bob.request({"type": "join", "room": "lobby"})
        # Bob, on the other process, sees Ann from the presence store.
        assert {m["connection_id"] for m in joined["members"]} == {
            ann.connection_id,
            bob.connection_id,
        }
        assert {"user_id": "ann", "connection_id": ann.connection_id, "info": {"name": "Ann"}} in (
            joined["members"]
        )
        await ann.wait_members("lobby", {ann.connection_id, bob.connection_id})
        await cy.request({"type": "join", "room": "lobby"})
        everyone = {ann.connection_id, bob.connection_id, cy.connection_id}
        await ann.wait_members("lobby", everyone)
        await bob.wait_members("lobby", everyone)

        left = await bob.request({"type": "leave", "room": "lobby"})
        assert left["type"] == "left" and left["room"] == "lobby"
        await ann.wait_members("lobby", {ann.connection_id, cy.connection_id})
        await cy.close()  # closing the socket leaves every room
        await ann.wait_members("lobby", {ann.connection_id})
        assert ("leave", cy.connection_id) in ann.presence_events("lobby")
        # Bob is not a member any more: he hears nothing of the room.
        await asyncio.sleep(0.5)
        after_leave = bob.messages.index(left)
        assert not [m for m in bob.messages[after_leave:] if m.get("type") == "presence"]
    finally:
        for client in (ann, bob, cy):
            await client.close()


async def test_presence_api_and_connection_rooms(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = servers
    ann = await open_client(first, "ann")
    try:
        await ann.request({"type": "join", "room": "lobby", "info": {"k": 1}})
        await ann.request({"type": "join", "room": "chat:x"})
        async with httpx.AsyncClient(base_url=second.url) as http:
            presence = (await http.get("/_test/presence/hall", params={"room": "lobby"})).json()
        assert presence["members"] == [
            {"user_id": "ann", "connection_id": ann.connection_id, "info": {"k": 1}}
        ]
        async with httpx.AsyncClient(base_url=first.url) as http:
            rooms = (await http.get("/_test/rooms/hall")).json()["rooms"]
        assert ["chat:x", "lobby"] in rooms
    finally:
        await ann.close()


async def test_join_rules_refuse_who_may_not_join(
    servers: tuple[ServerProcess, ServerProcess], db: Any
) -> None:
    first, second = servers
    red = await open_client(first, "ann", claim_team="red")
    blue = await open_client(second, "bob", claim_team="blue")
    nobody = await open_client(second, "cy")
    try:
        assert (await red.request({"type": "join", "room": "team:red"}))["type"] == "joined"
        refused = await blue.request({"type": "join", "room": "team:red"})
        assert refused["type"] == "error" and refused["code"] == "forbidden_room"
        refused = await nobody.request({"type": "join", "room": "team:red"})  # no claim at all
        assert refused["code"] == "forbidden_room"
        unknown = await red.request({"type": "join", "room": "attic"})
        assert unknown["code"] == "unknown_room"

        # Membership documents, checked in the database at join time.
        oid = ObjectId()
        await db["hall_docs"].insert_many(
            [
                {"_id": "plan", "members": ["ann", "cy"]},
                {"_id": oid, "members": ["bob"]},
                {"_id": "other-app", "members": ["bob"], "app_id": "elsewhere"},
            ]
        )
        assert (await red.request({"type": "join", "room": "doc:plan"}))["type"] == "joined"
        assert (await nobody.request({"type": "join", "room": "doc:plan"}))["type"] == "joined"
        refused = await blue.request({"type": "join", "room": "doc:plan"})
        assert refused["code"] == "forbidden_room"
        assert (await blue.request({"type": "join", "room": f"doc:{oid}"}))["type"] == "joined"
        refused = await blue.request({"type": "join", "room": "doc:other-app"})
        assert refused["code"] == "forbidden_room"  # a document of another app admits nobody
        refused = await blue.request({"type": "join", "room": "doc:missing"})
        assert refused["code"] == "forbidden_room"
        # The refused never hear from the room.
        await red.request({"type": "leave", "room": "doc:plan"})
        await asyncio.sleep(0.5)
        assert not [m for m in blue.of_type("presence") if m["room"] == "doc:plan"]
    finally:
        for client in (red, blue, nobody):
            await client.close()


async def test_rooms_only_on_endpoints_that_declare_them(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, _second = servers
    plain = await open_client(first, "ann", "/hall/plain")
    try:
        answer = await plain.request({"type": "join", "room": "lobby"})
        assert answer["type"] == "error" and answer["code"] == "unknown_type"
    finally:
        await plain.close()


async def test_publish_reaches_members_only_once_in_order(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = servers
    ann = await open_client(first, "ann")
    bob = await open_client(second, "bob")
    outsider = await open_client(second, "cy")
    try:
        await ann.request({"type": "join", "room": "chat:go"})
        await bob.request({"type": "join", "room": "chat:go"})
        await outsider.request({"type": "join", "room": "chat:other"})
        refused = await outsider.request({"type": "publish", "room": "chat:go", "data": {}})
        assert refused["code"] == "forbidden_publish"  # not a member
        await ann.request({"type": "join", "room": "news"})
        refused = await ann.request({"type": "publish", "room": "news", "data": {"x": 1}})
        assert refused["code"] == "forbidden_publish"  # the room takes no client messages

        sent = []
        for n in range(30):
            publisher = ann if n % 3 else bob
            await publisher.send(
                {"type": "publish", "id": f"p{n}", "room": "chat:go", "data": {"n": n}}
            )
        for n in range(30):
            publisher = ann if n % 3 else bob
            answer = await publisher.wait_for(lambda m, n=n: m.get("id") == f"p{n}")
            assert answer["type"] == "published"
            sent.append(answer["message_id"])

        def room_messages(client: Client) -> list[dict[str, Any]]:
            return [m for m in client.of_type("room_message") if m["room"] == "chat:go"]

        for client in (ann, bob):
            await client.wait_for(lambda _m, c=client: len(room_messages(c)) >= 30)
        await asyncio.sleep(0.5)  # nothing more arrives: each message once
        got_ann, got_bob = room_messages(ann), room_messages(bob)
        assert len(got_ann) == len(got_bob) == 30
        # Both members see one order (the commit order), and each publisher's in its order.
        assert [m["message_id"] for m in got_ann] == [m["message_id"] for m in got_bob]
        assert sorted(m["message_id"] for m in got_ann) == sorted(sent)
        for user in ("ann", "bob"):
            numbers = [m["data"]["n"] for m in got_ann if m["from"]["user_id"] == user]
            assert numbers == sorted(numbers)
        first_message = got_ann[0]
        assert set(first_message) == {
            "type",
            "room",
            "message_id",
            "from",
            "data",
            "timestamp",
            "id",
        }
        assert first_message["from"]["user_id"] in ("ann", "bob")
        assert not outsider.of_type("room_message")
    finally:
        for client in (ann, bob, outsider):
            await client.close()


async def test_app_code_broadcasts_to_a_room_on_every_process(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = servers
    ann = await open_client(first, "ann")
    bob = await open_client(second, "bob")
    try:
        await ann.request({"type": "join", "room": "news"})
        await bob.request({"type": "join", "room": "news"})
        async with httpx.AsyncClient(base_url=first.url) as http:
            body = {"slug": "hall", "room": "news", "message": {"headline": "rooms"}}
            message_id = (await http.post("/_test/room_broadcast", json=body)).json()["message_id"]
        for client in (ann, bob):
            got = await client.wait_for(lambda m: m.get("message_id") == message_id)
            assert got["type"] == "room_message" and got["data"] == {"headline": "rooms"}
            assert got["from"]["user_id"] is None
    finally:
        await ann.close()
        await bob.close()


async def test_history_on_join_and_messages_missed_while_away(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = servers
    ann = await open_client(first, "ann")
    try:
        await ann.request({"type": "join", "room": "chat:log"})
        for n in range(7):
            await ann.request({"type": "publish", "room": "chat:log", "data": {"n": n}})
        await ann.wait_for(lambda m: m.get("type") == "room_message" and m["data"] == {"n": 6})
        late = await open_client(second, "bob")
        joined = await late.request({"type": "join", "room": "chat:log", "history": True})
        assert [m["data"]["n"] for m in joined["history"]] == [2, 3, 4, 5, 6]  # history: 5
        await late.close()

        seen = [m for m in ann.of_type("room_message") if m["room"] == "chat:log"]
        position = seen[3]["id"]  # the client saw up to n=3, then lost its connection
        back = await open_client(second, "ann", last_event_id=position)
        joined = await back.request({"type": "join", "room": "chat:log"})
        assert [m["data"]["n"] for m in joined["history"]] == [4, 5, 6]
        await back.close()
    finally:
        await ann.close()


async def test_a_killed_process_leaves_every_room(
    servers: tuple[ServerProcess, ServerProcess],
    mongo_uri: str,
    database_name: str,
    tmp_path: Path,
) -> None:
    first, _second = servers
    doomed = start_server(mongo_uri, tmp_path, database_name, "doomed")
    ann = await open_client(first, "ann")
    try:
        victims = [await open_client(doomed, f"v{n}") for n in range(3)]
        for victim in victims:
            await victim.request({"type": "join", "room": "lobby"})
        await ann.request({"type": "join", "room": "lobby"})
        ids = {v.connection_id for v in victims}
        await ann.wait_members("lobby", ids | {ann.connection_id})
        doomed.signal(signal.SIGKILL)
        doomed.wait()
        killed_at = time.monotonic()
        await ann.wait_members("lobby", {ann.connection_id}, timeout=30)
        # Well within SPEC's 30 s with these settings: timeout 2 s + heartbeat 0.5 s.
        assert time.monotonic() - killed_at < 30
        # A new member sees only the living, from the store.
        bob = await open_client(first, "bob")
        joined = await bob.request({"type": "join", "room": "lobby"})
        assert {m["connection_id"] for m in joined["members"]} == {
            ann.connection_id,
            bob.connection_id,
        }
        await bob.close()
    finally:
        await ann.close()
        doomed.stop()


async def test_python_client_joins_again_and_catches_up_after_a_cut(
    servers: tuple[ServerProcess, ServerProcess],
) -> None:
    first, second = servers
    port = int(first.url.rsplit(":", 1)[1])
    proxy = await CutProxy("127.0.0.1", port).start()
    ann_token = issue_token(TEST_SECRET, app_slug="hall", user_id="ann")
    bob_token = issue_token(TEST_SECRET, app_slug="hall", user_id="bob")
    heard: list[Any] = []
    ann = RealtimeClient(
        proxy.url.replace("http://", "ws://") + "/hall/ws",
        token=ann_token,
        backoff=Backoff(initial=0.05, maximum=0.2),
    )
    bob = RealtimeClient(second.ws_url("/hall/ws"), token=bob_token)
    try:
        await ann.connect()
        await bob.connect()
        await ann.join("chat:py", on_message=lambda m: heard.append(m["data"]["n"]))
        joined = await ann.join("lobby", info={"name": "Ann"})
        assert joined["members"][0]["info"] == {"name": "Ann"}
        await bob.join("lobby")
        await bob.join("chat:py")
        await ann.wait_until(lambda: len(ann.members("lobby")) == 2)
        with pytest.raises(RoomError) as refused:
            await bob.join("team:red")
        assert refused.value.code == "forbidden_room"
        await bob.publish("chat:py", {"n": 1})
        await ann.wait_until(lambda: heard == [1])

        first_id = ann.connected_message["connection_id"]  # type: ignore[index]
        await proxy.cut()
        await bob.wait_until(
            lambda: first_id not in {m["connection_id"] for m in bob.members("lobby")}, 15
        )
        for n in (2, 3):
            await bob.publish("chat:py", {"n": n})
        proxy.restore()
        # Back on a new connection, in both rooms again, with what was missed meanwhile.
        await ann.wait_until(lambda: heard == [1, 2, 3], 20)
        await bob.wait_until(lambda: len(bob.members("lobby")) == 2, 15)
        await bob.publish("chat:py", {"n": 4})
        await ann.wait_until(lambda: heard == [1, 2, 3, 4])
        await asyncio.sleep(0.3)
        assert heard == [1, 2, 3, 4]  # nothing twice
    finally:
        await ann.close()
        await bob.close()
        await proxy.close()


async def test_an_app_registered_on_a_running_engine_gets_presence(
    mongo_uri: str, db: Any, tmp_path: Path
) -> None:
    from engine import MongoDBEngine
    from engine.settings import EngineSettings

    engine = MongoDBEngine(mongo_uri, db.name, settings=EngineSettings(data_dir=tmp_path))
    await engine.initialize()
    try:
        assert engine.rooms.store is None  # no app with rooms yet
        manifest = json.loads((ROOM_MANIFESTS / "hall.json").read_text())
        await engine.register_app({**manifest, "slug": "later", "data": {"database": "t_later"}})
        assert engine.rooms.store is not None
        assert engine.rooms.store.databases == {"t_later"}
        mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
        try:
            entry = await mongo["t_later"]["_mdb_realtime_processes"].find_one(
                {"_id": engine.origin}
            )
            assert entry is not None  # heartbeats there from now on
        finally:
            await mongo.drop_database("t_later")
            await mongo.close()
    finally:
        await engine.shutdown()
