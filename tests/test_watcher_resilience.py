"""The watcher survives what the database does: restarts, drops, invalidations."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pymongo import AsyncMongoClient

from engine.embedded import EmbeddedDatabase, free_port
from tests.conftest import RunningApp, start_app_server
from tests.databases import needs_embedded
from tests.support import CHANGE_MANIFESTS
from tests.test_changes import changes, client_for


async def wait_for_status(app: RunningApp, status: int, timeout: float = 60.0) -> str:
    async with httpx.AsyncClient(base_url=app.server.url, timeout=10) as http:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            response = await http.get("/readyz")
            if response.status_code == status:
                return response.text
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"/readyz stayed {response.status_code}: {response.text}")
            await asyncio.sleep(0.2)


@pytest.fixture
def own_database(tmp_path: Path) -> Iterator[EmbeddedDatabase]:
    """A database of this test alone, on disk, so it can be killed and restarted."""
    skip = needs_embedded("restarts the database")
    if skip:
        pytest.skip(skip)
    database = EmbeddedDatabase(tmp_path / "db", port=free_port())
    database.start(log_path=tmp_path / "db.log")
    try:
        yield database
    finally:
        database.stop()


async def test_database_restart_resumes_without_losing_changes(
    own_database: EmbeddedDatabase, tmp_path: Path
) -> None:
    app = start_app_server(own_database.uri, tmp_path, CHANGE_MANIFESTS)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        own_database.uri, serverSelectionTimeoutMS=30_000
    )
    ws = await client_for(app)
    try:
        news = client[app.db_name]["shop_news"]
        await news.insert_one({"_id": "before"})
        assert (await changes(ws, 1))[0]["document_id"] == "before"

        # A clean restart: SecantusDB killed with SIGKILL can lose its last oplog entries
        # and reuse their positions, which no consumer can resume across (see docs).
        own_database.stop()
        text = await wait_for_status(app, 503)
        assert "MongoDB does not answer" in text

        own_database.start(log_path=tmp_path / "db.log")
        # Written before the watcher is back: it resumes from its position and sends them.
        for n in range(5):
            await news.insert_one({"_id": f"after-{n}"})
        received = await changes(ws, 5, timeout=60)
        assert [m["document_id"] for m in received] == [f"after-{n}" for n in range(5)]
        await wait_for_status(app, 200)
    finally:
        await ws.close()
        await client.close()
        app.server.stop()


async def test_dropped_collection_and_dropped_database_keep_the_stream_alive(
    mongo_uri: str, tmp_path: Path
) -> None:
    app = start_app_server(mongo_uri, tmp_path, CHANGE_MANIFESTS)
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    ws = await client_for(app)
    try:
        db = client[app.db_name]
        await db["shop_news"].insert_one({"_id": 1})
        assert (await changes(ws, 1))[0]["document_id"] == 1
        await db["shop_news"].drop()
        await db["shop_news"].insert_one({"_id": 2})
        assert (await changes(ws, 1))[0]["document_id"] == 2

        await client.drop_database(app.db_name)
        await asyncio.sleep(1.0)  # let the invalidated stream reopen
        await db["shop_news"].insert_one({"_id": 3})
        assert (await changes(ws, 1, timeout=15))[0]["document_id"] == 3
        await wait_for_status(app, 200)
        logs = app.server.logs()
        assert "saw drop of" in logs
        assert "saw invalidate" in logs or "saw dropDatabase" in logs
    finally:
        await ws.close()
        await client.close()
        app.server.stop()
