"""Resume catch-up speed: how fast a reconnecting client receives what it missed.

A client reads one change, disconnects, N documents are inserted (insert_many), and the client
reconnects with `?last_event_id=`; the time from reconnect to the last missed change gives
events per second. Measured twice in one run: served from the engine's memory (the default
history of 10,000 events) and from MongoDB's own history (a second engine process started
with MDB_REALTIME_HISTORY_EVENTS=1 on the same database).

Run: python -m bench.resume_catch_up [--events 5000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import websockets
from pymongo import AsyncMongoClient

from engine.auth import issue_token
from engine.embedded import EmbeddedDatabase
from tests.support import ServerProcess, engine_env, serve_command

MANIFEST = {
    "slug": "bench",
    "name": "Bench",
    "websockets": {"live": {"path": "/ws", "watch": {"items": {}}}},
}
SECRET = "bench-secret-bench-secret-bench-secret!!"


def start_engine(uri: str, folder: Path, db: str, name: str, **env: str) -> ServerProcess:
    manifests = folder / "manifests"
    manifests.mkdir(exist_ok=True)
    (manifests / "bench.json").write_text(json.dumps(MANIFEST))
    environment = engine_env(uri, folder, MDB_REALTIME_JWT_SECRET=SECRET, **env)
    command = serve_command("--manifests", str(manifests), "--db", db)
    return ServerProcess(command, environment, folder / f"{name}.log").start(timeout=60)


async def round_trip(
    live: ServerProcess, resume_at: ServerProcess, items: Any, events: int, tag: str
) -> float:
    token = issue_token(SECRET, app_slug="bench", user_id="u", ttl_seconds=3600)
    async with websockets.connect(live.ws_url("/bench/ws", token=token), max_size=None) as ws:
        await ws.recv()  # connected
        await items.insert_one({"_id": f"{tag}-first"})
        while True:
            message = json.loads(await ws.recv())
            if message.get("type") == "change":
                last_id = message["id"]
                break
    await items.insert_many([{"_id": f"{tag}-{n:06d}", "n": n} for n in range(events)])
    await asyncio.sleep(0.5)  # the engine has seen them all live
    url = resume_at.ws_url("/bench/ws", token=token, last_event_id=last_id)
    started = time.perf_counter()
    received = 0
    async with websockets.connect(url, max_size=None, max_queue=None) as ws:
        while received < events:
            message = json.loads(await ws.recv())
            if message.get("type") == "change":
                received += 1
    return events / (time.perf_counter() - started)


async def run(events: int, rounds: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    os.environ.setdefault("TMPDIR", str(folder))
    external = os.environ.get("MONGODB_URI")
    database = None if external else EmbeddedDatabase(":memory:")
    if database is not None:
        database.start(log_path=folder / "db.log")
    uri = external or database.uri  # type: ignore[union-attr]
    memory = start_engine(uri, folder, "resume_bench", "memory")
    history = start_engine(uri, folder, "resume_bench", "history", MDB_REALTIME_HISTORY_EVENTS="1")
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    items = client["resume_bench"]["bench_items"]
    results: dict[str, list[float]] = {"memory": [], "database": []}
    try:
        for number in range(rounds):
            results["memory"].append(await round_trip(memory, memory, items, events, f"m{number}"))
            results["database"].append(
                await round_trip(memory, history, items, events, f"d{number}")
            )
    finally:
        await client.close()
        memory.stop()
        history.stop()
        if database is not None:
            database.stop()
    return {
        "events": events,
        "rounds": rounds,
        "events_per_second": {k: statistics.median(v) for k, v in results.items()},
        "all": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000, help="missed events per resume")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.events, args.rounds))
    print(f"| served from | events missed | events/s (median of {args.rounds}) |")
    print("|---|---|---|")
    for source, rate in result["events_per_second"].items():
        print(f"| {source} | {args.events:,} | {rate:,.0f} |")
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"resume_catch_up-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
