"""Frames written to the transport reach sockets on every uvicorn implementation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from engine.auth import issue_token
from engine.frames import Frame, wire_frame
from tests.conftest import RunningApp, start_app_server
from tests.support import TEST_MANIFESTS, TEST_SECRET, connect, receive_json, receive_until


@pytest.fixture(scope="module", params=["websockets-sansio", "wsproto", "websockets"])
def server_with(
    request: pytest.FixtureRequest, mongo_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, RunningApp]]:
    folder = tmp_path_factory.mktemp(request.param)
    app = start_app_server(mongo_uri, folder, TEST_MANIFESTS, TEST_WS_IMPLEMENTATION=request.param)
    try:
        yield request.param, app
    finally:
        app.server.stop()


async def test_messages_flow_on_every_server_implementation(
    server_with: tuple[str, RunningApp],
) -> None:
    _implementation, app = server_with
    token = issue_token(TEST_SECRET, app_slug="alpha", user_id="u")
    async with await connect(app.server.ws_url("/alpha/ws", token=token)) as ws:
        assert (await receive_json(ws))["type"] == "connected"
        async with httpx.AsyncClient(base_url=app.server.url) as http:
            sinks = (await http.get("/_test/sinks/alpha")).json()["sinks"]
            assert sinks == ["DirectSink"]  # every uvicorn implementation takes direct writes
            big = "é" * 70_000  # a frame with a 64-bit length, multi-byte text
            for message in ({"type": "small"}, {"type": "big", "text": big}):
                body = {"slug": "alpha", "message": message}
                assert (await http.post("/_test/broadcast", json=body)).json()["reached"] == 1
        assert (await receive_until(ws, "small"))["type"] == "small"
        assert (await receive_until(ws, "big"))["text"] == big
        await ws.send(json.dumps({"type": "echo-me"}))
        assert (await receive_until(ws, "echo"))["received"]["type"] == "echo-me"


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_wire_frames_have_the_right_header(size: int) -> None:
    text = "x" * size
    wire = Frame(text).wire
    assert wire[0] == 0x81
    if size < 126:
        assert (wire[1], wire[2:]) == (size, text.encode())
    elif size < 65536:
        assert wire[1] == 126 and int.from_bytes(wire[2:4], "big") == size
    else:
        assert wire[1] == 127 and int.from_bytes(wire[2:10], "big") == size
    assert wire_frame(text) == wire
