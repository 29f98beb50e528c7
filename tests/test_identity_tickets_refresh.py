"""Connection tickets across two engine processes, and token refresh over the socket (SPEC 12).

Two test-app processes serve one database: a ticket issued by one opens a connection on the
other, once. The `brief` app sets `ticket_ttl_seconds: 1` to see tickets expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import RunningApp, start_app_server
from tests.support import (
    TEST_SECRET,
    ServerProcess,
    app_under_test_command,
    connect,
    engine_env,
    receive_json,
    receive_until,
)

MANIFESTS: dict[str, dict[str, Any]] = {
    "alpha": {
        "slug": "alpha",
        "name": "Alpha",
        "websockets": {
            "realtime": {
                "path": "/ws",
                "ping_interval": 300,
                "watch": {"notes": {"scope": {"org": "$claims.org_id"}}},
            },
            "open": {"path": "/open", "ping_interval": 300, "auth": {"allow_anonymous": True}},
        },
    },
    "brief": {
        "slug": "brief",
        "name": "Brief",
        "websockets": {"realtime": {"path": "/ws", "ticket_ttl_seconds": 1}},
    },
}


@pytest.fixture(scope="module")
def two(
    mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningApp, ServerProcess]]:
    folder = tmp_path_factory.mktemp("tickets")
    manifests = folder / "manifests"
    manifests.mkdir()
    for slug, manifest in MANIFESTS.items():
        (manifests / f"{slug}.json").write_text(json.dumps(manifest))
    first = start_app_server(mongo_uri, folder, manifests)
    env = engine_env(
        mongo_uri, folder, MDB_REALTIME_DB=first.db_name, TEST_MANIFESTS=str(manifests)
    )
    second = ServerProcess(app_under_test_command(), env, folder / "second.log").start()
    try:
        yield first, second
    finally:
        first.server.stop()
        second.stop()


def token(user: str = "ann", app: str = "alpha", ttl: int = 600, **claims: Any) -> str:
    payload = {"sub": user, "aud": app, "exp": int(time.time()) + ttl, **claims}
    return jwt.encode(payload, TEST_SECRET, algorithm="HS256")


async def ticket_from(
    server: ServerProcess, bearer: str | None, slug: str = "alpha"
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer is not None else {}
    async with httpx.AsyncClient(base_url=server.url) as http:
        return await http.post(f"/{slug}/ticket", headers=headers)


async def issued(server: ServerProcess, bearer: str, slug: str = "alpha") -> dict[str, Any]:
    response = await ticket_from(server, bearer, slug)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


async def close_of(ws: ClientConnection, timeout: float = 10.0) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            message = await receive_json(ws, timeout)
            assert message["type"] != "echo", "a message was processed before the close"
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def refused(server: ServerProcess, path: str, **query: str) -> tuple[int, str]:
    async with await connect(server.ws_url(path, **query)) as ws:
        with contextlib.suppress(ConnectionClosed):
            await ws.send('{"type": "probe"}')
        return await close_of(ws)


# -- tickets ---------------------------------------------------------------------------------------


async def test_a_ticket_opens_one_connection_once(two: tuple[RunningApp, ServerProcess]) -> None:
    server = two[0].server
    body = await issued(server, token("ann", email="ann@example.com"))
    assert body["expires_in"] == 30 and body["ticket"].startswith("mrt_")
    async with await connect(server.ws_url("/alpha/ws", ticket=body["ticket"])) as ws:
        hello = await receive_json(ws)
        assert (hello["user_id"], hello["user_email"]) == ("ann", "ann@example.com")
    assert await refused(server, "/alpha/ws", ticket=body["ticket"]) == (1008, "invalid ticket")


async def test_a_ticket_is_valid_on_another_process_and_only_once(
    two: tuple[RunningApp, ServerProcess],
) -> None:
    first, second = two[0].server, two[1]
    ticket = (await issued(first, token("bob")))["ticket"]
    async with await connect(second.ws_url("/alpha/ws", ticket=ticket)) as ws:
        assert (await receive_json(ws))["user_id"] == "bob"
    for server in (first, second):
        assert await refused(server, "/alpha/ws", ticket=ticket) == (1008, "invalid ticket")


async def test_one_ticket_raced_on_two_processes_opens_one_connection(
    two: tuple[RunningApp, ServerProcess],
) -> None:
    first, second = two[0].server, two[1]
    for _ in range(5):
        ticket = (await issued(first, token("racer")))["ticket"]

        async def attempt(server: ServerProcess, ticket: str = ticket) -> str:
            async with await connect(server.ws_url("/alpha/ws", ticket=ticket)) as ws:
                try:
                    return str((await receive_json(ws))["type"])
                except ConnectionClosed as closed:
                    assert closed.rcvd is not None
                    return closed.rcvd.reason

        outcomes = await asyncio.gather(attempt(first), attempt(second))
        assert sorted(outcomes) == ["connected", "invalid ticket"]


async def test_an_expired_ticket_is_refused(two: tuple[RunningApp, ServerProcess]) -> None:
    server = two[0].server
    body = await issued(server, token("cy", app="brief"), "brief")
    assert body["expires_in"] == 1
    await asyncio.sleep(2.0)
    assert await refused(server, "/brief/ws", ticket=body["ticket"]) == (1008, "invalid ticket")


async def test_tickets_are_refused_elsewhere_and_when_made_up(
    two: tuple[RunningApp, ServerProcess],
) -> None:
    server = two[0].server
    ticket = (await issued(server, token("dee")))["ticket"]
    assert await refused(server, "/brief/ws", ticket=ticket) == (1008, "invalid ticket")
    # Used up by the attempt at the wrong app? No: it was never this app's, it is still good.
    async with await connect(server.ws_url("/alpha/ws", ticket=ticket)) as ws:
        assert (await receive_json(ws))["user_id"] == "dee"
    for made_up in ("mrt_" + "A" * 43, "nonsense", "mrt_", "x" * 500):
        assert await refused(server, "/alpha/ws", ticket=made_up) == (1008, "invalid ticket")
    good = (await issued(server, token("eve")))["ticket"]
    url = server.ws_url("/alpha/ws") + f"?ticket={good}&ticket=mrt_other"
    async with await connect(url) as ws:
        assert await close_of(ws) == (1008, "invalid ticket")
    # A ticket is the credential when present: a valid token beside it does not rescue it.
    assert await refused(server, "/alpha/ws", ticket="mrt_bad", token=token("eve")) == (
        1008,
        "invalid ticket",
    )


async def test_the_ticket_route_needs_a_valid_token(two: tuple[RunningApp, ServerProcess]) -> None:
    server = two[0].server
    assert (await ticket_from(server, None)).status_code == 401
    assert (await ticket_from(server, "not-a-token")).status_code == 401
    expired = await ticket_from(server, token(ttl=-10))
    assert (expired.status_code, expired.json()["detail"]) == (401, "token expired")
    other_app = await ticket_from(server, token(app="brief"))
    assert (other_app.status_code, other_app.json()["detail"]) == (401, "invalid token")


async def test_tickets_and_tokens_never_reach_the_logs(
    two: tuple[RunningApp, ServerProcess],
) -> None:
    first, second = two[0].server, two[1]
    secrets_seen = []
    for server in (first, second):
        bearer = token("logged")
        ticket = (await issued(server, bearer))["ticket"]
        secrets_seen += [bearer, ticket]
        async with await connect(server.ws_url("/alpha/ws", ticket=ticket)) as ws:
            await receive_json(ws)
        await refused(server, "/alpha/ws", ticket=ticket)
    await asyncio.sleep(0.5)  # the access lines are written
    logs = first.logs() + second.logs()
    assert re.search(r"/alpha/ws\?\[redacted\]", logs), "the WebSocket access lines are missing"
    assert "/alpha/ticket" in logs
    for secret in secrets_seen:
        assert secret not in logs
        assert secret[4:20] not in logs


# -- refresh ---------------------------------------------------------------------------------------


async def connected(
    server: ServerProcess, bearer: str, path: str = "/alpha/ws"
) -> ClientConnection:
    ws = await connect(server.ws_url(path, token=bearer))
    assert (await receive_json(ws))["type"] == "connected"
    return ws


async def test_refresh_moves_the_expiry(two: tuple[RunningApp, ServerProcess]) -> None:
    server = two[0].server
    ws = await connected(server, token("fay", ttl=2, org_id="o1"))
    try:
        fresh_exp = int(time.time()) + 600
        fresh = jwt.encode(
            {"sub": "fay", "aud": "alpha", "exp": fresh_exp, "org_id": "o1", "role": "new"},
            TEST_SECRET,
        )
        await ws.send(json.dumps({"type": "auth", "id": "r1", "token": fresh}))
        answer = await receive_until(ws, "auth_ok")
        assert answer["id"] == "r1"
        assert datetime.fromisoformat(answer["expires_at"]).timestamp() == fresh_exp
        await asyncio.sleep(3.5)  # past the first token's expiry: still open
        await ws.send(json.dumps({"type": "probe", "id": "p"}))
        assert (await receive_until(ws, "echo"))["received"]["id"] == "p"
    finally:
        await ws.close()


async def test_refresh_then_the_new_expiry_closes(two: tuple[RunningApp, ServerProcess]) -> None:
    ws = await connected(two[0].server, token("gus", ttl=600))
    closes_at = int(time.time()) + 2
    shorter = jwt.encode({"sub": "gus", "aud": "alpha", "exp": closes_at}, TEST_SECRET)
    await ws.send(json.dumps({"type": "auth", "id": 2, "token": shorter}))
    assert (await receive_until(ws, "auth_ok"))["id"] == 2
    assert await close_of(ws) == (1008, "token expired")
    assert time.time() >= closes_at - 0.2


@pytest.mark.parametrize(
    "other",
    [
        {"sub": "somebody-else"},
        {"sub": "hal", "org_id": "another-org"},  # a value the endpoint's scope reads
    ],
)
async def test_refresh_with_another_identity_closes(
    two: tuple[RunningApp, ServerProcess], other: dict[str, Any]
) -> None:
    ws = await connected(two[1], token("hal", org_id="o1"))
    other_token = jwt.encode({"aud": "alpha", "exp": int(time.time()) + 600, **other}, TEST_SECRET)
    await ws.send(json.dumps({"type": "auth", "id": "x", "token": other_token}))
    with contextlib.suppress(ConnectionClosed):
        await ws.send('{"type": "probe"}')
    assert await close_of(ws) == (1008, "identity changed")


async def test_an_anonymous_connection_cannot_become_a_user(
    two: tuple[RunningApp, ServerProcess],
) -> None:
    ws = await connect(two[0].server.ws_url("/alpha/open"))
    assert (await receive_json(ws))["authenticated"] is False
    await ws.send(json.dumps({"type": "auth", "id": "a", "token": token("ivy")}))
    assert await close_of(ws) == (1008, "identity changed")


async def test_a_bad_refresh_token_changes_nothing(two: tuple[RunningApp, ServerProcess]) -> None:
    ws = await connected(two[0].server, token("jo", ttl=4, org_id="o1"))
    closes_at = int(time.time()) + 4
    bad = [
        ("forged", jwt.encode({"sub": "jo", "aud": "alpha", "exp": 2**32}, "other-secret" * 3)),
        ("expired", token("jo", ttl=-5, org_id="o1")),
        ("other app", token("jo", app="brief", org_id="o1")),
        ("not a string", 5),
        ("missing", None),
    ]
    for ref, candidate in bad:
        message: dict[str, Any] = {"type": "auth", "id": ref}
        if candidate is not None:
            message["token"] = candidate
        await ws.send(json.dumps(message))
        answer = await receive_until(ws, "error")
        assert (answer["code"], answer["ref"]) == ("invalid_token", ref)
    await ws.send(json.dumps({"type": "probe", "id": "still"}))
    assert (await receive_until(ws, "echo"))["received"]["id"] == "still"
    # The first token's expiry still holds.
    assert await close_of(ws) == (1008, "token expired")
    assert time.time() >= closes_at - 0.2


async def test_a_ticket_connection_can_refresh(two: tuple[RunningApp, ServerProcess]) -> None:
    first, second = two[0].server, two[1]
    ticket = (await issued(first, token("kim", ttl=2, org_id="o1")))["ticket"]
    ws = await connect(second.ws_url("/alpha/ws", ticket=ticket))
    try:
        assert (await receive_json(ws))["user_id"] == "kim"
        await ws.send(json.dumps({"type": "auth", "id": 1, "token": token("kim", org_id="o1")}))
        await receive_until(ws, "auth_ok")
        await asyncio.sleep(2.5)
        await ws.send(json.dumps({"type": "probe", "id": "alive"}))
        assert (await receive_until(ws, "echo"))["received"]["id"] == "alive"
    finally:
        await ws.close()
