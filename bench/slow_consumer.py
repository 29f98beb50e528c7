"""Slow consumer: does one client that stops reading hurt the others?

100 readers and, in the "stalled" runs, one more client in the middle of the connection order
that completes its handshake and never reads again (a raw socket with a small receive buffer,
like a phone that lost its radio). The server broadcasts 4 KB messages at a steady pace, so the
stalled client's socket buffers fill within the first second. For each target, runs with and
without the stalled client alternate; the readers' delivered share and latency are compared.
Also reported: the server's memory growth over the run, and what became of the stalled client.

Results go to bench/results/slow_consumer-<time>.json.

Run: python -m bench.slow_consumer [--readers 100] [--rate 100] [--seconds 20] [--targets ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import Server, Target
from bench.servers.common import WS_PATH
from bench.wsclient import Tally, close_clients, open_clients

DEFAULT_TARGETS = ("engine", "naive", "websockets", "mdb-engine")
STALLED_RECEIVE_BUFFER = 4096
GRACE_SECONDS = 10.0  # after the last broadcast is due, how long readers may still catch up


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.slow_consumer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--readers", type=int, default=100, help="clients that read")
    parser.add_argument("--size", type=int, default=4096, help="message bytes (%(default)s)")
    parser.add_argument("--rate", type=float, default=200.0, help="broadcasts per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per target and mode")
    harness.add_target_arguments(parser, DEFAULT_TARGETS)
    return parser.parse_args(argv)


async def open_stalled(host: str, port: int) -> socket.socket:
    """A client that completes the handshake and then never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Set before connect so the advertised window stays small.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RECEIVE_BUFFER)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {WS_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
        if not chunk:
            raise ConnectionError("stalled client: closed during handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"stalled client: {head[:100]!r}")
    return sock


async def stalled_outcome(sock: socket.socket) -> dict[str, Any]:
    """Read what the server left for the stalled client: was it closed, with which code?"""
    loop = asyncio.get_running_loop()
    data = b""
    outcome = "still open"
    try:
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 2)
            if not chunk:
                outcome = "closed by server"
                break
            data += chunk
    except TimeoutError:
        outcome = "still open"
    except ConnectionResetError:
        outcome = "reset by server"
    finally:
        sock.close()
    code = _close_code(data)
    return {
        "outcome": outcome if code is None else f"closed by server with {code}",
        "close_code": code,
        "bytes_pending": len(data),
    }


def _close_code(data: bytes) -> int | None:
    position = 0
    while len(data) - position >= 2:
        opcode, length = data[position] & 0x0F, data[position + 1] & 0x7F
        start = position + 2
        if length == 126:
            length, start = int.from_bytes(data[start : start + 2], "big"), start + 2
        elif length == 127:
            length, start = int.from_bytes(data[start : start + 8], "big"), start + 8
        if opcode == 0x8 and start + 2 <= len(data):
            return int.from_bytes(data[start : start + 2], "big")
        position = start + length
    return None


async def trial(server: Server, args: argparse.Namespace, stalled: bool) -> dict[str, Any]:
    tally = Tally()
    half = args.readers // 2
    readers = await open_clients(server.host, server.port, WS_PATH, half, tally, samples=half)
    sock = await open_stalled(server.host, server.port) if stalled else None
    readers += await open_clients(
        server.host, server.port, WS_PATH, args.readers - half, tally, samples=args.readers
    )
    count = round(args.rate * args.seconds)
    try:
        await server.wait_connections(args.readers + (1 if stalled else 0))
        await harness.wait_idle(server.pid)
        tally.expect(args.readers * count)
        rss_before, cpu_before = harness.rss_bytes(server.pid), harness.cpu_seconds(server.pid)
        request = asyncio.create_task(
            server.broadcast(count, args.size, 1 / args.rate, timeout=args.seconds + 300)
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.done.wait(), args.seconds + GRACE_SECONDS)
        result = {
            "stalled": stalled,
            "expected": args.readers * count,
            "delivered": tally.broadcasts,
            "delivered_pct": 100 * tally.broadcasts / (args.readers * count),
            "readers_complete": sum(1 for r in readers if r.received == count),
            "p50_ms": 1e3 * harness.percentile(tally.latencies, 0.50),
            "p99_ms": 1e3 * harness.percentile(tally.latencies, 0.99),
            "max_ms": 1e3 * max(tally.latencies, default=float("nan")),
            "server_rss_growth_bytes": harness.rss_bytes(server.pid) - rss_before,
            "server_cpu_s": harness.cpu_seconds(server.pid) - cpu_before,
            "readers_lost": tally.lost_connections,
        }
        if sock is not None:
            result["stalled_client"] = await stalled_outcome(sock)
            sock = None
        # A server blocked on the stalled client finishes once it is gone.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(request, 120)
        return result
    finally:
        if sock is not None:
            sock.close()
        close_clients(readers)
        await server.wait_connections(0, timeout=120)


async def run(args: argparse.Namespace, targets: list[Target], workdir: Path) -> list[Any]:
    servers = {t.name: Server(t, workdir).start() for t in targets}
    trials = []
    try:
        for round_index in range(args.rounds):
            for target in targets:
                # Alternate which mode goes first, so drift does not favour one.
                modes = (False, True) if round_index % 2 == 0 else (True, False)
                for stalled in modes:
                    label = "stalled" if stalled else "baseline"
                    print(f"round {round_index + 1}: {target.name} {label} ...", file=sys.stderr)
                    started = time.monotonic()
                    result = await trial(servers[target.name], args, stalled)
                    result["wall_seconds"] = time.monotonic() - started
                    trials.append({"target": target.name, "round": round_index, **result})
    finally:
        for server in servers.values():
            server.stop()
    return trials


def summary_rows(trials: list[dict[str, Any]], names: list[str]) -> list[list[Any]]:
    rows = []
    for name in names:
        runs = [t for t in trials if t["target"] == name]
        base = [t for t in runs if not t["stalled"]]
        stall = [t for t in runs if t["stalled"]]
        if not base or not stall:
            continue
        base_p99 = harness.median([t["p99_ms"] for t in base])
        stall_p99 = harness.median([t["p99_ms"] for t in stall])
        rows.append(
            [
                name,
                harness.median([t["delivered_pct"] for t in base]),
                harness.median([t["delivered_pct"] for t in stall]),
                base_p99,
                stall_p99,
                stall_p99 / base_p99 if base_p99 else float("nan"),
                harness.median([t["server_rss_growth_bytes"] for t in stall]) / 2**20,
                ", ".join(sorted({t["stalled_client"]["outcome"] for t in stall})),
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.prepare_loadgen()
    with harness.setting(args) as setting:
        targets = harness.select_targets(args.targets, setting)
        trials = asyncio.run(run(args, targets, setting.workdir))
    harness.print_table(
        [
            "target",
            "delivered % (no stall)",
            "delivered % (stall)",
            "p99 ms (no stall)",
            "p99 ms (stall)",
            "p99 x",
            "server RSS growth MiB (stall)",
            "stalled client",
        ],
        summary_rows(trials, [t.name for t in targets]),
    )
    path = harness.write_results(
        "slow_consumer",
        {
            "config": vars(args),
            "engine_commit": setting.engine_commit,
            "targets": {t.name: t.description for t in targets},
            "trials": trials,
        },
    )
    print(f"\nresults: {path.relative_to(harness.REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
