"""Bus cost: what carrying broadcasts between engine processes through MongoDB costs.

    python -m bench.bus_cost [--clients 1] [--size 100] [--rounds 3] [--mongo-uri URI] ...

Starts SecantusDB in memory (`engine.embedded`, with TMPDIR in a folder of this run) unless
--mongo-uri or MONGODB_URI is given, then two engine processes A and B on one database
(`bench.servers.bus_app`) and --clients WebSocket clients on each. App code on A calls
`broadcast_to_app`: A's clients get the message at once, B's through the bus (A inserts it
into `_mdb_realtime_bus`, B reads it from its change stream). Each round measures:

- latency: --latency-count paced broadcasts (--latency-rate per second) from A; each carries
  the wall-clock time it was due, and every client records when it arrived (same clock):
  p50 / p99 for a client on A (same process) and on B (other process);
- throughput: --flood-count broadcasts flat out, from A alone and from A and B at once;
  broadcasts per second that reach the other process (request start -> last frame received);
- CPU: --cpu-count broadcasts from A, with the bus and local-only (`bus=0`: A's clients only,
  as a lone process), paced (--cpu-rate per second) and flat out; the CPU time (user + system)
  of A, B and the database during the trial, minus each one's idle rate, per broadcast.

Prints Markdown tables (medians over rounds) and writes JSON to bench/results/bus_cost-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: `python bench/bus_cost.py`
    sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from bench.servers.bus_app import BUS_PATH  # noqa: E402
from bench.servers.common import BROADCAST_PATH, WS_PATH  # noqa: E402
from bench.wsclient import Tally, WsClient, close_clients, open_clients  # noqa: E402

SECRET = "bench-secret-that-is-long-enough-for-hs256"
STALL_SECONDS = 10.0  # no frame for this long ends a trial: the rest is counted as lost
HUGE_QUEUE = {  # this measures the bus, not slow consumers: queues never overflow here
    "MDB_REALTIME_QUEUE_MAX_MESSAGES": "10000000",
    "MDB_REALTIME_QUEUE_MAX_BYTES": str(4 * 1024**3),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bus_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", type=int, default=1, help="clients per process (1)")
    parser.add_argument("--size", type=int, default=100, help="message bytes (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (%(default)s)")
    parser.add_argument("--latency-count", type=int, default=2000, help="paced broadcasts")
    parser.add_argument("--latency-rate", type=float, default=200.0, help="broadcasts/s (200)")
    parser.add_argument("--flood-count", type=int, default=20_000, help="flat-out broadcasts")
    parser.add_argument("--cpu-count", type=int, default=5000, help="broadcasts per CPU trial")
    parser.add_argument("--cpu-rate", type=float, default=500.0, help="paced CPU trial rate (500)")
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="idle CPU measurement")
    parser.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop of the engine processes (`serve` uses asyncio)",
    )
    parser.add_argument(
        "--engine-ref",
        default="HEAD",
        help="git commit of the engine to measure, or `worktree` (default: %(default)s)",
    )
    parser.add_argument(
        "--mongo-uri",
        default=os.environ.get("MONGODB_URI"),
        help="a MongoDB replica set (default: $MONGODB_URI, else SecantusDB)",
    )
    return parser.parse_args(argv)


# -- processes -----------------------------------------------------------------------------------


class EngineProcess(harness.Server):
    """`bench.servers.bus_app` as a child process on loopback; not pinned, since the two
    engines of a run share both cores."""

    def __init__(
        self, name: str, env: dict[str, str], workdir: Path, loop: str, engine_dir: Path
    ) -> None:
        command = (
            sys.executable,
            "-m",
            "bench.servers.bus_app",
            "--manifests",
            str(harness.BENCH_MANIFESTS),
            "--loop",
            loop,
        )
        # engine_dir is first on sys.path: where `engine` is imported from.
        target = harness.Target(f"engine-{name}", "bus app", command, env, cwd=engine_dir)
        super().__init__(target, workdir)
        self.name = name

    def preexec(self) -> None:
        os.setsid()  # a Ctrl-C of the benchmark is not also its own

    async def broadcast(  # type: ignore[override]
        self, count: int, size: int, interval: float, bus: bool
    ) -> Any:
        query = f"count={count}&size={size}&interval={interval}&bus={int(bus)}"
        return await self.request(f"{BROADCAST_PATH}?{query}", "POST")

    async def published(self) -> int:
        return int((await self.request(BUS_PATH))["published"])


@contextlib.contextmanager
def database(uri: str | None, workdir: Path) -> Iterator[tuple[str, int | None, str]]:
    """(URI, pid of the database if it runs here, description)."""
    if uri:
        yield uri, None, "external MongoDB (MONGODB_URI / --mongo-uri)"
        return
    from engine.embedded import EmbeddedDatabase

    embedded = EmbeddedDatabase(":memory:")
    embedded.start(log_path=workdir / "secantus.log")
    assert embedded.pid is not None
    try:
        yield embedded.uri, embedded.pid, "SecantusDB 0.7.0b3 in memory (engine.embedded)"
    finally:
        embedded.stop()


# -- trials ---------------------------------------------------------------------------------------


@dataclass
class Side:
    """One engine process and the clients connected to it."""

    engine: EngineProcess
    tally: Tally = field(default_factory=Tally)
    clients: list[WsClient] = field(default_factory=list)


async def wait_delivered(sides: Sequence[Side]) -> None:
    """Until every side's clients got what they expect, or nothing arrived for a while."""
    tallies = [side.tally for side in sides if side.tally.target]
    while True:
        pending = [t for t in tallies if not t.done.is_set()]
        if not pending:
            return
        before = sum(t.broadcasts for t in tallies)
        try:
            await asyncio.wait_for(pending[0].done.wait(), STALL_SECONDS)
        except TimeoutError:
            if sum(t.broadcasts for t in tallies) == before:
                return  # stalled: the caller sees the shortfall


async def run_trial(
    senders: Sequence[Side],
    sides: Sequence[Side],
    count: int,
    size: int,
    interval: float,
    bus: bool,
    record: bool,
    clients: int,
) -> float:
    """Broadcast `count` from each sender; wait for the deliveries; the start time."""
    per_client = count * (len(senders) if bus else 1)
    for side in sides:
        local = any(side is sender for sender in senders)
        side.tally.expect(per_client * clients if (bus or local) else 0)
        side.tally.recording = record
    started = time.time()
    await asyncio.gather(*(s.engine.broadcast(count, size, interval, bus) for s in senders))
    await wait_delivered(sides)
    return started


def latency_summary(values: Sequence[float]) -> dict[str, float]:
    millis = [1000 * v for v in values]
    return {
        "p50_ms": harness.percentile(millis, 0.50),
        "p99_ms": harness.percentile(millis, 0.99),
        "max_ms": max(millis) if millis else float("nan"),
        "samples": len(millis),
    }


async def latency_round(a: Side, b: Side, args: argparse.Namespace) -> dict[str, Any]:
    await run_trial([a], [a, b], 100, args.size, 0.002, True, False, args.clients)  # warm-up
    interval = 1.0 / args.latency_rate
    await run_trial([a], [a, b], args.latency_count, args.size, interval, True, True, args.clients)
    expected = args.latency_count * args.clients
    return {
        "same_process": latency_summary(a.tally.latencies),
        "other_process": latency_summary(b.tally.latencies),
        "lost": {
            "same_process": expected - a.tally.broadcasts,
            "other_process": expected - b.tally.broadcasts,
        },
    }


async def throughput_round(a: Side, b: Side, args: argparse.Namespace) -> dict[str, Any]:
    count = args.flood_count
    started = await run_trial([a], [a, b], count, args.size, 0, True, False, args.clients)
    one_way = {
        "broadcasts": count,
        "received_other_process": b.tally.broadcasts // args.clients,
        "seconds_other_process": b.tally.last_received - started,
        "seconds_same_process": a.tally.last_received - started,
    }
    one_way["per_second_other_process"] = count / one_way["seconds_other_process"]
    one_way["per_second_same_process"] = count / one_way["seconds_same_process"]

    started = await run_trial([a, b], [a, b], count, args.size, 0, True, False, args.clients)
    last = max(a.tally.last_received, b.tally.last_received)
    both = {
        "broadcasts": 2 * count,
        "received": (a.tally.broadcasts + b.tally.broadcasts) // args.clients,
        "seconds": last - started,
    }
    # Each process delivers the other's `count` through the bus (and its own locally).
    both["crossing_per_second"] = 2 * count / both["seconds"]
    return {"one_way": one_way, "both_ways": both}


async def idle_rates(pids: dict[str, int], seconds: float) -> dict[str, float]:
    before = {name: harness.cpu_seconds(pid) for name, pid in pids.items()}
    await asyncio.sleep(seconds)
    return {name: (harness.cpu_seconds(pid) - before[name]) / seconds for name, pid in pids.items()}


async def cpu_trial(
    a: Side,
    b: Side,
    pids: dict[str, int],
    idle: dict[str, float],
    args: argparse.Namespace,
    bus: bool,
    interval: float,
) -> dict[str, Any]:
    for pid in (a.engine.pid, b.engine.pid):
        await harness.wait_idle(pid)
    published_before = await a.engine.published()
    before = {name: harness.cpu_seconds(pid) for name, pid in pids.items()}
    clock = time.monotonic()
    await run_trial([a], [a, b], args.cpu_count, args.size, interval, bus, False, args.clients)
    for pid in (a.engine.pid, b.engine.pid):  # A reads its own broadcasts back, B delivers
        await harness.wait_idle(pid)
    window = time.monotonic() - clock
    used = {
        name: harness.cpu_seconds(pid) - before[name] - idle[name] * window
        for name, pid in pids.items()
    }
    published = await a.engine.published() - published_before
    return {
        "delivery": "bus" if bus else "local only",
        "pacing": f"{args.cpu_rate:g}/s" if interval else "flat out",
        "broadcasts": args.cpu_count,
        "published_to_bus": published,
        "received_same_process": a.tally.broadcasts // args.clients,
        "received_other_process": b.tally.broadcasts // args.clients,
        "window_seconds": window,
        "us_per_broadcast": {n: 1e6 * max(0.0, s) / args.cpu_count for n, s in used.items()},
    }


async def cpu_round(
    a: Side, b: Side, pids: dict[str, int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    idle = await idle_rates(pids, args.idle_seconds)
    trials = []
    for bus in (False, True):
        for interval in (1.0 / args.cpu_rate, 0.0):
            trials.append(await cpu_trial(a, b, pids, idle, args, bus, interval))
    return trials


# -- the run --------------------------------------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU time all cores spent running anything, from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


class OthersLoad:
    """CPU that processes outside this benchmark took while it ran, in cores (the machine may
    be shared: figures taken while others ran are noisier)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.busy = machine_busy_seconds()
        self.ours = self._ours()

    def _ours(self) -> float:
        return harness.own_cpu_seconds() + sum(harness.cpu_seconds(pid) for pid in self.pids)

    def cores(self) -> float:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        others = machine_busy_seconds() - self.busy - (self._ours() - self.ours)
        return max(0.0, others) / elapsed


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with database(args.mongo_uri, workdir) as (uri, database_pid, described):
        env = {
            "MONGODB_URI": uri,
            "MDB_REALTIME_DB": f"bench_bus_{uuid.uuid4().hex[:8]}",
            "MDB_REALTIME_JWT_SECRET": SECRET,
            **HUGE_QUEUE,
        }
        engine_dir, commit = harness.engine_snapshot(args.engine_ref, workdir)
        engines = []
        try:
            for name in ("A", "B"):
                data_dir = workdir / f"data-{name}"
                data_dir.mkdir()
                engine_env = {**env, "MDB_REALTIME_DATA_DIR": str(data_dir)}
                process = EngineProcess(name, engine_env, workdir, args.loop, engine_dir)
                engines.append(process.start())
            a, b = Side(engines[0]), Side(engines[1])
            for side in (a, b):
                side.clients = await open_clients(
                    side.engine.host,
                    side.engine.port,
                    WS_PATH,
                    args.clients,
                    side.tally,
                    samples=args.clients,
                )
                await side.engine.wait_connections(args.clients)
            pids = {"A": a.engine.pid, "B": b.engine.pid}
            if database_pid is not None:
                pids["database"] = database_pid
            rounds = []
            for number in range(1, args.rounds + 1):
                print(f"round {number}/{args.rounds} ...", file=sys.stderr, flush=True)
                others = OthersLoad(list(pids.values()))
                rounds.append(
                    {
                        "latency": await latency_round(a, b, args),
                        "throughput": await throughput_round(a, b, args),
                        "cpu": await cpu_round(a, b, pids, args),
                        "others_cores": others.cores(),
                    }
                )
            lost_connections = a.tally.lost_connections + b.tally.lost_connections
            for side in (a, b):
                close_clients(side.clients)
        finally:
            for engine in engines:
                engine.stop()
    return {
        "database": described,
        "engine_commit": commit,
        "rounds": rounds,
        "lost_connections": lost_connections,
    }


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    rounds = result["rounds"]
    summary: dict[str, Any] = {"latency": {}, "throughput": {}, "cpu": []}
    for where in ("same_process", "other_process"):
        summary["latency"][where] = {
            key: _median([r["latency"][where][key] for r in rounds])
            for key in ("p50_ms", "p99_ms", "max_ms")
        }
    summary["throughput"] = {
        "one_way_per_second_other_process": _median(
            [r["throughput"]["one_way"]["per_second_other_process"] for r in rounds]
        ),
        "one_way_per_second_same_process": _median(
            [r["throughput"]["one_way"]["per_second_same_process"] for r in rounds]
        ),
        "both_ways_crossing_per_second": _median(
            [r["throughput"]["both_ways"]["crossing_per_second"] for r in rounds]
        ),
    }
    for index, trial in enumerate(rounds[0]["cpu"]):
        costs = {
            name: _median([r["cpu"][index]["us_per_broadcast"][name] for r in rounds])
            for name in trial["us_per_broadcast"]
        }
        summary["cpu"].append(
            {"delivery": trial["delivery"], "pacing": trial["pacing"], "us_per_broadcast": costs}
        )
    return summary


def print_report(args: argparse.Namespace, result: dict[str, Any], summary: dict[str, Any]) -> None:
    print(
        f"\nBus cost: 2 engine processes (engine {result['engine_commit'][:10]}) on "
        f"{result['database']}, {args.clients} client(s) "
        f"per process, ~{args.size}-byte broadcasts from app code on A; medians of "
        f"{args.rounds} round(s)\n"
    )
    latency = summary["latency"]
    print(f"Latency ({args.latency_count} broadcasts at {args.latency_rate:g}/s):\n")
    harness.print_table(
        ["client on", "p50 ms", "p99 ms", "max ms"],
        [
            [label, latency[key]["p50_ms"], latency[key]["p99_ms"], latency[key]["max_ms"]]
            for label, key in (
                ("A (same process)", "same_process"),
                ("B (other process, bus)", "other_process"),
            )
        ],
    )
    throughput = summary["throughput"]
    print(f"\nThroughput ({args.flood_count} broadcasts flat out per sender):\n")
    harness.print_table(
        ["flow", "broadcasts/s"],
        [
            ["A -> A's clients (local)", throughput["one_way_per_second_same_process"]],
            ["A -> B's clients (bus)", throughput["one_way_per_second_other_process"]],
            ["A <-> B at once, crossing", throughput["both_ways_crossing_per_second"]],
        ],
    )
    print(f"\nServer CPU per broadcast ({args.cpu_count} broadcasts, idle rate subtracted):\n")
    names = list(summary["cpu"][0]["us_per_broadcast"])
    rows = []
    for trial in summary["cpu"]:
        costs = trial["us_per_broadcast"]
        rows.append(
            [trial["delivery"], trial["pacing"], *(costs[n] for n in names), sum(costs.values())]
        )
    harness.print_table(["delivery", "pacing", *(f"{n} us" for n in names), "total us"], rows)
    lost = sum(
        r["latency"]["lost"]["other_process"]
        + r["throughput"]["one_way"]["broadcasts"]
        - r["throughput"]["one_way"]["received_other_process"]
        for r in result["rounds"]
    )
    others = ", ".join(f"{r['others_cores']:.2f}" for r in result["rounds"])
    print(f"\nCPU taken by other processes on this machine, per round (cores): {others}")
    print(
        f"broadcasts lost on the way to B: {lost}; lost connections: {result['lost_connections']}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    harness.raise_fd_limit()
    with harness.workspace() as workdir:  # also TMPDIR for the embedded database
        result = _run(measure(args, workdir))
    summary = summarize(result)
    print_report(args, result, summary)
    path = harness.write_results("bus_cost", {"config": vars(args), **result, "summary": summary})
    print(f"\nresults: {path.relative_to(REPO)}")
    return 0


def _run(main: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """The load generator on uvloop where installed (the `bench` extra): cheaper clients."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


if __name__ == "__main__":
    raise SystemExit(main())
