"""The protocol over real sockets: broadcasts, handlers, errors, keepalive, slow consumers."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from engine.auth import issue_token
from tests.support import TEST_SECRET, ServerProcess, connect, receive_json, receive_until


def token_for(user: str, app: str = "alpha") -> str:
    return issue_token(TEST_SECRET, app_slug=app, user_id=user)


async def open_client(server: ServerProcess, path: str = "/alpha/ws", user: str = "u1"):
    app = path.split("/")[1]
    ws = await connect(server.ws_url(path, token=token_for(user, app)))
    assert (await receive_json(ws))["type"] == "connected"
    return ws


async def post(server: ServerProcess, path: str, body: object) -> dict:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        response = await client.post(path, json=body)
        response.raise_for_status()
        return response.json()


async def nothing_arrives(ws, within: float = 0.5) -> bool:
    try:
        message = await asyncio.wait_for(ws.recv(), within)
    except TimeoutError:
        return True
    raise AssertionError(f"unexpected message: {message}")


async def test_broadcast_reaches_all_of_app_and_only_that_app(app_server: ServerProcess) -> None:
    alpha = [await open_client(app_server, user=f"a{i}") for i in range(3)]
    alpha_other_endpoint = await open_client(app_server, "/alpha/events", user="a9")
    beta = await open_client(app_server, "/beta/ws", user="b1")  # same path /ws, other app
    try:
        result = await post(
            app_server, "/_test/broadcast", {"slug": "alpha", "message": {"type": "news", "n": 1}}
        )
        assert result["reached"] == 4
        for ws in [*alpha, alpha_other_endpoint]:
            message = await receive_until(ws, "news")
            assert message["n"] == 1 and message["app_slug"] == "alpha"
            assert message["timestamp"].endswith("Z")
        assert await nothing_arrives(beta)
    finally:
        for ws in [*alpha, alpha_other_endpoint, beta]:
            await ws.close()


async def test_broadcast_to_one_user(app_server: ServerProcess) -> None:
    mine = [
        await open_client(app_server, user="target"),
        await open_client(app_server, "/alpha/events", user="target"),
    ]
    other = await open_client(app_server, user="bystander")
    try:
        body = {"slug": "alpha", "message": {"type": "dm"}, "user_id": "target"}
        assert (await post(app_server, "/_test/broadcast", body))["reached"] == 2
        for ws in mine:
            assert (await receive_until(ws, "dm"))["type"] == "dm"
        assert await nothing_arrives(other)
        async with httpx.AsyncClient(base_url=app_server.url) as client:
            counts = (await client.get("/_test/counts/alpha", params={"user": "target"})).json()
        assert counts["user"] == 2 and counts["total"] >= 3
    finally:
        for ws in [*mine, other]:
            await ws.close()


async def test_broadcast_keeps_app_fields_and_encodes_bson(app_server: ServerProcess) -> None:
    ws = await open_client(app_server)
    try:
        body = {
            "slug": "alpha",
            "message": {"type": "own", "app_slug": "spoof", "timestamp": "mine"},
        }
        await post(app_server, "/_test/broadcast", body)
        message = await receive_until(ws, "own")
        assert (message["app_slug"], message["timestamp"]) == ("spoof", "mine")
        assert (await post(app_server, "/_test/broadcast_bson/alpha", {}))["reached"] >= 1
        bson_message = await receive_until(ws, "bson")
        assert bson_message["oid"] == "0123456789abcdef01234567"
        assert bson_message["when"] == "2026-01-02T03:04:05Z"
        assert bson_message["amount"] == "12.50"
    finally:
        await ws.close()


async def test_handlers_two_and_three_arguments(app_server: ServerProcess) -> None:
    ws = await open_client(app_server, user="h1")
    events = await open_client(app_server, "/alpha/events", user="h2")
    try:
        await ws.send(json.dumps({"type": "greet", "id": "m1", "text": "hi"}))
        echo = await receive_until(ws, "echo")
        assert echo["received"] == {"type": "greet", "id": "m1", "text": "hi"}
        assert echo["app_slug"] == "alpha"
        await events.send(json.dumps({"type": "who"}))
        you_are = await receive_until(events, "you_are")
        assert (you_are["user_id"], you_are["endpoint"]) == ("h2", "events")
    finally:
        await ws.close()
        await events.close()


async def test_failing_handler_reports_and_connection_stays(app_server: ServerProcess) -> None:
    ws = await open_client(app_server)
    bystander = await open_client(app_server, user="calm")
    try:
        await ws.send(json.dumps({"type": "explode", "id": 42}))
        error = await receive_until(ws, "error")
        assert (error["code"], error["ref"]) == ("handler_error", 42)
        await ws.send(json.dumps({"type": "again", "id": "after"}))
        assert (await receive_until(ws, "echo"))["received"]["id"] == "after"
        await bystander.send(json.dumps({"type": "fine"}))
        assert (await receive_until(bystander, "echo"))["received"]["type"] == "fine"
    finally:
        await ws.close()
        await bystander.close()


@pytest.mark.parametrize(
    ("frame", "expected_message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2, 3]", "JSON object"),
        ('"text"', "JSON object"),
        ('{"no_type": 1}', "string `type`"),
        ('{"type": 7}', "string `type`"),
        (b"\x00\x01binary", "binary frames"),
        ('{"type": "big", "pad": "' + "x" * (70 * 1024) + '"}', "larger than 65536 bytes"),
    ],
    ids=["bad-json", "array", "string", "no-type", "non-string-type", "binary", "oversized"],
)
async def test_bad_frames_get_bad_message_and_connection_stays(
    app_server: ServerProcess, frame: str | bytes, expected_message: str
) -> None:
    ws = await open_client(app_server)
    try:
        await ws.send(frame)
        error = await receive_until(ws, "error")
        assert error["code"] == "bad_message"
        assert expected_message in error["message"]
        await ws.send(json.dumps({"type": "still-there"}))
        assert (await receive_until(ws, "echo"))["received"]["type"] == "still-there"
    finally:
        await ws.close()


async def test_unknown_type_without_handler(app_server: ServerProcess) -> None:
    async with await connect(app_server.ws_url("/alpha/open")) as ws:
        await receive_until(ws, "connected")
        await ws.send(json.dumps({"type": "anything", "id": "x1"}))
        error = await receive_until(ws, "error")
        assert (error["code"], error["ref"]) == ("unknown_type", "x1")
        await ws.send(json.dumps({"type": "pong"}))  # answered by the engine: no error
        assert await nothing_arrives(ws)


async def test_ping_then_4408_for_silent_clients(app_server: ServerProcess) -> None:
    """ping_interval 5: a ping after 5 s of silence, a close 4408 after 10 s; pongs keep it open."""
    silent = await connect(
        app_server.ws_url("/alpha/fast", token=token_for("s")), ping_interval=None
    )
    talker = await connect(
        app_server.ws_url("/alpha/fast", token=token_for("t")), ping_interval=None
    )
    try:
        started = time.monotonic()
        assert (await receive_json(silent))["ping_interval"] == 5
        await receive_json(talker)
        ping = await receive_until(silent, "ping", timeout=8)
        assert 4.0 <= time.monotonic() - started <= 7.5
        assert ping["timestamp"].endswith("Z")

        async def answer_pings() -> None:
            while True:
                message = await receive_json(talker, timeout=30)
                if message["type"] == "ping":
                    await talker.send(json.dumps({"type": "pong"}))

        answering = asyncio.create_task(answer_pings())
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await receive_json(silent, timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4408
        assert 9.0 <= time.monotonic() - started <= 13.0
        await asyncio.sleep(2.5)  # past the talker's own 2 x ping_interval
        assert not answering.done(), "the answering client was closed"
        answering.cancel()
    finally:
        await silent.close()
        await talker.close()


def stalled_client(server: ServerProcess, user: str) -> socket.socket:
    """A raw WebSocket client that completes the handshake and then never reads."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    request = (
        f"GET /alpha/ws?token={token_for(user)} HTTP/1.1\r\nHost: {host}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while not response.endswith(b"\r\n\r\n"):  # byte by byte: leave every frame unread
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101")
    return sock


async def test_stalled_client_does_not_delay_others_and_gets_1013(
    app_server: ServerProcess,
) -> None:
    stalled = stalled_client(app_server, "stalled")
    readers = [await open_client(app_server, user=f"r{i}") for i in range(3)]
    received = {i: 0 for i in range(len(readers))}
    count, size = 4000, 4096

    async def read_all(index: int) -> None:
        while received[index] < count:
            message = await receive_json(readers[index], timeout=20)
            if message["type"] == "flood":
                assert message["seq"] == received[index]  # in order, none missing
                received[index] += 1

    try:
        readers_done = asyncio.gather(*(read_all(i) for i in range(len(readers))))
        flood = asyncio.create_task(
            post(app_server, "/_test/flood/alpha", {"count": count, "size": size})
        )
        # The stalled client is dropped from the app's connections as soon as it overflows...
        async with httpx.AsyncClient(base_url=app_server.url) as client:
            for _ in range(300):
                counts = (
                    await client.get("/_test/counts/alpha", params={"user": "stalled"})
                ).json()
                if counts["user"] == 0:
                    break
                await asyncio.sleep(0.05)
        assert counts["user"] == 0, "the stalled client was not disconnected"
        # ...and when it reads again it finds what was written before the close, then 1013.
        assert await asyncio.to_thread(close_code_seen, stalled) == 1013
        await flood
        await asyncio.wait_for(readers_done, 60)
        assert all(n == count for n in received.values())
    finally:
        stalled.close()
        for ws in readers:
            await ws.close()


def close_code_seen(sock: socket.socket) -> int | None:
    """Read what the server sent to the raw client; the close frame's code, if one came."""
    sock.settimeout(10)
    data = bytearray()
    offset = 0
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            return None
        if not chunk:
            return None
        data += chunk
        while (frame := next_frame(data, offset)) is not None:
            opcode, payload, offset = frame
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")


def next_frame(data: bytearray, offset: int) -> tuple[int, bytes, int] | None:
    """(opcode, payload, next offset) of the unmasked frame at `offset`, if wholly received."""
    if offset + 2 > len(data):
        return None
    opcode, length = data[offset] & 0x0F, data[offset + 1] & 0x7F
    start = offset + 2
    if length == 126:
        length, start = int.from_bytes(data[start : start + 2], "big"), start + 2
    elif length == 127:
        length, start = int.from_bytes(data[start : start + 8], "big"), start + 8
    if start + length > len(data):
        return None
    return opcode, bytes(data[start : start + length]), start + length
