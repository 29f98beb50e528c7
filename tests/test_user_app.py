"""A user's own FastAPI app, run by plain uvicorn, mounting the engine both mdb-engine ways:
the direct write path on every WebSocket implementation, the environment's limits, safe
defaults for many users from one address, and a manifest written for mdb-engine 0.15."""

from __future__ import annotations

import asyncio
import json
import resource
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from pymongo import AsyncMongoClient
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.auth import issue_token
from tests.conftest import RunningApp
from tests.support import (
    REPO,
    TEST_SECRET,
    ServerProcess,
    connect,
    engine_env,
    receive_json,
    receive_until,
)

CUSTOM = "/custom/ws"  # mounted with create_websocket_endpoint, app "beta", no token needed

# A manifest as mdb-engine 0.15 apps write them: every key it defines that this engine did not.
MDB_ENGINE_015_MANIFEST: dict[str, Any] = {
    "schema_version": "2.0",
    "slug": "alpha",
    "name": "Alpha",
    "websocket_ticket_store": "memory",
    "cors": {"enabled": True, "allow_credentials": True},
    "collections": {"notes": {"realtime": True}, "logs": {"realtime": False}},
    "websockets": {
        "realtime": {
            "path": "/ws",
            "require_auth": False,
            "ticket_ttl_seconds": 60,
            "auth": {"csrf_required": True},
        },
        "private": {"path": "/private"},
    },
}

# uvicorn's --ws value (None: no flag, uvicorn's default), the implementation the engine should
# find, and how frames should go out. Behind middleware that hides the server, the engine
# falls back to the queued path through the ASGI `send`.
IMPLEMENTATIONS = {
    "default": (None, "websockets-sansio", "DirectSink"),
    "websockets-sansio": ("websockets-sansio", "websockets-sansio", "DirectSink"),
    "websockets": ("websockets", "websockets", "DirectSink"),
    "wsproto": ("wsproto", "wsproto", "DirectSink"),
    "engine-protocol": (
        "engine.wsprotocol:EngineWebSocketProtocol",
        "websockets-sansio",
        "DirectSink",
    ),
    "server-hidden": (None, "none", "QueuedSink"),
}


def user_app_command(ws: str | None) -> list[str]:
    """`uvicorn tests.apps.user_app:app` as a user types it; its log on stdout, where the
    URL is read from, and as many open files as the system allows."""
    uvicorn = [sys.executable, "-m", "uvicorn", "tests.apps.user_app:app", "--port", "0"]
    if ws is not None:
        uvicorn += ["--ws", ws]
    return ["sh", "-c", f"ulimit -n $(ulimit -Hn); exec {shlex.join(uvicorn)} 2>&1"]


def start_user_app(
    mongo_uri: str, folder: Path, ws: str | None = None, **extra_env: str
) -> RunningApp:
    manifest = folder / "alpha.json"
    manifest.write_text(json.dumps(MDB_ENGINE_015_MANIFEST))
    db = f"t_{uuid.uuid4().hex[:12]}"
    env = engine_env(mongo_uri, folder, MDB_REALTIME_DB=db, TEST_MANIFEST=str(manifest))
    env.update(extra_env)
    env = {key: value for key, value in env.items() if value != ""}  # "": left unset
    server = ServerProcess(user_app_command(ws), env, folder / "server.log").start()
    return RunningApp(server, mongo_uri, db)


@pytest.fixture(scope="module", params=list(IMPLEMENTATIONS))
def user_app(
    request: pytest.FixtureRequest, mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, RunningApp]]:
    ws, implementation, sink = IMPLEMENTATIONS[request.param]
    folder = tmp_path_factory.mktemp(f"user-app-{request.param}")
    hidden = {"TEST_OPAQUE_MIDDLEWARE": "1"} if request.param == "server-hidden" else {}
    app = start_user_app(mongo_uri, folder, ws, **hidden)
    try:
        yield implementation, sink, app
    finally:
        app.server.stop()


async def connections_of(app: RunningApp, slug: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        answer: dict[str, Any] = (await http.get(f"/_test/connections/{slug}")).json()
        return answer


async def broadcast(app: RunningApp, slug: str, message: dict[str, Any]) -> int:
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        reached: int = (await http.post(f"/_test/broadcast/{slug}", json=message)).json()["reached"]
        return reached


async def test_both_mounting_ways_write_frames_straight_to_the_socket(
    user_app: tuple[str, str, RunningApp],
) -> None:
    implementation, sink, app = user_app
    async with httpx.AsyncClient(base_url=app.server.url) as http:
        hello = await http.get("/hello")  # the app's own route, through its own middleware
        assert hello.json() == {"hello": "world"} and hello.headers["x-user-app"] == "yes"
    # The client offers per-message compression, as browsers do; the engine declines it.
    async with (
        await connect(app.server.ws_url("/alpha/ws")) as routes_ws,
        await connect(app.server.ws_url(CUSTOM)) as custom_ws,
    ):
        for ws, slug in ((routes_ws, "alpha"), (custom_ws, "beta")):
            assert (await receive_json(ws))["type"] == "connected"
            if sink == "DirectSink":
                assert ws.protocol.extensions == []
            state = await connections_of(app, slug)
            assert state == {
                "count": 1,
                "sinks": [sink],
                "implementations": [implementation],
            }
            big = "é" * 70_000  # a frame with a 64-bit length, multi-byte text
            assert await broadcast(app, slug, {"type": "small"}) == 1
            assert await broadcast(app, slug, {"type": "big", "text": big}) == 1
            assert (await receive_until(ws, "small"))["app_slug"] == slug
            assert (await receive_until(ws, "big"))["text"] == big
        await custom_ws.send(json.dumps({"type": "say", "n": 1}))
        assert (await receive_until(custom_ws, "echo"))["received"] == {"type": "say", "n": 1}


@pytest.fixture(scope="module")
def limited_user_app(
    mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningApp]:
    """Limits from the environment; the URI and the secret under mdb-engine's names only."""
    app = start_user_app(
        mongo_uri,
        tmp_path_factory.mktemp("user-app-limited"),
        MONGODB_URI="",
        MDB_MONGO_URI=mongo_uri,
        MDB_REALTIME_JWT_SECRET="",
        MDB_JWT_SECRET=TEST_SECRET,
        MDB_REALTIME_MAX_CONNECTIONS_PER_USER="1",
        MDB_REALTIME_MAX_CONNECTIONS_PER_IP="3",
    )
    try:
        yield app
    finally:
        app.server.stop()


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await receive_json(ws)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def test_limits_from_the_environment_apply_on_both_mounting_ways(
    limited_user_app: RunningApp,
) -> None:
    server = limited_user_app.server
    alpha = issue_token(TEST_SECRET, app_slug="alpha", user_id="ann")  # signed as MDB_JWT_SECRET
    beta = issue_token(TEST_SECRET, app_slug="beta", user_id="ann")
    opened = []
    try:
        for path, token in (("/alpha/private", alpha), (CUSTOM, beta)):
            first = await connect(server.ws_url(path, token=token))
            opened.append(first)
            hello = await receive_json(first)
            assert (hello["type"], hello["user_id"]) == ("connected", "ann")
            second = await connect(server.ws_url(path, token=token))  # one per user and app
            opened.append(second)
            assert await closed_with(second) == (1008, "too many connections")
        third = await connect(server.ws_url("/alpha/ws"))  # the third from this address
        opened.append(third)
        assert (await receive_json(third))["type"] == "connected"
        fourth = await connect(server.ws_url(CUSTOM))
        opened.append(fourth)
        assert await closed_with(fourth) == (1008, "too many connections")
    finally:
        for ws in opened:
            await ws.close()


async def test_three_thousand_users_from_one_address_with_default_settings(
    mongo_uri: str, tmp_path: Path
) -> None:
    """As behind a reverse proxy: every connection comes from one address."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    count = 3000
    if hard < count + 500:
        pytest.skip(f"needs {count + 500} open files, the system allows {hard}")
    app = start_user_app(mongo_uri, tmp_path)  # uvicorn's defaults, the engine's defaults
    clients: list[ClientConnection] = []
    try:
        for path in ("/alpha/ws", CUSTOM):
            for start in range(0, count // 2, 100):  # 100 handshakes at a time
                batch = await asyncio.gather(
                    *(
                        websockets.connect(app.server.ws_url(path), open_timeout=60)
                        for _ in range(start, min(start + 100, count // 2))
                    )
                )
                clients += batch
        hellos = await asyncio.gather(*(receive_json(ws, timeout=60) for ws in clients))
        assert {hello["type"] for hello in hellos} == {"connected"}
        assert (await connections_of(app, "alpha"))["count"] == count // 2
        assert (await connections_of(app, "beta"))["count"] == count // 2
        assert await broadcast(app, "alpha", {"type": "all"}) == count // 2
        assert await broadcast(app, "beta", {"type": "all"}) == count // 2
        got = await asyncio.gather(*(receive_until(ws, "all", timeout=60) for ws in clients))
        assert len(got) == count
    finally:
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
        app.server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_an_mdb_engine_015_manifest_is_honoured(
    limited_user_app: RunningApp,
) -> None:
    server = limited_user_app.server
    logs = "".join(server.stdout_lines)
    assert "manifest of app 'alpha': websocket_ticket_store: warning:" in logs  # one line
    assert "ticket_ttl_seconds: warning" not in logs  # it sets the app's ticket lifetime
    # csrf_required: a page of another site may not open the socket; one of this host may.
    with pytest.raises(InvalidStatus) as refused:
        await connect(server.ws_url("/alpha/ws"), origin="https://evil.example")
    assert refused.value.response.status_code == 403
    host = server.url.removeprefix("http://")
    async with await connect(server.ws_url("/alpha/ws"), origin=f"http://{host}") as ws:
        hello = await receive_json(ws)
        assert (hello["type"], hello["authenticated"]) == ("connected", False)  # require_auth
        # collections.notes.realtime: the app's endpoint is bound to notes.
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(limited_user_app.mongo_uri)
        try:
            database = client[limited_user_app.db_name]
            await database["alpha_logs"].insert_one({"text": "not bound"})
            await database["alpha_notes"].insert_one({"text": "bound"})
        finally:
            await client.close()
        change = await receive_until(ws, "change", timeout=15, answer_pings=True)
        assert (change["collection"], change["document"]["text"]) == ("notes", "bound")


def test_validate_accepts_an_mdb_engine_015_manifest_with_warnings(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "alpha.json"
    path.write_text(json.dumps(MDB_ENGINE_015_MANIFEST))
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "validate", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"{path}: websocket_ticket_store: warning: not used: connection tickets are always "
        "kept in the engine's database (collection mdb_realtime_tickets)",
        "1 manifest(s) valid",
    ]
