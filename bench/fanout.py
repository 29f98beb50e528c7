"""Fan-out: one ~100-byte broadcast to N connected clients, the engine against its peers.

For each client count N and each round, every target in turn (the order rotates each round, so
drift on a noisy machine hits all targets alike) gets N fresh connections and two trials:

- throughput: M broadcasts flat out (M = --deliveries / N); delivered messages per second from
  the request to the last frame received, and server CPU time per delivered message;
- latency: paced broadcasts (--latency-rate per second, capped so that N x rate stays light);
  each message carries the time it was due, and sampled clients record when it arrived.

Ratios are taken within a round (target / reference, `--references`, default the engine)
before the median, so they cancel the machine's drift. Results go to
bench/results/fanout-<time>.json.

Run: python -m bench.fanout [--clients 100,1000,5000] [--targets ...] [--references ...]
     [--profile 10]
The user-app targets (bench/servers/user_app.py) are a user's own FastAPI app mounting the
engine with `register_websocket_routes` or `create_websocket_endpoint`, run by plain uvicorn;
`engine-cli` is `mdb-realtime serve`, broadcast to by `POST /bench/broadcast` per message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import harness, pyspy
from bench.harness import Server, Target
from bench.servers.common import WS_PATH
from bench.wsclient import Tally, WsClient, close_clients, open_clients

DEFAULT_TARGETS = ("engine", "engine-asyncio", "naive", "websockets", "mdb-engine")
STALL_SECONDS = 5.0  # no frame for this long ends a trial: the rest is counted as lost


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--clients", default="100,1000,5000", help="client counts (%(default)s)")
    parser.add_argument(
        "--deliveries", type=int, default=200_000, help="messages per throughput trial"
    )
    parser.add_argument("--size", type=int, default=100, help="message bytes (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per client count")
    parser.add_argument("--latency-rate", type=float, default=20.0, help="broadcasts/s (20)")
    parser.add_argument(
        "--latency-load",
        type=int,
        default=10_000,
        help="cap on N x rate, deliveries/s, to keep the paced load light (%(default)s)",
    )
    parser.add_argument("--latency-seconds", type=float, default=5.0, help="paced run length")
    parser.add_argument("--samples", type=int, default=100, help="clients recording latency")
    parser.add_argument(
        "--max-others",
        type=float,
        default=10.0,
        help="retry a trial when other processes used more than this %% of either core",
    )
    parser.add_argument("--tries", type=int, default=3, help="attempts per trial at most")
    parser.add_argument(
        "--profile",
        type=float,
        default=0,
        metavar="SECONDS",
        help="then profile a target under fan-out load with py-spy for SECONDS",
    )
    parser.add_argument(
        "--profile-targets",
        default="engine",
        help="comma-separated targets to profile with --profile (%(default)s)",
    )
    parser.add_argument(
        "--profile-native", action="store_true", help="include C frames in the profile"
    )
    parser.add_argument(
        "--references",
        default="engine",
        help="targets the others are compared with, within each round (%(default)s)",
    )
    harness.add_target_arguments(parser, DEFAULT_TARGETS)
    return parser.parse_args(argv)


async def throughput_trial(
    server: Server, clients: list[WsClient], tally: Tally, messages: int, size: int
) -> dict[str, Any]:
    expected = len(clients) * messages
    tally.expect(expected)
    tally.recording = False
    await harness.wait_idle(server.pid)
    cpu_before, own_before = harness.cpu_seconds(server.pid), harness.own_cpu_seconds()
    noise = harness.Noise.start(server.pid)
    started = time.time()
    request = asyncio.create_task(server.broadcast(messages, size, 0, timeout=300))
    await _until_done_or_stalled(tally)
    elapsed = max(tally.last_received - started, 1e-9)
    cpu = harness.cpu_seconds(server.pid) - cpu_before
    loadgen_cpu = harness.own_cpu_seconds() - own_before
    others = noise.percent()
    answer = await request
    delivered = tally.broadcasts
    return {
        "messages": messages,
        "expected": expected,
        "delivered": delivered,
        "seconds": elapsed,
        "msgs_per_s": delivered / elapsed,
        "server_cpu_s": cpu,
        "cpu_us_per_msg": 1e6 * cpu / max(delivered, 1),
        "loadgen_cpu_pct": 100 * loadgen_cpu / elapsed,
        **others,
        "bytes_per_msg": tally.payload_bytes / max(delivered, 1),
        "server_seconds": answer.get("seconds"),
    }


async def latency_trial(
    server: Server, clients: list[WsClient], tally: Tally, rate: float, seconds: float, size: int
) -> dict[str, Any]:
    count = max(1, round(rate * seconds))
    tally.expect(len(clients) * count)
    tally.recording = True
    await harness.wait_idle(server.pid)
    cpu_before = harness.cpu_seconds(server.pid)
    noise = harness.Noise.start(server.pid)
    started = time.time()
    request = asyncio.create_task(server.broadcast(count, size, 1 / rate, timeout=seconds + 120))
    await _until_done_or_stalled(tally)
    cpu = harness.cpu_seconds(server.pid) - cpu_before
    others = noise.percent()
    await request
    latencies = list(tally.latencies)
    return {
        "rate": rate,
        "broadcasts": count,
        "delivered": tally.broadcasts,
        "expected": len(clients) * count,
        "server_cpu_pct": 100 * cpu / max(time.time() - started, 1e-9),
        **others,
        "p50_ms": 1e3 * harness.percentile(latencies, 0.50),
        "p99_ms": 1e3 * harness.percentile(latencies, 0.99),
        "max_ms": 1e3 * max(latencies, default=float("nan")),
        "latencies_ms": [round(1e3 * value, 3) for value in latencies],
    }


async def _until_done_or_stalled(tally: Tally) -> None:
    """Wait for every expected frame, or until frames stop arriving."""
    last_count, last_change = -1, time.monotonic()
    while not tally.done.is_set():
        if tally.broadcasts != last_count:
            last_count, last_change = tally.broadcasts, time.monotonic()
        elif time.monotonic() - last_change > STALL_SECONDS:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), 0.25)


async def measure_target(server: Server, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Connect N clients to a running server and run both trials on them."""
    tally = Tally()
    clients = await open_clients(server.host, server.port, WS_PATH, n, tally, args.samples)
    try:
        await server.wait_connections(n)
        messages = max(1, args.deliveries // n)
        throughput = await throughput_trial(server, clients, tally, messages, args.size)
        rate = min(args.latency_rate, args.latency_load / n)
        latency = await latency_trial(server, clients, tally, rate, args.latency_seconds, args.size)
        return {
            "throughput": throughput,
            "latency": latency,
            "lost_connections": tally.lost_connections,
            "close_codes": dict(tally.close_codes),
        }
    finally:
        close_clients(clients)
        await server.wait_connections(0)


async def quiet_measurement(server: Server, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Measure; while other processes took much of either core meanwhile, measure again.

    The quietest attempt is kept; how many were made is recorded with it.
    """
    attempts = []
    for _ in range(args.tries):
        attempts.append(await measure_target(server, n, args))
        if _noise(attempts[-1]) <= args.max_others:
            break
    best = min(attempts, key=_noise)
    return {**best, "attempts": len(attempts)}


def _noise(result: dict[str, Any]) -> float:
    """The most CPU others took on either core in either trial, in percent."""
    return max(
        result[trial][key]
        for trial in ("throughput", "latency")
        for key in ("others_on_server_core_pct", "others_on_loadgen_core_pct")
    )


async def run(args: argparse.Namespace, targets: list[Target], workdir: Path) -> dict[str, Any]:
    sizes = [int(n) for n in args.clients.split(",")]
    servers = {t.name: Server(t, workdir).start() for t in targets}
    trials: list[dict[str, Any]] = []
    try:
        for n in sizes:
            for round_index in range(args.rounds):
                shift = round_index % len(targets)
                for target in targets[shift:] + targets[:shift]:
                    print(f"N={n} round {round_index + 1}: {target.name} ...", file=sys.stderr)
                    result = await quiet_measurement(servers[target.name], n, args)
                    trials.append(
                        {"clients": n, "round": round_index, "target": target.name, **result}
                    )
        profiles = {
            name: await profile_target(servers[name], max(sizes), args, workdir)
            for name in args.profile_targets.split(",")
            if args.profile and name in servers
        }
    finally:
        for server in servers.values():
            server.stop()
    return {"trials": trials, "profiles": profiles}


async def profile_target(
    server: Server, n: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """py-spy samples of a server while it fans out to N clients, flat out."""
    tally = Tally()
    clients = await open_clients(server.host, server.port, WS_PATH, n, tally)
    try:
        await server.wait_connections(n)
        # Enough messages to keep it busy for the whole sampling window.
        messages = max(1, int(args.deliveries // n * (args.profile + 5)))
        tally.expect(n * messages)
        request = asyncio.create_task(server.broadcast(messages, args.size, 0, timeout=600))
        output = workdir / f"{server.target.name}.pyspy"
        stacks = await pyspy.record(server.pid, args.profile, output, args.profile_native)
        request.cancel()
        return pyspy.summarize(stacks)
    finally:
        close_clients(clients)
        await server.wait_connections(0)


def summarize(
    trials: list[dict[str, Any]], names: list[str], references: list[str]
) -> list[dict[str, Any]]:
    """Medians per (N, target), and ratios to each reference taken within each round first."""
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for trial in trials:
        by_key[(trial["clients"], trial["target"])].append(trial)
    rows = []
    for n in sorted({t["clients"] for t in trials}):
        reference_rounds = {
            reference: {t["round"]: t for t in by_key.get((n, reference), [])}
            for reference in references
        }
        for name in names:
            runs = by_key.get((n, name), [])
            if runs:
                rows.append(_summary_row(n, name, runs, reference_rounds))
    return rows


def _summary_row(
    n: int,
    name: str,
    runs: list[dict[str, Any]],
    reference_rounds: dict[str, dict[int, dict[str, Any]]],
) -> dict[str, Any]:
    def ratios(metric: str, rounds: dict[int, dict[str, Any]]) -> list[float]:
        return [
            r["throughput"][metric] / rounds[r["round"]]["throughput"][metric]
            for r in runs
            if r["round"] in rounds
        ]

    latencies = [value for r in runs for value in r["latency"]["latencies_ms"]]
    throughput = [r["throughput"] for r in runs]
    return {
        "clients": n,
        "target": name,
        "msgs_per_s": harness.median([t["msgs_per_s"] for t in throughput]),
        "cpu_us_per_msg": harness.median([t["cpu_us_per_msg"] for t in throughput]),
        "versus": {
            reference: {
                "msgs_per_s": harness.median(ratios("msgs_per_s", rounds)),
                "cpu_us_per_msg": harness.median(ratios("cpu_us_per_msg", rounds)),
            }
            for reference, rounds in reference_rounds.items()
        },
        "delivered_pct": 100
        * sum(t["delivered"] for t in throughput)
        / sum(t["expected"] for t in throughput),
        "loadgen_cpu_pct": harness.median([t["loadgen_cpu_pct"] for t in throughput]),
        "others_pct": harness.median([_noise(r) for r in runs]),
        "bytes_per_msg": harness.median([t["bytes_per_msg"] for t in throughput]),
        "latency_rate": runs[0]["latency"]["rate"],
        "p50_ms": harness.percentile(latencies, 0.50),
        "p99_ms": harness.percentile(latencies, 0.99),
        "lost_connections": sum(r["lost_connections"] for r in runs),
    }


def print_summary(rows: list[dict[str, Any]], references: list[str]) -> None:
    ratio_headers = [header for ref in references for header in (f"x {ref}", f"CPU x {ref}")]
    harness.print_table(
        [
            "N",
            "target",
            "msgs/s",
            "CPU us/msg",
            *ratio_headers,
            "delivered %",
            "loadgen CPU %",
            "others %",
            "bcasts/s",
            "p50 ms",
            "p99 ms",
        ],
        [
            [
                r["clients"],
                r["target"],
                r["msgs_per_s"],
                r["cpu_us_per_msg"],
                *(
                    r["versus"][ref][metric]
                    for ref in references
                    for metric in ("msgs_per_s", "cpu_us_per_msg")
                ),
                r["delivered_pct"],
                r["loadgen_cpu_pct"],
                r["others_pct"],
                r["latency_rate"],
                r["p50_ms"],
                r["p99_ms"],
            ]
            for r in rows
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_loadgen()
    with harness.setting(args) as setting:
        targets = harness.select_targets(args.targets, setting)
        results = asyncio.run(run(args, targets, setting.workdir))
    references = [name.strip() for name in args.references.split(",") if name.strip()]
    rows = summarize(results["trials"], [t.name for t in targets], references)
    print_summary(rows, references)
    for name, profile in results["profiles"].items():
        pyspy.print_summary(name, profile)
    path = harness.write_results(
        "fanout",
        {
            "config": vars(args),
            "engine_commit": setting.engine_commit,
            "targets": {t.name: t.description for t in targets},
            "summary": rows,
            **results,
        },
    )
    print(f"\nresults: {path.relative_to(harness.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
