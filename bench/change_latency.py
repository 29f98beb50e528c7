"""Change latency: a write to MongoDB -> the change message at a WebSocket client of the engine,
measured side by side with a raw change stream consumer on the same collection (the floor).

    python -m bench.change_latency [--count 1000] [--interval-ms 5] [--burst 1000] ...

Starts SecantusDB (`engine.embedded`, in memory) unless MONGODB_URI or --mongo-uri is given,
then the engine as a child process (`python -m engine.cli serve`) on a manifest with one
anonymous endpoint watching one collection. In this process: one WebSocket client of the
engine, one raw `db.watch(...)` consumer with the engine's own stream options, and the writer.
Every document carries the monotonic time it was sent, and both receivers read the same
clock, so a latency is `receive time - send time` with no clock skew.

- light: `--count` single inserts, one every `--interval-ms`;
- burst: `--bursts` x `insert_many` of `--burst` documents, all stamped with the time the call
  started; reported per document and as the time until the last document arrived.

Prints a table and writes JSON to bench/results/change_latency-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/change_latency.py`
    sys.path.insert(0, str(REPO))

import websockets  # noqa: E402
from pymongo import AsyncMongoClient  # noqa: E402

from bench import harness  # noqa: E402
from engine.embedded import EmbeddedDatabase  # noqa: E402

RESULTS = REPO / "bench" / "results"
SLUG = "lat"
COLLECTION = "events"
PHYSICAL = f"{SLUG}_{COLLECTION}"
URL_LINE = re.compile(r"on (http://\S+)")
MANIFEST = {
    "slug": SLUG,
    "name": "Change latency",
    "websockets": {"live": {"path": "/ws", "auth": {"required": False}, "watch": {COLLECTION: {}}}},
}
# The engine's own stream options (engine/watcher.py), so the floor pays for the same lookups.
STREAM_OPTIONS: dict[str, Any] = {
    "full_document": "updateLookup",
    "full_document_before_change": "whenAvailable",
    "max_await_time_ms": 500,
}


# -- the processes -------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    """A temporary folder of our own; also TMPDIR for SecantusDB (it writes scratch files)."""
    folder = Path(tempfile.mkdtemp(prefix="change-latency-"))
    (folder / "tmp").mkdir()
    os.environ["TMPDIR"] = str(folder / "tmp")
    try:
        yield folder
    finally:
        if keep:
            print(f"logs kept in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def database(uri: str | None, folder: Path) -> Iterator[tuple[str, str]]:
    """(URI, what it is): the given MongoDB, or SecantusDB in memory for this run."""
    if uri:
        yield uri, "MONGODB_URI"
        return
    embedded = EmbeddedDatabase(":memory:")
    embedded.start(log_path=folder / "secantus.log")
    try:
        yield embedded.uri, "SecantusDB (embedded, :memory:)"
    finally:
        embedded.stop()


@contextlib.contextmanager
def engine_server(uri: str, db_name: str, folder: Path) -> Iterator[str]:
    """`mdb-realtime serve` on a free port; yields its http URL once it is ready."""
    manifests = folder / "manifests"
    manifests.mkdir()
    (manifests / f"{SLUG}.json").write_text(json.dumps(MANIFEST))
    env = dict(os.environ, MDB_REALTIME_DATA_DIR=str(folder / "data"), PYTHONUNBUFFERED="1")
    env.setdefault("MDB_REALTIME_JWT_SECRET", uuid.uuid4().hex * 2)  # unused: no tokens here
    command = harness.serve_command(manifests, uri, db_name)
    with open(folder / "engine.log", "ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )
        try:
            url = _announced_url(process, timeout=30.0)
            _wait_ready(url, timeout=30.0)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _announced_url(process: subprocess.Popen[bytes], timeout: float) -> str:
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:  # keep draining so the child never blocks on stdout
            match = URL_LINE.search(line.decode(errors="replace"))
            if match and not done.is_set():
                found.append(match.group(1))
                done.set()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout) or not found:
        raise RuntimeError("the engine did not start; see engine.log (--keep)")
    return found[0]


def _wait_ready(url: str, timeout: float) -> None:
    """/readyz answers 200 once MongoDB answers and the change stream is open."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the engine never became ready (/readyz)")
        time.sleep(0.1)


# -- receivers -----------------------------------------------------------------------------------


@dataclass
class Arrivals:
    """Receive time (monotonic ns) of each document id, and its send stamp."""

    name: str
    received: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)

    def note(self, now: int, document: dict[str, Any]) -> None:
        key = str(document["_id"])
        self.received[key] = now
        self.sent[key] = int(document["t"])

    def latencies_ms(self, keys: Sequence[str]) -> list[float]:
        return [(self.received[k] - self.sent[k]) / 1e6 for k in keys if k in self.received]

    def has(self, keys: Sequence[str]) -> bool:
        return all(k in self.received for k in keys)


async def read_engine(url: str, arrivals: Arrivals, opened: asyncio.Event) -> None:
    ws_url = url.replace("http://", "ws://") + f"/{SLUG}/ws"
    async with websockets.connect(ws_url, open_timeout=10, max_queue=None) as ws:
        hello = json.loads(await ws.recv())
        assert hello["type"] == "connected", hello
        opened.set()
        async for raw in ws:
            now = (
                time.monotonic_ns()
            )  # before parsing: the client's JSON decode is not the engine's
            message = json.loads(raw)
            if message.get("type") == "change" and message.get("operation") == "insert":
                arrivals.note(now, message["document"])


async def read_raw(
    client: AsyncMongoClient[dict[str, Any]],
    db_name: str,
    arrivals: Arrivals,
    opened: asyncio.Event,
) -> None:
    pipeline = [{"$match": {"ns.coll": PHYSICAL, "operationType": "insert"}}]
    async with await client[db_name].watch(pipeline, **STREAM_OPTIONS) as stream:
        opened.set()
        while True:
            change = await stream.try_next()
            if change is not None:
                arrivals.note(time.monotonic_ns(), change["fullDocument"])


async def wait_for(receivers: Sequence[Arrivals], keys: Sequence[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(r.has(keys) for r in receivers):
        if time.monotonic() > deadline:
            missing = {r.name: sum(k not in r.received for k in keys) for r in receivers}
            raise RuntimeError(f"documents never arrived: {missing}")
        await asyncio.sleep(0.005)


# -- the measurement ------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(fraction * len(ordered)) - 1))]


def summary(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": percentile(values, 0.50),
        "p90_ms": percentile(values, 0.90),
        "p99_ms": percentile(values, 0.99),
        "max_ms": max(values),
        "mean_ms": sum(values) / len(values),
    }


async def measure(args: argparse.Namespace, uri: str, url: str, db_name: str) -> dict[str, Any]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
    engine, raw = Arrivals("engine"), Arrivals("raw stream")
    engine_open, raw_open = asyncio.Event(), asyncio.Event()
    readers = [
        asyncio.create_task(read_engine(url, engine, engine_open)),
        asyncio.create_task(read_raw(client, db_name, raw, raw_open)),
    ]
    collection = client[db_name][PHYSICAL]
    try:
        await asyncio.wait_for(asyncio.gather(engine_open.wait(), raw_open.wait()), 30)

        async def insert(key: str) -> float:
            sent = time.monotonic_ns()
            await collection.insert_one({"_id": key, "t": sent})
            return (time.monotonic_ns() - sent) / 1e6

        # Warm-up: connections, caches, the engine's first frames; not reported.
        warm = [f"w{i}" for i in range(args.warmup)]
        for key in warm:
            await insert(key)
            await asyncio.sleep(args.interval_ms / 1000)
        await wait_for((engine, raw), warm, 30)

        # Light load: one insert every interval, scheduled from the start so a slow insert does
        # not push the later ones back; each stamped with the moment it was actually sent.
        light = [f"l{i}" for i in range(args.count)]
        acks: list[float] = []
        start = time.monotonic()
        for i, key in enumerate(light):
            delay = start + i * args.interval_ms / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            acks.append(await insert(key))
        await wait_for((engine, raw), light, 60)
        light_engine, light_raw = engine.latencies_ms(light), raw.latencies_ms(light)
        light_added = [(engine.received[k] - raw.received[k]) / 1e6 for k in light]

        bursts = []
        for b in range(args.bursts):
            await asyncio.sleep(0.5)  # let the previous phase drain
            keys = [f"b{b}-{i}" for i in range(args.burst)]
            sent = time.monotonic_ns()
            await collection.insert_many([{"_id": k, "t": sent} for k in keys], ordered=True)
            returned = (time.monotonic_ns() - sent) / 1e6
            await wait_for((engine, raw), keys, 120)
            bursts.append(
                {
                    "documents": args.burst,
                    "insert_many_ms": returned,
                    "engine_last_ms": max(engine.latencies_ms(keys)),
                    "raw_last_ms": max(raw.latencies_ms(keys)),
                    "engine_ms": engine.latencies_ms(keys),
                    "raw_ms": raw.latencies_ms(keys),
                    "added_ms": [(engine.received[k] - raw.received[k]) / 1e6 for k in keys],
                }
            )
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        await client.close()

    def joined(name: str) -> list[float]:
        return [value for burst in bursts for value in burst[name]]

    return {
        "light": {
            "count": args.count,
            "interval_ms": args.interval_ms,
            "engine": summary(light_engine),
            "raw": summary(light_raw),
            "engine_minus_raw_per_doc": summary(light_added),
            "insert_ack": summary(acks),
        },
        "burst": {
            "bursts": args.bursts,
            "documents": args.burst,
            "insert_many_ms": [b["insert_many_ms"] for b in bursts],
            "engine_last_ms": [b["engine_last_ms"] for b in bursts],
            "raw_last_ms": [b["raw_last_ms"] for b in bursts],
            "engine": summary(joined("engine_ms")),
            "raw": summary(joined("raw_ms")),
            "engine_minus_raw_per_doc": summary(joined("added_ms")),
        },
    }


# -- output ---------------------------------------------------------------------------------------


def print_report(result: dict[str, Any]) -> None:
    light, burst = result["light"], result["burst"]
    headers = ("phase", "measured", "n", "p50 ms", "p90 ms", "p99 ms", "max ms")
    rows: list[Sequence[Any]] = []
    for phase, data in (("light", light), ("burst", burst)):
        measured = [
            ("engine -> ws client", "engine"),
            ("raw change stream", "raw"),
            ("engine - raw, per doc", "engine_minus_raw_per_doc"),
        ]
        if phase == "light":
            measured.append(("insert_one ack", "insert_ack"))
        for label, key in measured:
            s = data[key]
            rows.append((phase, label, s["n"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]))
    _table(headers, rows)
    print()
    headers = (
        "burst",
        "docs",
        "insert_many ms",
        "last doc: engine ms",
        "last doc: raw ms",
        "diff ms",
    )
    rows = [
        (i + 1, burst["documents"], call, engine, raw, engine - raw)
        for i, (call, engine, raw) in enumerate(
            zip(burst["insert_many_ms"], burst["engine_last_ms"], burst["raw_last_ms"], strict=True)
        )
    ]
    _table(headers, rows)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("pymongo", "websockets", "uvicorn", "SecantusDB", "uvloop"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "packages": versions,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.change_latency",
        description="Write -> WebSocket client latency of the engine's change delivery, next to "
        "a raw change stream consumer on the same collection.",
    )
    parser.add_argument("--count", type=int, default=1000, help="light-load inserts (1000)")
    parser.add_argument(
        "--interval-ms", type=float, default=5.0, help="pause between light inserts (5)"
    )
    parser.add_argument("--burst", type=int, default=1000, help="documents per insert_many (1000)")
    parser.add_argument("--bursts", type=int, default=3, help="insert_many calls (3)")
    parser.add_argument("--warmup", type=int, default=50, help="unreported first inserts (50)")
    parser.add_argument(
        "--mongo-uri",
        default=os.environ.get("MONGODB_URI"),
        help="MongoDB to use (default: $MONGODB_URI, else an in-memory SecantusDB)",
    )
    parser.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="event loop of this process (the clients and the writer); default uvloop",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: bench/results)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.burst < 1 or args.bursts < 1 or args.warmup < 1:
        parser.error("--count, --burst, --bursts and --warmup must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    db_name = f"bench_latency_{uuid.uuid4().hex[:8]}"
    with (
        workspace(args.keep) as folder,
        database(args.mongo_uri, folder) as (uri, kind),
        engine_server(uri, db_name, folder) as url,
    ):
        coroutine = measure(args, uri, url, db_name)
        if args.loop == "uvloop":
            import uvloop

            result = uvloop.run(coroutine)
        else:
            result = asyncio.run(coroutine)
    started = datetime.now(UTC)
    payload = {
        "benchmark": "change_latency",
        "when": started.isoformat(),
        "database": kind,
        "command": " ".join(["python -m bench.change_latency", *(argv or sys.argv[1:])]),
        "loop": args.loop,
        "machine": machine(),
        **result,
    }
    print(f"change latency, {kind}; times in ms from send to receive\n")
    print_report(result)
    out = args.out or RESULTS / f"change_latency-{started:%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
