"""Nothing lost: resume by position, snapshots, crashes, slow consumers, big writes (SPEC 6)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from engine.auth import issue_token
from tests.conftest import RunningApp, start_app_server
from tests.support import (
    CHANGE_MANIFESTS,
    TEST_SECRET,
    ServerProcess,
    app_under_test_command,
    connect,
    engine_env,
    receive_json,
    receive_until,
)
from tests.test_changes import changes, no_change
from tests.test_messages import next_frame


def url(
    app: RunningApp | ServerProcess, path: str = "/shop/ws", user: str = "ann", **query: str
) -> str:
    server = app.server if isinstance(app, RunningApp) else app
    token = issue_token(TEST_SECRET, app_slug=path.split("/")[1], user_id=user)
    return server.ws_url(path, token=token, **query)


async def open_ws(
    app: RunningApp | ServerProcess, user: str = "ann", **query: str
) -> ClientConnection:
    ws = await connect(url(app, user=user, **query), max_size=None)
    assert (await receive_json(ws))["type"] == "connected"
    return ws


async def test_resume_from_memory_sends_exactly_what_was_missed(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    news = db["shop_news"]
    ws = await open_ws(change_app)
    await news.insert_many([{"_id": f"m{n}"} for n in range(3)])
    seen = await changes(ws, 3)
    await ws.close()
    await news.insert_many([{"_id": f"m{n}"} for n in range(3, 6)])
    ws = await open_ws(change_app, last_event_id=seen[1]["id"])
    try:
        replayed = await changes(ws, 4)
        assert [m["document_id"] for m in replayed] == ["m2", "m3", "m4", "m5"]
        await news.insert_one({"_id": "live"})
        assert (await changes(ws, 1))[0]["document_id"] == "live"
        await no_change(ws)
    finally:
        await ws.close()


async def test_unknown_position_gets_resync_required_then_live(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    ws = await open_ws(change_app, last_event_id="not-a-position")
    try:
        resync = await receive_until(ws, "resync_required")
        assert resync["reason"] in {"unknown_position", "history_lost"}
        await db["shop_news"].insert_one({"_id": "after-resync"})
        assert (await changes(ws, 1))[0]["document_id"] == "after-resync"
    finally:
        await ws.close()


async def writer(news: Any, prefix: str, count: int, pause: float = 0.005) -> list[str]:
    written = []
    for n in range(count):
        await news.insert_one({"_id": f"{prefix}{n:05d}"})
        written.append(f"{prefix}{n:05d}")
        await asyncio.sleep(pause)
    return written


async def collect_until(ws: ClientConnection, last_id: str, timeout: float = 60) -> list[str]:
    received: list[str] = []
    while not received or received[-1] != last_id:
        received.append((await changes(ws, 1, timeout))[0]["document_id"])
    return received


async def test_resume_from_database_history_on_another_process_while_writes_go_on(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]], tmp_path: Path
) -> None:
    """A second engine keeps almost no history in memory: it replays from MongoDB's history,
    then live, while writes continue; none missing, none twice."""
    env = engine_env(
        change_app.mongo_uri,
        tmp_path,
        MDB_REALTIME_DB=change_app.db_name,
        TEST_MANIFESTS=str(CHANGE_MANIFESTS),
        MDB_REALTIME_HISTORY_EVENTS="2",
    )
    other = ServerProcess(app_under_test_command(), env, tmp_path / "other.log").start()
    news = db["shop_news"]
    try:
        ws = await open_ws(change_app)
        await news.insert_one({"_id": "h-start"})
        (start,) = await changes(ws, 1)
        await ws.close()
        missed = await writer(news, "h-missed-", 60, pause=0)
        during = asyncio.create_task(writer(news, "h-during-", 80))
        ws = await open_ws(other, last_event_id=start["id"])
        written = missed + await during
        received = await collect_until(ws, written[-1])
        await ws.close()
        assert received == written
    finally:
        other.stop()


async def test_snapshot_then_changes_with_writes_running(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    orders = db["shop_orders"]
    await orders.insert_many(
        [{"_id": f"s{n:03d}", "owner_id": "snap", "qty": n, "item": "x"} for n in range(40)]
    )
    await orders.insert_one({"_id": "other-user", "owner_id": "someone", "qty": 99})

    async def churn() -> None:
        for n in range(40, 140):
            await orders.insert_one({"_id": f"s{n:03d}", "owner_id": "snap", "qty": n})
            await orders.update_one({"_id": f"s{n - 40:03d}"}, {"$set": {"qty": -n}})
            if n % 3 == 0:
                await orders.delete_one({"_id": f"s{n - 39:03d}"})

    ws = await connect(url(change_app, user="snap"))
    await receive_until(ws, "connected")
    running = asyncio.create_task(churn())
    await asyncio.sleep(0.05)
    await ws.send(
        json.dumps({"type": "subscribe", "id": "all", "collection": "orders", "snapshot": True})
    )
    snapshot = await receive_until(ws, "snapshot", timeout=20, answer_pings=True)
    assert snapshot["event_id"] and snapshot["collection"] == "orders"
    view = {d["_id"]: d for d in snapshot["documents"]}
    assert "other-user" not in view
    await running
    await orders.insert_one({"_id": "zz-sentinel", "owner_id": "snap", "qty": 0})
    while True:
        message = await receive_until(ws, "change", timeout=20, answer_pings=True)
        if message["operation"] == "delete":
            view.pop(message["document_id"], None)
        else:
            view[message["document_id"]] = message["document"]
        if message["document_id"] == "zz-sentinel":
            break
    await ws.close()
    fields = ["item", "qty", "owner_id", "status"]
    expected = {
        d["_id"]: {"_id": d["_id"], **{k: d[k] for k in fields if k in d}}
        async for d in orders.find({"owner_id": "snap", "status": {"$ne": "hidden"}})
    }
    assert view == expected


async def test_engine_killed_and_restarted_client_ends_with_the_full_sequence(
    mongo_uri: str, tmp_path: Path
) -> None:
    app = start_app_server(mongo_uri, tmp_path, CHANGE_MANIFESTS)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    news = client[app.db_name]["shop_news"]
    received: list[str] = []
    last_id = ""
    try:
        ws = await open_ws(app)
        writing = asyncio.create_task(writer(news, "k", 300, pause=0.01))
        while len(received) < 50:
            message = await receive_until(ws, "change", answer_pings=True)
            received.append(message["document_id"])
            last_id = message["id"]
        os.kill(app.server.pid, signal.SIGKILL)
        app.server.wait()
        with pytest.raises(ConnectionClosed):
            while True:  # what was already on the wire before the kill still counts
                message = await receive_until(ws, "change", timeout=10)
                received.append(message["document_id"])
                last_id = message["id"]
        await asyncio.sleep(0.5)  # writes go on while the engine is down
        restarted = ServerProcess(app.server.command, app.server.env, tmp_path / "again.log")
        restarted.start()
        ws = await open_ws(restarted, last_event_id=last_id)
        written = await writing
        received += await collect_until(ws, written[-1])
        await ws.close()
        restarted.stop()
        assert len(received) == len(set(received)), "duplicates"
        assert received == written
    finally:
        await client.close()
        app.server.stop()


def url_token(app: RunningApp, user: str) -> str:
    return issue_token(TEST_SECRET, app_slug="shop", user_id=user)


def stalled_client(server: ServerProcess, path: str, token: str) -> socket.socket:
    """A raw WebSocket client with a small receive buffer that reads nothing after the
    handshake: its socket backs up quickly once the server writes to it."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path}?token={token} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # byte by byte: leave every frame unread
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


def read_until_close(sock: socket.socket) -> tuple[list[dict[str, Any]], int | None]:
    """Every text message the server sent, and the code of its close frame."""
    sock.settimeout(10)
    data, offset, messages = bytearray(), 0, []
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return messages, None
        data += chunk
        while (frame := next_frame(data, offset)) is not None:
            opcode, payload, offset = frame
            if opcode == 0x8:
                return messages, int.from_bytes(payload[:2], "big")
            messages.append(json.loads(payload))


async def wait_until_gone(app: RunningApp, user: str, timeout: float = 60) -> None:
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        for _ in range(int(timeout / 0.05)):
            counts = (await http.get("/_test/counts/shop", params={"user": user})).json()
            if counts["user"] == 0:
                return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{user}'s connection is still open")


async def test_slow_consumer_closed_with_1013_resumes_with_everything(
    mongo_uri: str, tmp_path: Path
) -> None:
    app = start_app_server(
        mongo_uri,
        tmp_path,
        CHANGE_MANIFESTS,
        MDB_REALTIME_QUEUE_MAX_MESSAGES="20",
        MDB_REALTIME_QUEUE_MAX_BYTES=str(256 * 1024),
    )
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    news = client[app.db_name]["shop_news"]
    try:
        # A raw client that completes the handshake and then does not read for a while.
        stalled = stalled_client(app.server, "/shop/ws", url_token(app, "slow"))
        written = [f"big{n:04d}" for n in range(2000)]
        inserting = asyncio.create_task(
            news.insert_many([{"_id": i, "pad": "x" * 8000} for i in written])
        )
        await wait_until_gone(app, "slow")  # the server closed it: its queue overflowed
        messages, close_code = await asyncio.to_thread(read_until_close, stalled)
        await inserting
        assert close_code == 1013
        changes_seen = [m for m in messages if m["type"] == "change"]
        received = [m["document_id"] for m in changes_seen]
        last_id = changes_seen[-1]["id"]
        assert len(received) < len(written)
        received += await resume_until(app, "slow", last_id, written[-1])
        assert received == written
    finally:
        await client.close()
        app.server.stop()


async def resume_until(app: RunningApp, user: str, last_event_id: str, last_doc: str) -> list[str]:
    """Document ids from resuming at `last_event_id` until `last_doc`, as a client does: a
    resumed connection may itself be closed as a slow consumer (the engine's stream can still
    be delivering the burst faster than this client reads); it then resumes again from the
    last id it got."""
    received: list[str] = []
    for _ in range(20):
        ws = await open_ws(app.server, user=user, last_event_id=last_event_id)
        try:
            while not received or received[-1] != last_doc:
                change = (await changes(ws, 1, 60))[0]
                received.append(change["document_id"])
                last_event_id = change["id"]
            await ws.close()
            return received
        except ConnectionClosed as closed:
            assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
    raise AssertionError(f"not caught up after 20 resumes: {len(received)} changes")


async def test_large_documents_bulk_inserts_and_transactions_arrive(
    change_app: RunningApp, db: AsyncDatabase[dict[str, Any]]
) -> None:
    news = db["shop_news"]
    ws = await open_ws(change_app)
    try:
        big = "y" * (15 * 1024 * 1024)  # close to the 16 MB BSON limit
        await news.insert_one({"_id": "huge", "body": big})
        (huge,) = await changes(ws, 1, timeout=60)
        assert huge["document"]["body"] == big

        await news.insert_many([{"_id": f"bulk{n:04d}"} for n in range(1000)])
        bulk = await changes(ws, 1000, timeout=60)
        assert [m["document_id"] for m in bulk] == [f"bulk{n:04d}" for n in range(1000)]

        client = db.client
        async with client.start_session() as session, await session.start_transaction():
            await news.insert_one({"_id": "tx1"}, session=session)
            await news.insert_one({"_id": "tx2"}, session=session)
            await news.update_one({"_id": "tx1"}, {"$set": {"n": 1}}, session=session)
        whole = await receive_until(ws, "transaction", 10, answer_pings=True)
        assert [(m["operation"], m["document_id"]) for m in whole["changes"]] == [
            ("insert", "tx1"),
            ("insert", "tx2"),
            ("update", "tx1"),
        ]
        assert {m["id"] for m in whole["changes"]} == {whole["id"]}
    finally:
        await ws.close()
