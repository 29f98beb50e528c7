"""Live windows: what a change costs the server, and how many queries it makes.

In one process: the engine's `Router` with its `Windows` (the same objects `serve` runs) and
its window query (`engine.recovery.find_window`), fed by the engine's own `Watcher` on a
real database (the embedded SecantusDB unless `MONGODB_URI` is set), and 1,000 connections
whose frames are counted instead of written to sockets (the socket write is the same per
frame whatever the window, and measured by bench/fanout.py). The collection holds
`--per-board` documents for each of the 1,000 boards (100,000), indexed on `{board, score}`
and `{score}`. A writer in a child process changes it at `--rate` writes/s (80 % score
updates to a random value, 10 % deletes, 10 % inserts, in batches every 0.1 s) for
`--seconds`.

Cases, side by side in one run:
- `same`: 1,000 clients subscribe to the same top-20 window (`sort: {score: -1}`, limit 20)
  of the whole collection: one shared window.
- `distinct`: 1,000 clients, each on its own board's top-20 (`filter: {board: i}`):
  1,000 windows.
- `hot`: 1,000 clients on the same top-20 of board 0, and every write goes to board 0's
  documents: one shared window whose members change all the time.
- `none`: no clients, so the engine only reads and routes the changes: the base cost of a
  change, before any window.
- `<case>/no-reserve` (not run unless asked for in `--cases`): the
  same, with windows that keep no reserve (`MDB_REALTIME_WINDOW_RESERVE=0` instead of the
  default 100), to show what the reserve saves.

Reported per case: writes/s the database took, changes routed, the seconds the 1,000
subscriptions took (their loads), server CPU per change (this process: watcher, routing,
windows and their queries; the writer runs elsewhere), departures (members a change took
out of a window: the places that emptied), refill queries and refills per change, and
frames encoded / sent per change. Settings: none changed from the engine's defaults, except
the reserve in the `/no-reserve` cases.
The machine is shared: read the ratios between the cases, not the absolute figures.

Run: python -m bench.windows [--clients 1000] [--rate 1000] [--seconds 5]
     [--cases none,same,distinct,hot,hot/no-reserve,distinct/no-reserve]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import time
from typing import Any

from pymongo import AsyncMongoClient, DeleteOne, InsertOne, MongoClient, UpdateOne

from bench import harness
from engine.auth import Principal
from engine.delivery.router import Router
from engine.delivery.window_groups import Windows
from engine.delivery.windows import SortSpec
from engine.hub import WebSocketConnection
from engine.manifest import parse_manifest
from engine.recovery import find_window
from engine.settings import EngineSettings
from engine.transactions import Unit, events_of
from engine.watcher import Watcher, enable_pre_images

DOCUMENTS_PER_BOARD = 100  # more than a window and its reserve (20 + 20) hold
LIMIT = 20
MANIFEST = {
    "slug": "game",
    "name": "Game",
    "websockets": {"live": {"path": "/ws", "auth": {"required": False}, "watch": {"scores": {}}}},
}


class CountingSink:
    """Where a connection's frames go: counted, not written."""

    def __init__(self) -> None:
        self.frames = 0

    def offer(self, frame: str) -> bool:
        self.frames += 1
        return True

    async def offer_paced(self, frame: str) -> bool:
        return self.offer(frame)

    def stop(self) -> None:
        pass

    def waiting_frames(self) -> int:
        return 0


def writer(
    uri: str, database: str, boards: int, per_board: int, rate: int, seconds: float, hot: bool
) -> None:
    """The child process: `rate` writes/s in batches every 0.1 s; with `hot`, all of them to
    board 0's documents."""
    collection = MongoClient(uri)[database]["game_scores"]
    rng = random.Random(7)
    batch = max(1, rate // 10)
    next_id = boards * per_board
    board_zero = [k * boards for k in range(per_board)]  # ids with n % boards == 0

    def target() -> int:
        return rng.choice(board_zero) if hot else rng.randrange(next_id)

    deadline = time.monotonic() + seconds
    tick = time.monotonic()
    written = 0
    while time.monotonic() < deadline:
        operations: list[Any] = []
        for _ in range(batch):
            roll = rng.random()
            if roll < 0.8:
                operations.append(UpdateOne({"_id": target()}, {"$set": {"score": rng.random()}}))
            elif roll < 0.9:
                operations.append(DeleteOne({"_id": target()}))
            else:
                board = 0 if hot else rng.randrange(boards)
                operations.append(
                    InsertOne({"_id": next_id, "board": board, "score": rng.random()})
                )
                if hot:
                    board_zero.append(next_id)
                next_id += 1
        collection.bulk_write(operations, ordered=False)
        written += len(operations)
        tick += 0.1
        time.sleep(max(0.0, tick - time.monotonic()))
    print(written, flush=True)


async def run_case(
    uri: str, database: str, case: str, clients: int, per_board: int, rate: int, seconds: float
) -> dict[str, Any]:
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    collection = mongo[database]["game_scores"]
    await collection.drop()
    boards = clients
    rng = random.Random(1)
    await collection.insert_many(
        [{"_id": n, "board": n % boards, "score": rng.random()} for n in range(boards * per_board)]
    )
    await collection.create_index([("board", 1), ("score", -1)])
    await collection.create_index([("score", -1)])
    await enable_pre_images(mongo[database], ["game_scores"])  # as the engine does

    router = Router()
    manifest = parse_manifest(MANIFEST)
    router.add_app(manifest, database)
    queries = {"load": 0, "refill": 0, "running": 0}

    async def window_documents(
        _binding: Any, query: Any, sort: SortSpec, count: int, leave_out: Any
    ) -> list[dict[str, Any]]:
        queries["load" if not leave_out else "refill"] += 1
        queries["running"] += 1
        try:
            return await find_window(collection, query, sort, count, leave_out)  # the engine's
        finally:
            queries["running"] -= 1

    watcher_holder: list[Watcher] = []
    settings = EngineSettings.from_env(
        {"MDB_REALTIME_WINDOW_RESERVE": "0"} if case.endswith("/no-reserve") else {}
    )
    router.windows = Windows(
        window_documents,
        lambda _b: watcher_holder[0].position if watcher_holder else None,
        settings.window_reserve,
    )
    changes = {"count": 0}

    def route(unit: Unit) -> None:
        changes["count"] += len(events_of(unit))
        router.route(unit)

    stream_client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    watcher = Watcher(stream_client, database, router.namespaces()[database], route)
    watcher_holder.append(watcher)
    await watcher.start()

    sinks = []
    started = time.monotonic()
    for n in range(clients if case != "none" else 0):
        connection = WebSocketConnection(
            websocket=object(),
            app_slug="game",
            endpoint="live",
            principal=Principal(user_id=f"u{n}"),
        )
        sink = CountingSink()
        connection.sink = sink
        sinks.append(sink)
        router.attach(connection)
        message: dict[str, Any] = {
            "type": "subscribe",
            "id": "top",
            "collection": "scores",
            "sort": {"score": -1},
            "limit": LIMIT,
        }
        if case.startswith("distinct"):
            message["filter"] = {"board": n}
        elif case.startswith("hot"):
            message["filter"] = {"board": 0}
        outcome = router.subscribe(connection, message)
        if outcome is not None:
            await outcome
    subscribe_seconds = time.monotonic() - started
    print(f"{case}: {clients} clients subscribed", file=sys.stderr, flush=True)
    frames_before = sum(s.frames for s in sinks)
    loads = queries["load"]

    windows = router.windows
    encoded_before = windows.stats.frames_encoded
    departures_before = windows.stats.departures
    cpu_before = time.process_time()
    process = subprocess.Popen(
        stdout=subprocess.PIPE,
        args=[
            sys.executable,
            "-m",
            "bench.windows",
            "--writer",
            uri,
            database,
            str(boards),
            str(per_board),
            str(rate),
            str(seconds),
            "hot" if case.startswith("hot") else "spread",
        ],
    )
    while process.poll() is None:
        await asyncio.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"the writer failed ({process.returncode})")
    assert process.stdout is not None
    written = int(process.stdout.read().decode().strip() or 0)
    await _quiet(changes, queries)
    cpu = time.process_time() - cpu_before
    await watcher.stop()
    await stream_client.close()
    await mongo.close()
    count = max(1, changes["count"])
    return {
        "case": case,
        "writes": written,
        "windows": windows.group_count(),
        "changes": changes["count"],
        "cpu_us_per_change": cpu / count * 1e6,
        "refill_queries": queries["refill"],
        "refills_per_change": queries["refill"] / count,
        "load_queries": loads,
        "subscribe_seconds": subscribe_seconds,
        "departures": windows.stats.departures - departures_before,
        "frames_encoded_per_change": (windows.stats.frames_encoded - encoded_before) / count,
        "frames_sent_per_change": (sum(s.frames for s in sinks) - frames_before) / count,
    }


async def _quiet(
    changes: dict[str, int], queries: dict[str, int], quiet_seconds: float = 1.0
) -> None:
    """Until no change arrived for `quiet_seconds` and no window query runs (the stream has
    caught up and every window applied it)."""
    seen = -1
    while seen != changes["count"] or queries["running"]:
        seen = changes["count"]
        await asyncio.sleep(quiet_seconds)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        uri, database, boards, per_board, rate, seconds, where = sys.argv[2:9]
        writer(
            uri, database, int(boards), int(per_board), int(rate), float(seconds), where == "hot"
        )
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--per-board", type=int, default=DOCUMENTS_PER_BOARD)
    parser.add_argument("--cases", default="none,same,distinct,hot")
    args = parser.parse_args()
    rows = []
    results = []
    with harness.workspace() as workdir, harness.database(workdir, needed=True) as uri:
        for case in args.cases.split(","):
            result = asyncio.run(
                run_case(
                    uri,
                    f"bench_windows_{case.replace('/', '_').replace('-', '_')}",
                    case,
                    args.clients,
                    args.per_board,
                    args.rate,
                    args.seconds,
                )
            )
            results.append(result)
            rows.append(
                [
                    case,
                    f"{result['writes'] / args.seconds:.0f}",
                    result["windows"],
                    result["changes"],
                    f"{result['subscribe_seconds']:.1f}",
                    f"{result['cpu_us_per_change']:.0f}",
                    result["departures"],
                    result["refill_queries"],
                    f"{result['refills_per_change']:.3f}",
                    f"{result['frames_encoded_per_change']:.2f}",
                    f"{result['frames_sent_per_change']:.1f}",
                ]
            )
    harness.print_table(
        [
            "case",
            "writes/s done",
            "windows",
            "changes",
            "subscribe s",
            "CPU µs/change",
            "departures",
            "refill queries",
            "refills/change",
            "frames encoded/change",
            "frames sent/change",
        ],
        rows,
    )
    harness.write_results("windows", {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
