"""What `serve` gives a browser: the JS client at /static/, an app's page at /<slug>/."""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import FastAPI

from engine.pages import add_app_page, mount_static, page_of
from tests.conftest import RunningApp


def test_page_of_finds_index_next_to_a_manifest(tmp_path: Path) -> None:
    folder = tmp_path / "todo"
    folder.mkdir()
    (folder / "manifest.json").write_text("{}")
    assert page_of(folder / "manifest.json") is None
    (folder / "index.html").write_text("<h1>todo</h1>")
    assert page_of(folder / "manifest.json") == folder / "index.html"
    (tmp_path / "flat.json").write_text("{}")
    assert page_of(tmp_path / "flat.json") is None  # a loose manifest has no folder of its own


async def test_only_the_page_is_served_from_the_app_folder(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<h1>todo</h1>")
    (tmp_path / "manifest.json").write_text('{"slug": "todo"}')
    app = FastAPI()
    add_app_page(app, "todo", tmp_path / "index.html")
    mount_static(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        page = await client.get("/todo/")
        assert page.status_code == 200 and page.text == "<h1>todo</h1>"
        assert page.headers["referrer-policy"] == "no-referrer"
        assert (await client.get("/todo/manifest.json")).status_code == 404
        redirect = await client.get("/todo")
        assert redirect.status_code == 307 and redirect.headers["location"].endswith("/todo/")
        assert (await client.get("/static/%2e%2e/pages.py")).status_code == 404


async def test_serve_gives_the_demo_page_and_the_client(demo_app: RunningApp) -> None:
    async with httpx.AsyncClient(base_url=demo_app.server.url) as http:
        page = await http.get("/todo/")
        script = await http.get("/static/realtime.js")
        missing = await http.get("/nope/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"/static/realtime.js"' in page.text
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert "export class RealtimeClient" in script.text
    assert missing.status_code == 404
