"""Idle connections: server memory per connection, and server CPU while holding them.

Each target starts fresh and takes connections in steps (--steps, cumulative); after each step
the server's RSS growth over its idle start-up RSS, divided by the connections, is the memory
per connection. At the last step the connections are held idle for --hold seconds with every
keepalive on (uvicorn's and websockets' protocol pings every 20 s, the engine's JSON ping after
30 s of silence); the server's CPU time over that window is its idle cost. The client answers
every ping, so nothing is closed for silence.

Targets run one after another (a process may hold only so many sockets); the `engine-cli`
target is `mdb-realtime serve` exactly as users start it. Results go to
bench/results/connections-<time>.json.

Run: python -m bench.connections [--steps 1000,5000,10000] [--hold 60] [--targets ...]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import Server, Target
from bench.servers.common import WS_PATH
from bench.wsclient import Tally, WsClient, close_clients, open_clients

DEFAULT_TARGETS = ("engine-cli", "engine", "naive", "websockets", "mdb-engine")
SETTLE_SECONDS = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.connections",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--steps", default="1000,5000,10000", help="connections (%(default)s)")
    parser.add_argument("--hold", type=float, default=60.0, help="idle seconds at the last step")
    harness.add_target_arguments(parser, DEFAULT_TARGETS)
    return parser.parse_args(argv)


async def wait_registered(server: Server, clients: list[WsClient], expected: int) -> None:
    """The server counts them all (or, for the plain CLI, each got its `connected` message)."""
    if server.target.has_bench_routes:
        await server.wait_connections(expected, timeout=120)
    else:
        await asyncio.wait_for(asyncio.gather(*(c.first_text for c in clients)), 120)


async def measure(server: Server, steps: list[int], hold: float) -> dict[str, Any]:
    await asyncio.sleep(SETTLE_SECONDS)
    await harness.wait_idle(server.pid)
    baseline = harness.rss_bytes(server.pid)
    tally = Tally()
    clients: list[WsClient] = []
    memory = []
    try:
        for step in steps:
            started = time.monotonic()
            clients += await open_clients(
                server.host, server.port, WS_PATH, step - len(clients), tally
            )
            await wait_registered(server, clients, step)
            connect_seconds = time.monotonic() - started
            await asyncio.sleep(SETTLE_SECONDS)
            await harness.wait_idle(server.pid)
            rss = harness.rss_bytes(server.pid)
            memory.append(
                {
                    "connections": step,
                    "rss_bytes": rss,
                    "bytes_per_connection": (rss - baseline) / step,
                    "connect_seconds": connect_seconds,
                }
            )
            print(
                f"  {step} connections: {(rss - baseline) / step / 1024:.1f} KiB each",
                file=sys.stderr,
            )
        idle = await hold_idle(server, tally, len(clients), hold)
    finally:
        close_clients(clients)
    return {"baseline_rss_bytes": baseline, "memory": memory, "idle": idle}


async def hold_idle(server: Server, tally: Tally, connections: int, hold: float) -> dict[str, Any]:
    pings_before, lost_before = tally.pings, tally.lost_connections
    cpu_before, started = harness.cpu_seconds(server.pid), time.monotonic()
    await asyncio.sleep(hold)
    elapsed = time.monotonic() - started
    cpu = harness.cpu_seconds(server.pid) - cpu_before
    return {
        "connections": connections,
        "seconds": elapsed,
        "server_cpu_s": cpu,
        "server_cpu_pct": 100 * cpu / elapsed,
        "pings_per_connection": (tally.pings - pings_before) / max(connections, 1),
        "lost_connections": tally.lost_connections - lost_before,
        "rss_bytes_after": harness.rss_bytes(server.pid),
    }


async def run(args: argparse.Namespace, targets: list[Target], workdir: Path) -> dict[str, Any]:
    steps = [int(n) for n in args.steps.split(",")]
    limit = harness.fd_limit()
    if max(steps) + 100 > limit:
        raise SystemExit(f"{max(steps)} connections need more than the {limit} open files allowed")
    results = {}
    for target in targets:
        print(f"{target.name} ...", file=sys.stderr)
        server = Server(target, workdir).start()
        try:
            results[target.name] = await measure(server, steps, args.hold)
        finally:
            server.stop()
    return results


def summary_rows(results: dict[str, Any]) -> list[list[Any]]:
    engine = results.get("engine-cli") or results.get("engine")
    rows = []
    for name, result in results.items():
        for index, step in enumerate(result["memory"]):
            reference = engine["memory"][index]["bytes_per_connection"] if engine else 0
            rows.append(
                [
                    name,
                    step["connections"],
                    step["bytes_per_connection"] / 1024,
                    step["bytes_per_connection"] / reference if reference else float("nan"),
                    step["connections"] / step["connect_seconds"],
                ]
            )
    return rows


def idle_rows(results: dict[str, Any]) -> list[list[Any]]:
    return [
        [
            name,
            r["idle"]["connections"],
            r["idle"]["seconds"],
            r["idle"]["server_cpu_pct"],
            r["idle"]["pings_per_connection"],
            r["idle"]["lost_connections"],
        ]
        for name, r in results.items()
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_loadgen()
    with harness.setting(args) as setting:
        targets = harness.select_targets(args.targets, setting)
        results = asyncio.run(run(args, targets, setting.workdir))
    print("\nmemory per idle connection (server RSS growth / connections)")
    harness.print_table(
        ["target", "connections", "KiB/conn", "x engine", "handshakes/s"], summary_rows(results)
    )
    print("\nserver CPU while holding the connections idle")
    harness.print_table(
        ["target", "connections", "seconds", "server CPU %", "pings/conn", "lost"],
        idle_rows(results),
    )
    path = harness.write_results(
        "connections",
        {
            "config": vars(args),
            "engine_commit": setting.engine_commit,
            "targets": {t.name: t.description for t in targets},
            "results": results,
        },
    )
    print(f"\nresults: {path.relative_to(harness.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
