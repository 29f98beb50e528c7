"""`GET /metrics`: what the engine counts, per engine, and where it counts it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from bson import Timestamp
from prometheus_client.parser import text_string_to_metric_families
from pymongo import AsyncMongoClient

from engine.app import MongoDBEngine
from engine.auth import issue_token
from engine.client import RealtimeClient
from engine.hub import QueueLimits, WebSocketConnection
from engine.stats import EndpointStats, WatcherStats
from tests.conftest import RunningApp
from tests.support import TEST_SECRET, ServerProcess, connect, receive_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient(base_url=url) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


# -- in process ----------------------------------------------------------------------------


def test_two_engines_never_mix_figures() -> None:
    first = MongoDBEngine("mongodb://127.0.0.1:1", "one")
    second = MongoDBEngine("mongodb://127.0.0.1:1", "two")
    first.metrics.stats.endpoint("todo", "realtime").frames_out += 5
    first.metrics.stats.watcher("one").observe(Timestamp(1_700_000_000, 1), now=1_700_000_002.5)
    ours = parse(first.metrics.render()[0].decode())
    theirs = parse(second.metrics.render()[0].decode())
    labels = {"app": "todo", "endpoint": "realtime"}
    assert value(ours, "mdb_realtime_frames_out_total", **labels) == 5
    assert value(theirs, "mdb_realtime_frames_out_total", **labels) is None
    assert value(ours, "mdb_realtime_events_in_total", database="one") == 1
    assert value(ours, "mdb_realtime_watcher_lag_seconds", database="one") == 2.5
    assert value(theirs, "mdb_realtime_events_in_total", database="one") is None


def test_watcher_lag_is_never_negative() -> None:
    stats = WatcherStats()
    stats.observe(Timestamp(1_700_000_010, 1), now=1_700_000_009.2)  # second resolution
    assert stats.lag_seconds == 0.0 and stats.last_cluster_time == 1_700_000_010


async def test_queue_overflow_counts_drops_and_the_close() -> None:
    stats = EndpointStats()
    stalled = asyncio.Event()

    async def send_text(_frame: str) -> None:
        await stalled.wait()  # a socket that never drains

    async def close_socket(_code: int, _reason: str) -> None:
        return None

    connection = WebSocketConnection(websocket=object(), app_slug="todo", stats=stats)
    connection.start(send_text, close_socket, QueueLimits(max_messages=2))
    assert [connection.send(f"frame {i}") for i in range(4)] == [True, True, False, False]
    # Two queued, then the third overflowed: it and the two still queued are lost.
    assert (stats.frames_out, stats.dropped, stats.slow_consumer_closes) == (2, 3, 1)
    connection.stop()


# -- over HTTP -----------------------------------------------------------------------------


@pytest.fixture
async def mongo(demo_app: RunningApp) -> AsyncIterator[AsyncMongoClient[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(demo_app.mongo_uri)
    try:
        yield client
    finally:
        await client.close()


async def test_connections_frames_and_events_are_counted(
    demo_app: RunningApp, mongo: AsyncMongoClient[dict[str, Any]]
) -> None:
    url = demo_app.server.ws_url("/todo/ws")
    labels = {"app": "todo", "endpoint": "realtime"}
    before = await scrape(demo_app.server.url)
    token = issue_token(TEST_SECRET, app_slug="todo", user_id="ann")
    async with RealtimeClient(url, token=token) as client:
        during = await scrape(demo_app.server.url)
        assert value(during, "mdb_realtime_connections", **labels) == 1
        await mongo[demo_app.db_name]["todo_todos"].insert_one({"_id": "m1", "owner_id": "ann"})
        await client.wait_until(lambda: len(client.documents("todos")) == 1)
        after = await scrape(demo_app.server.url)

    frames = value(after, "mdb_realtime_frames_out_total", **labels) or 0
    assert frames - (value(before, "mdb_realtime_frames_out_total", **labels) or 0) >= 2
    database = {"database": demo_app.db_name}
    assert (value(after, "mdb_realtime_events_in_total", **database) or 0) >= 1
    lag = value(after, "mdb_realtime_watcher_lag_seconds", **database)
    assert lag is not None and 0 <= lag < 60
    assert value(after, "mdb_realtime_watcher_last_event_timestamp_seconds", **database)
    for name in (
        "mdb_realtime_messages_dropped_total",
        "mdb_realtime_slow_consumer_closes_total",
        "mdb_realtime_handler_errors_total",
        "mdb_realtime_resumes_total",
    ):
        assert value(after, name, **labels) is not None, name


async def test_handler_errors_are_counted(app_server: ServerProcess) -> None:
    labels = {"app": "alpha", "endpoint": "realtime"}
    before = value(await scrape(app_server.url), "mdb_realtime_handler_errors_total", **labels)
    token = issue_token(TEST_SECRET, app_slug="alpha", user_id="ann")
    ws = await connect(app_server.ws_url("/alpha/ws", token=token))
    try:
        await ws.send(json.dumps({"type": "explode", "id": 1}))
        assert (await receive_until(ws, "error"))["code"] == "handler_error"
    finally:
        await ws.close()
    after = value(await scrape(app_server.url), "mdb_realtime_handler_errors_total", **labels)
    assert (after or 0) - (before or 0) == 1
