"""Several engine processes on one database: broadcasts and resumes cross processes (SPEC 9)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient
from websockets.asyncio.client import ClientConnection

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
    serve_command,
)


@pytest.fixture(scope="module")
def two_processes(
    mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningApp, ServerProcess]]:
    folder = tmp_path_factory.mktemp("two")
    first = start_app_server(mongo_uri, folder, CHANGE_MANIFESTS)
    env = engine_env(
        mongo_uri, folder, MDB_REALTIME_DB=first.db_name, TEST_MANIFESTS=str(CHANGE_MANIFESTS)
    )
    second = ServerProcess(app_under_test_command(), env, folder / "second.log").start()
    try:
        yield first, second
    finally:
        first.server.stop()
        second.stop()


async def client(server: ServerProcess, user: str, path: str = "/shop/ws") -> ClientConnection:
    token = issue_token(TEST_SECRET, app_slug=path.split("/")[1], user_id=user)
    ws = await connect(server.ws_url(path, token=token))
    assert (await receive_json(ws))["type"] == "connected"
    return ws


async def broadcast(server: ServerProcess, slug: str, message: dict[str, Any], **extra: Any) -> int:
    async with httpx.AsyncClient(base_url=server.url) as http:
        body = {"slug": slug, "message": message, **extra}
        response = await http.post("/_test/broadcast", json=body)
        response.raise_for_status()
        reached: int = response.json()["reached"]
        return reached


async def messages_of_type(ws: ClientConnection, kind: str, within: float = 1.5) -> list[dict]:
    found = []
    try:
        while True:
            found.append(await receive_until(ws, kind, within))
    except TimeoutError:
        return found


async def test_broadcast_reaches_every_process_exactly_once(
    two_processes: tuple[RunningApp, ServerProcess],
) -> None:
    first, second = two_processes
    here = [await client(first.server, "ann"), await client(first.server, "bob")]
    there = [await client(second, "ann"), await client(second, "cy")]
    blog_there = await client(second, "ann", "/blog/ws")
    try:
        reached = await broadcast(first.server, "shop", {"type": "hello", "n": 1})
        assert reached == 2  # the connections on the process that broadcast
        for ws in [*here, *there]:
            got = await messages_of_type(ws, "hello")
            assert [m["n"] for m in got] == [1], "missing or delivered twice"
            assert got[0]["app_slug"] == "shop"
        assert await messages_of_type(blog_there, "hello", 0.5) == []

        await broadcast(second, "shop", {"type": "dm"}, user_id="ann")
        assert len(await messages_of_type(here[0], "dm")) == 1
        assert len(await messages_of_type(there[0], "dm")) == 1
        assert await messages_of_type(here[1], "dm", 0.5) == []
        assert await messages_of_type(there[1], "dm", 0.5) == []
    finally:
        for ws in [*here, *there, blog_there]:
            await ws.close()


async def test_changes_reach_every_process_and_a_client_moves_without_gap(
    two_processes: tuple[RunningApp, ServerProcess],
) -> None:
    first, second = two_processes
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(first.mongo_uri)
    news = mongo[first.db_name]["shop_news"]
    a, b = await client(first.server, "ann"), await client(second, "bob")
    try:
        await news.insert_one({"_id": "both"})
        seen_by_a = await receive_until(a, "change")
        assert seen_by_a["document_id"] == "both"
        assert (await receive_until(b, "change"))["document_id"] == "both"
        await a.close()

        await news.insert_many([{"_id": f"moved{n}"} for n in range(3)])
        await broadcast(first.server, "shop", {"type": "while-away"})
        await asyncio.sleep(0.3)  # the broadcast is published before the next write
        await news.insert_one({"_id": "last"})
        assert (await receive_until(b, "change", 10))["document_id"] == "moved0"

        token = issue_token(TEST_SECRET, app_slug="shop", user_id="ann")
        moved = await connect(second.ws_url("/shop/ws", token=token, last_event_id=seen_by_a["id"]))
        sequence = []
        while not sequence or sequence[-1] != "last":
            message = json.loads(await asyncio.wait_for(moved.recv(), 10))
            if message["type"] == "change":
                sequence.append(message["document_id"])
            elif message["type"] == "while-away":
                sequence.append("broadcast")
        await moved.close()
        assert sequence == ["moved0", "moved1", "moved2", "broadcast", "last"]
    finally:
        await b.close()
        await mongo.close()


async def test_serve_with_workers_shares_one_port_and_stops_cleanly(
    mongo_uri: str, tmp_path: Path
) -> None:
    import signal

    env = engine_env(mongo_uri, tmp_path, MDB_REALTIME_DB="workers_db")
    command = serve_command("--workers", "2", "--manifests", str(CHANGE_MANIFESTS))
    server = ServerProcess(command, env, tmp_path / "workers.log").start(timeout=60)
    try:
        assert "with 2 workers" in "".join(server.stdout_lines)
        # Connections spread over both workers; a broadcast reaches all of them via the bus.
        clients = [await client(server, f"u{n}") for n in range(8)]
        async with httpx.AsyncClient(base_url=server.url) as http:
            token = issue_token(
                TEST_SECRET, app_slug="shop", user_id="svc", claims={"role": "service"}
            )
            response = await http.post(
                "/shop/broadcast",
                json={"message": {"type": "to-all"}},
                headers={"Authorization": f"Bearer {token}"},
            )
            assert response.status_code == 200, response.text
        for ws in clients:
            assert len(await messages_of_type(ws, "to-all")) == 1
            await ws.close()
        pids = worker_pids(server.pid)
        workers = [pid for pid in pids if "resource_tracker" not in command_line(pid)]
        assert len(workers) == 2
    finally:
        server.signal(signal.SIGTERM)
        code = server.wait(30)
    assert code == 0
    for _ in range(50):  # the workers are gone soon after their supervisor
        if not any(Path(f"/proc/{pid}").exists() for pid in workers):
            break
        await asyncio.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker is left"


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def worker_pids(parent: int) -> list[int]:
    children = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(pid) for pid in children.read_text().split()] if children.exists() else []
