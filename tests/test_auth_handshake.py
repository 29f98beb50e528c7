"""Authentication over real sockets: token sources, every rejection, origin, expiry, logs."""

from __future__ import annotations

import asyncio
import contextlib
import time

import jwt
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engine.auth import issue_token
from tests.support import TEST_SECRET, ServerProcess, connect, receive_json, receive_until


def token(user: str = "u1", **overrides: object) -> str:
    claims: dict[str, object] = {"sub": user, "exp": int(time.time()) + 600}
    claims.update(overrides)
    claims = {k: v for k, v in claims.items() if v is not None}
    return jwt.encode(claims, TEST_SECRET, algorithm="HS256")


async def expect_close(ws: websockets.ClientConnection, code: int, reason: str) -> None:
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            message = await receive_json(ws)
            assert message["type"] != "echo", "a message was processed before the close"
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (code, reason)


async def test_connected_message_with_query_token(app_server: ServerProcess) -> None:
    good = issue_token(TEST_SECRET, app_slug="alpha", user_id="ann", email="ann@example.com")
    async with await connect(app_server.ws_url("/alpha/ws", token=good)) as ws:
        hello = await receive_json(ws)
    assert hello["type"] == "connected"
    assert hello["app_slug"] == "alpha" and hello["endpoint"] == "realtime"
    assert hello["authenticated"] is True
    assert (hello["user_id"], hello["user_email"]) == ("ann", "ann@example.com")
    assert hello["ping_interval"] == 30 and hello["protocol"] == 1
    assert hello["connection_id"] and hello["timestamp"].endswith("Z")


@pytest.mark.parametrize(
    "source",
    ["header", "cookie ws_token", "cookie token"],
)
async def test_every_token_source(app_server: ServerProcess, source: str) -> None:
    headers = {
        "header": {"Authorization": f"Bearer {token('bob')}"},
        "cookie ws_token": {"Cookie": f"ws_token={token('bob')}"},
        "cookie token": {"Cookie": f"other=1; token={token('bob')}"},
    }[source]
    async with await connect(app_server.ws_url("/alpha/ws"), additional_headers=headers) as ws:
        hello = await receive_json(ws)
    assert hello["user_id"] == "bob"


async def test_first_source_wins(app_server: ServerProcess) -> None:
    headers = {"Authorization": "Bearer not-a-token", "Cookie": f"ws_token={token('cookie')}"}
    url = app_server.ws_url("/alpha/ws", token=token("query"))
    async with await connect(url, additional_headers=headers) as ws:
        assert (await receive_json(ws))["user_id"] == "query"
    # The header comes before the cookies: a bad header token is not rescued by a good cookie.
    async with await connect(app_server.ws_url("/alpha/ws"), additional_headers=headers) as ws:
        await expect_close(ws, 1008, "invalid token")


async def test_user_id_claim_when_no_sub(app_server: ServerProcess) -> None:
    legacy = token(sub=None, user_id="legacy-user")
    async with await connect(app_server.ws_url("/alpha/ws", token=legacy)) as ws:
        assert (await receive_json(ws))["user_id"] == "legacy-user"


REJECTIONS = {
    "bad signature": (jwt.encode({"sub": "u", "exp": 2**32}, "wrong-secret" * 4), "invalid token"),
    "alg none": (jwt.encode({"sub": "u", "exp": 2**32}, None, algorithm="none"), "invalid token"),
    "other algorithm": (
        jwt.encode({"sub": "u", "exp": 2**32}, TEST_SECRET * 2, algorithm="HS512"),
        "invalid token",
    ),
    "expired": (token(exp=int(time.time()) - 5), "token expired"),
    "missing exp": (token(exp=None), "invalid token"),
    "refresh token": (token(type="refresh"), "invalid token"),
    "other audience": (token(aud="beta"), "invalid token"),
    "audience list without slug": (token(aud=["beta", "gamma"]), "invalid token"),
    "garbage": ("abc.def.ghi", "invalid token"),
    "no user": (token(sub=None), "invalid token"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
async def test_rejected_tokens_close_1008_before_any_message(
    app_server: ServerProcess, case: str
) -> None:
    bad, reason = REJECTIONS[case]
    async with await connect(app_server.ws_url("/alpha/ws", token=bad)) as ws:
        # Sent at once: the server must not process it before closing.
        with contextlib.suppress(ConnectionClosed):
            await ws.send('{"type": "hello"}')
        await expect_close(ws, 1008, reason)


async def test_missing_token_where_required(app_server: ServerProcess) -> None:
    async with await connect(app_server.ws_url("/alpha/ws")) as ws:
        with contextlib.suppress(ConnectionClosed):
            await ws.send('{"type": "hello"}')
        await expect_close(ws, 1008, "authentication required")


async def test_accepted_audiences_and_types(app_server: ServerProcess) -> None:
    for good in (token(aud="alpha"), token(aud=["beta", "alpha"]), token(type="access")):
        async with await connect(app_server.ws_url("/alpha/ws", token=good)) as ws:
            assert (await receive_json(ws))["authenticated"] is True


async def test_anonymous_where_allowed_but_bad_token_still_rejected(
    app_server: ServerProcess,
) -> None:
    for path in ("/alpha/guests", "/alpha/open"):
        async with await connect(app_server.ws_url(path)) as ws:
            hello = await receive_json(ws)
            assert hello["authenticated"] is False and hello["user_id"] is None
        async with await connect(app_server.ws_url(path, token="bad.token.here")) as ws:
            await expect_close(ws, 1008, "invalid token")


async def test_token_expiring_while_connected_closes_at_expiry(
    app_server: ServerProcess,
) -> None:
    expires_at = time.time() + 2
    short = token(exp=int(expires_at) + 1)
    async with await connect(app_server.ws_url("/alpha/ws", token=short)) as ws:
        await receive_json(ws)
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
        closed_at = time.time()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "token expired")
    assert closed_at >= int(expires_at) + 1 - 0.2


async def test_origin_allow_list_refuses_with_403(app_server: ServerProcess) -> None:
    url = app_server.ws_url("/beta/ws", token=token(aud="beta"))
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, origin="https://evil.example")
    assert refused.value.response.status_code == 403
    async with await connect(url, origin="https://good.example") as ws:
        assert (await receive_json(ws))["app_slug"] == "beta"
    async with await connect(url) as ws:  # no Origin: not a browser
        assert (await receive_json(ws))["app_slug"] == "beta"


async def test_tokens_never_logged(app_server: ServerProcess) -> None:
    secret_token = token("log-check")
    async with await connect(app_server.ws_url("/alpha/ws", token=secret_token)) as ws:
        await receive_until(ws, "connected")
    async with await connect(app_server.ws_url("/alpha/ws", token="eyJhbGciOi.eyJzdWIi.sig")) as ws:
        with pytest.raises(ConnectionClosed):
            await receive_json(ws)
    await asyncio.sleep(0.3)
    logs = app_server.logs()
    assert "/alpha/ws?[redacted]" in logs  # the handshake was logged, without its query
    assert secret_token not in logs
    assert secret_token.split(".")[1] not in logs
    assert "eyJzdWIi" not in logs
