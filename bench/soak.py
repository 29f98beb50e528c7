"""Soak: many connections held for minutes under a steady stream of writes; nothing lost or dropped.

`mdb-realtime serve` (`python -m engine.cli serve`, exactly as users start it) serves one app
whose endpoint watches one collection that every client sees (`soak_ticks`). The benchmark
opens --connections clients (each with its own user token, so no per-user bound applies),
holds them for --minutes while a writer inserts --writes-per-second documents into the watched
collection, and checks, per client, that every insert arrived exactly once and in order. The
endpoint's ping_interval is --ping-interval seconds (the engine's minimum is 5), so the engine's
keepalive runs all along: each client is silent except for answering the engine's JSON `ping`
with `{"type": "pong"}` (and protocol pings with pongs).

Measured: server RSS over time (before connections, after them, at the middle and the end of
the hold), server and database CPU %, events expected vs received per client (missing,
duplicated, out of order), connections dropped and their close codes, pings per client, and the
delivery latency of sampled clients (insert to receipt). Every --sample-every seconds a row of
the time series is printed; the summary is a Markdown table; everything goes to
bench/results/soak-<time>.json.

The clients are a lean asyncio Protocol (raw HTTP upgrade, a minimal frame parser), not the
`websockets` library, which costs more CPU per message than the server at this scale. The
open-file limit is raised to the hard limit; the server runs with
MDB_REALTIME_MAX_CONNECTIONS_PER_IP=0 (every client comes from 127.0.0.1) and
MDB_REALTIME_MAX_CONNECTIONS_PER_USER=0. With no MONGODB_URI the database is SecantusDB in
memory (engine.embedded.EmbeddedDatabase(":memory:")), with TMPDIR set to the benchmark's own
scratch folder. With --pin the server runs on core 0 and the benchmark on core 1; by default
the OS places them (on a shared machine a pinned server competes with whatever else runs on
its core). Other processes' CPU is reported beside the figures: on a busy machine it explains
a server that falls behind.

Run: python -m bench.soak [--connections 10000] [--minutes 10] [--writes-per-second 20]
     python -m bench.soak --connections 1000 --minutes 1          # a quick one
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import json
import os
import signal
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from bench import harness
from bench.harness import Server, Target

SLUG = "soak"
COLLECTION = "ticks"
SECRET = "soak-secret-that-is-long-enough-for-hs256-keys"
SETTLE_SECONDS = 2.0
DRAIN_SECONDS = 60.0

_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA
_CHANGE = b'{"type":"change"'
_SEQ = b'"seq":'
_TIME = b'"t":'
_PING_MARK = b'"type":"ping"'
_CONNECTED = b'{"type":"connected"'
_PONG_FRAME = bytes((0x80 | _OP_TEXT, 0x80 | 15)) + b"\0\0\0\0" + b'{"type":"pong"}'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--connections", type=int, default=10_000, help="(default: %(default)s)")
    parser.add_argument("--minutes", type=float, default=10.0, help="hold (default: %(default)s)")
    parser.add_argument(
        "--writes-per-second",
        type=float,
        default=20.0,
        help="inserts into the watched collection that every client sees (default: %(default)s)",
    )
    parser.add_argument(
        "--ping-interval",
        type=int,
        default=10,
        help="the endpoint's ping_interval, 5..300 s (default: %(default)s)",
    )
    parser.add_argument("--pad", type=int, default=64, help="bytes of padding per document")
    parser.add_argument("--concurrency", type=int, default=100, help="handshakes at a time")
    parser.add_argument("--samples", type=int, default=100, help="clients recording latency")
    parser.add_argument(
        "--sample-every", type=float, default=10.0, help="seconds between time-series rows"
    )
    parser.add_argument(
        "--engine-ref",
        default="HEAD",
        help="git commit of the engine to run, or `worktree` (default: %(default)s)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the server to core 0 and the benchmark to core 1 (default: let the OS place "
        "them; on a shared machine a pinned server competes with whatever runs on its core)",
    )
    args = parser.parse_args(argv)
    if not 5 <= args.ping_interval <= 300:
        parser.error("--ping-interval must be between 5 and 300 (the manifest's bounds)")
    return args


# -- the clients ----------------------------------------------------------------------------------


@dataclass
class Totals:
    """What all clients saw, added up as it happens (cheap to read while running)."""

    changes: int = 0
    pings: int = 0
    lost: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)


class SoakClient(asyncio.Protocol):
    """One connection: counts changes by sequence number, answers pings, records closes."""

    def __init__(
        self, host: str, port: int, path: str, totals: Totals, sampled: bool, user: str
    ) -> None:
        loop = asyncio.get_running_loop()
        self.totals = totals
        self.sampled = sampled
        self.user = user
        self.opened: asyncio.Future[None] = loop.create_future()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.received = 0
        self.next_seq = 0
        self.missing = 0
        self.duplicates = 0
        self.pings = 0
        self.other_text = 0
        self.close_code: int | None = None
        self.lost = False
        self.closing = False
        self._buffer = b""
        self._handshaking = True
        key = base64.b64encode(os.urandom(16)).decode()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"closed during handshake: {exc!r}"))
        if not self.connected.done():
            self.connected.set_exception(ConnectionError("closed before `connected`"))
        if not self.closing:
            self.lost = True
            self.totals.lost += 1

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        if self._handshaking:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self._buffer = buffer
                return
            head = buffer[:end]
            buffer = buffer[end + 4 :]
            self._handshaking = False
            if not head.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(ConnectionError(head.split(b"\r\n", 1)[0].decode()))
                self.close()
                return
            self.opened.set_result(None)
        self._buffer = self._frames(buffer)

    def _frames(self, buffer: bytes) -> bytes:
        position, size = 0, len(buffer)
        while size - position >= 2:
            length = buffer[position + 1] & 0x7F
            start = position + 2
            if length == 126:
                if size - start < 2:
                    break
                length = int.from_bytes(buffer[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - start < 8:
                    break
                length = int.from_bytes(buffer[start : start + 8], "big")
                start += 8
            end = start + length
            if end > size:
                break
            opcode = buffer[position] & 0x0F
            if opcode == _OP_TEXT:
                self._text(buffer, start, end)
            else:
                self._control(opcode, buffer[start:end])
            position = end
        return buffer[position:]

    def _text(self, buffer: bytes, start: int, end: int) -> None:
        if buffer.startswith(_CHANGE, start):
            at = buffer.find(_SEQ, start, end) + len(_SEQ)
            stop = at
            while stop < end and 48 <= buffer[stop] <= 57:
                stop += 1
            seq = int(buffer[at:stop])
            if seq == self.next_seq:
                self.next_seq += 1
            elif seq > self.next_seq:
                self.missing += seq - self.next_seq
                self.next_seq = seq + 1
            else:
                self.duplicates += 1
            self.received += 1
            self.totals.changes += 1
            if self.sampled:
                at = buffer.find(_TIME, start, end) + len(_TIME)
                stop = buffer.find(b",", at, end)
                self.totals.latencies.append(time.time() - float(buffer[at:stop]))
            return
        assert self.transport is not None
        if buffer.find(_PING_MARK, start, end) >= 0:
            self.pings += 1
            self.totals.pings += 1
            self.transport.write(_PONG_FRAME)
            return
        if buffer.startswith(_CONNECTED, start) and not self.connected.done():
            self.connected.set_result(None)
            return
        self.other_text += 1

    def _control(self, opcode: int, payload: bytes) -> None:
        assert self.transport is not None
        if opcode == _OP_PING:
            self.transport.write(_masked(_OP_PONG, payload))
        elif opcode == _OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            self.totals.close_codes[code] = self.totals.close_codes.get(code, 0) + 1
            self.transport.write(_masked(_OP_CLOSE, payload[:2]))
            self.transport.close()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_masked(_OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


def _masked(opcode: int, payload: bytes) -> bytes:
    # An all-zero mask keeps the payload as is and is still valid client framing.
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def _token(user: str, ttl: int) -> str:
    from engine.auth import issue_token

    return issue_token(SECRET, app_slug=SLUG, user_id=user, ttl_seconds=ttl)


async def open_clients(
    host: str, port: int, count: int, totals: Totals, samples: int, concurrency: int, ttl: int
) -> tuple[list[SoakClient], int]:
    """Open `count` connections, each its own user; (clients, failed handshakes)."""
    loop = asyncio.get_running_loop()
    step = max(1, count // samples) if samples else 0
    clients: list[SoakClient] = []
    failures = 0
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        nonlocal failures
        user = f"user{index}"
        path = f"/{SLUG}/ws?token={_token(user, ttl)}"
        sampled = bool(step) and index % step == 0 and index // step < samples
        async with gate:
            try:
                _, client = await loop.create_connection(
                    lambda: SoakClient(host, port, path, totals, sampled, user), host, port
                )
                await asyncio.wait_for(client.opened, 60)
                await asyncio.wait_for(client.connected, 60)
            except (OSError, TimeoutError) as error:
                failures += 1
                if failures <= 5:
                    print(f"connection {index} failed: {error!r}", file=sys.stderr)
                return
            clients.append(client)

    await asyncio.gather(*(one(i) for i in range(count)))
    return clients, failures


# -- the writer -----------------------------------------------------------------------------------


@dataclass
class Writer:
    """Inserts `rate` documents per second on a fixed schedule; `seq` is the next to write."""

    collection: Any
    rate: float
    pad: str
    seq: int = 0
    behind_max: float = 0.0
    errors: int = 0

    async def run(self, seconds: float) -> None:
        if self.rate <= 0:
            await asyncio.sleep(seconds)
            return
        started = time.monotonic()
        total = int(seconds * self.rate)
        for seq in range(total):
            due = started + seq / self.rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                self.behind_max = max(self.behind_max, -delay)
            document = {"_id": seq, "seq": seq, "t": time.time(), "pad": self.pad}
            try:
                await self.collection.insert_one(document)
            except Exception as error:  # counted: a failed insert is expected by nobody
                self.errors += 1
                print(f"insert {seq} failed: {error!r}", file=sys.stderr)
                continue
            self.seq = seq + 1


# -- the server -----------------------------------------------------------------------------------


def write_manifest(folder: Path, ping_interval: int) -> Path:
    manifests = folder / "soak-manifests"
    (manifests / SLUG).mkdir(parents=True, exist_ok=True)
    manifest = {
        "slug": SLUG,
        "name": "Soak",
        "websockets": {
            "live": {
                "path": "/ws",
                "description": "every client sees every insert into ticks",
                "ping_interval": ping_interval,
                "watch": {COLLECTION: {"operations": ["insert"]}},
            }
        },
    }
    (manifests / SLUG / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifests


class SoakServer(Server):
    """`harness.Server`, but pinned to core 0 only when asked: on a shared two-core machine an
    unpinned server is starved less by other people's work."""

    def __init__(self, target: Target, workdir: Path, pin: bool) -> None:
        super().__init__(target, workdir)
        self.pin = pin

    def preexec(self) -> None:
        if self.pin:
            os.sched_setaffinity(0, {harness.SERVER_CORE})
        harness.raise_fd_limit()
        os.setpgrp()
        with contextlib.suppress(OSError, AttributeError):  # dies with the benchmark
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def prepare(pin: bool) -> None:
    """Many sockets, uvloop, a clean stop on SIGTERM; core 1 only when pinning."""
    if pin:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, {harness.LOADGEN_CORE})
    harness.raise_fd_limit()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def machine_busy_seconds() -> float:
    """CPU time all cores spent running anything, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu "):
            ticks = [int(value) for value in line.split()[1:]]
            return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def engine_target(setting_dir: Path, engine_dir: Path, uri: str, manifests: Path) -> Target:
    db = f"soak_{uuid.uuid4().hex[:8]}"
    data_dir = setting_dir / "engine-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "MONGODB_URI": uri,
        "MDB_REALTIME_DB": db,
        "MDB_REALTIME_DATA_DIR": str(data_dir),
        "MDB_REALTIME_JWT_SECRET": SECRET,
        "MDB_REALTIME_MAX_CONNECTIONS_PER_IP": "0",
        "MDB_REALTIME_MAX_CONNECTIONS_PER_USER": "0",
    }
    command = harness.serve_command(manifests, uri, db)
    return Target("engine-cli", "mdb-realtime serve", command, env, cwd=engine_dir)


async def metrics_text(server: Server) -> str:
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        writer.write(
            f"GET /metrics HTTP/1.1\r\nHost: {server.host}\r\nConnection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    if b"chunked" in head.lower():
        body = harness._dechunk(body)
    return body.decode(errors="replace")


def metric_values(text: str) -> dict[str, float]:
    """The soak app's engine metrics (summed over labels), by name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("mdb_realtime_") or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            values[name] = values.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return values


# -- sampling -------------------------------------------------------------------------------------


@dataclass
class Sampler:
    server_pid: int
    database_pid: int | None
    clients: list[SoakClient]
    writer: Writer
    started: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    _last: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)

    def reset(self) -> None:
        self._last = (
            time.monotonic(),
            harness.cpu_seconds(self.server_pid),
            self._db_cpu(),
            harness.own_cpu_seconds(),
            machine_busy_seconds(),
        )

    def _db_cpu(self) -> float:
        if self.database_pid is None:
            return 0.0
        try:
            return harness.cpu_seconds(self.database_pid)
        except OSError:
            return 0.0

    def sample(self, phase: str) -> dict[str, Any]:
        now = time.monotonic()
        server_cpu, db_cpu, own_cpu, busy = (
            harness.cpu_seconds(self.server_pid),
            self._db_cpu(),
            harness.own_cpu_seconds(),
            machine_busy_seconds(),
        )
        then, server_before, db_before, own_before, busy_before = self._last
        elapsed = max(now - then, 1e-9)
        self._last = (now, server_cpu, db_cpu, own_cpu, busy)
        ours = (server_cpu - server_before) + (db_cpu - db_before) + (own_cpu - own_before)
        open_clients = sum(1 for c in self.clients if not c.lost and c.close_code is None)
        received = sum(c.received for c in self.clients)
        row = {
            "t_s": round(now - self.started, 1),
            "phase": phase,
            "server_rss_mb": harness.rss_bytes(self.server_pid) / 2**20,
            "server_cpu_pct": 100 * (server_cpu - server_before) / elapsed,
            "db_cpu_pct": 100 * (db_cpu - db_before) / elapsed,
            "loadgen_cpu_pct": 100 * (own_cpu - own_before) / elapsed,
            "others_cpu_pct": 100 * max(0.0, busy - busy_before - ours) / elapsed,
            "open": open_clients,
            "inserted": self.writer.seq,
            "received": received,
            "behind": self.writer.seq * len(self.clients) - received,
        }
        self.rows.append(row)
        return row

    async def every(self, interval: float, phase: str, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                print_row(self.sample(phase))


ROW_HEADERS = (
    "t_s",
    "phase",
    "server_rss_mb",
    "server_cpu_pct",
    "db_cpu_pct",
    "loadgen_cpu_pct",
    "others_cpu_pct",
    "open",
    "inserted",
    "received",
    "behind",
)


def print_row(row: dict[str, Any]) -> None:
    cells = []
    for key in ROW_HEADERS:
        value = row[key]
        if isinstance(value, float):
            cells.append(f"{value:,.1f}")
        elif isinstance(value, int):
            cells.append(f"{value:,}")
        else:
            cells.append(str(value))
    print("  ".join(f"{k}={c}" for k, c in zip(ROW_HEADERS, cells, strict=True)), flush=True)


# -- the run --------------------------------------------------------------------------------------


async def wait_delivered(clients: list[SoakClient], expected: int, timeout: float) -> float:
    """Wait until every open client has `expected` changes; the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if all(c.received >= expected for c in clients if not c.lost and c.close_code is None):
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


async def run(args: argparse.Namespace, workdir: Path, uri: str, db_pid: int | None) -> Any:
    from pymongo import AsyncMongoClient

    engine_dir, commit = harness.engine_snapshot(args.engine_ref, workdir)
    manifests = write_manifest(workdir, args.ping_interval)
    target = engine_target(workdir, engine_dir, uri, manifests)
    hold = args.minutes * 60
    ttl = int(hold) + 3600
    server = SoakServer(target, workdir, args.pin).start()
    mongo: Any = AsyncMongoClient(uri)
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        await harness.wait_idle(server.pid)
        rss_idle = harness.rss_bytes(server.pid)
        collection = mongo[target.env["MDB_REALTIME_DB"]][f"{SLUG}_{COLLECTION}"]
        await collection.insert_one({"_id": "warmup"})  # creates the collection
        await collection.delete_one({"_id": "warmup"})
        totals = Totals()
        opening = time.monotonic()
        clients, failures = await open_clients(
            server.host,
            server.port,
            args.connections,
            totals,
            args.samples,
            args.concurrency,
            ttl,
        )
        open_seconds = time.monotonic() - opening
        print(
            f"{len(clients):,} connections open in {open_seconds:.1f} s "
            f"({failures} failed); holding {args.minutes:g} min "
            f"with {args.writes_per_second:g} inserts/s",
            flush=True,
        )
        writer = Writer(collection, args.writes_per_second, "x" * args.pad)
        sampler = Sampler(server.pid, db_pid, clients, writer, time.monotonic())
        await asyncio.sleep(SETTLE_SECONDS)
        sampler.reset()
        await asyncio.sleep(1.0)
        start_row = sampler.sample("start")
        print_row(start_row)
        stop = asyncio.Event()
        sampling = asyncio.create_task(sampler.every(args.sample_every, "hold", stop))
        hold_cpu = (harness.cpu_seconds(server.pid), time.monotonic())
        db_cpu_before = sampler._db_cpu()
        await writer.run(hold)
        hold_server_cpu = harness.cpu_seconds(server.pid) - hold_cpu[0]
        hold_db_cpu = sampler._db_cpu() - db_cpu_before
        hold_seconds = time.monotonic() - hold_cpu[1]
        stop.set()
        await sampling
        drain_seconds = await wait_delivered(clients, writer.seq, DRAIN_SECONDS)
        end_row = sampler.sample("end")
        print_row(end_row)
        metrics = metric_values(await metrics_text(server))
        result = summarize(
            args,
            clients,
            totals,
            writer,
            sampler.rows,
            rss_idle=rss_idle,
            open_seconds=open_seconds,
            failures=failures,
            drain_seconds=drain_seconds,
            hold_seconds=hold_seconds,
            server_cpu_pct=100 * hold_server_cpu / hold_seconds,
            db_cpu_pct=100 * hold_db_cpu / hold_seconds,
            metrics=metrics,
        )
        result["engine_commit"] = commit
        for client in clients:
            client.close()
        await asyncio.sleep(1.0)
        return result
    finally:
        await mongo.close()
        server.stop()


def summarize(
    args: argparse.Namespace,
    clients: list[SoakClient],
    totals: Totals,
    writer: Writer,
    rows: list[dict[str, Any]],
    **figures: Any,
) -> dict[str, Any]:
    expected = writer.seq
    received = [c.received for c in clients]
    short = [c for c in clients if c.received < expected]
    pings = [c.pings for c in clients]
    hold_rows = [r for r in rows if r["phase"] in ("start", "hold")]
    middle = hold_rows[len(hold_rows) // 2] if hold_rows else rows[0]
    latencies = sorted(totals.latencies)
    summary = {
        "connections_requested": args.connections,
        "connections_open": len(clients),
        "handshake_failures": figures["failures"],
        "open_seconds": figures["open_seconds"],
        "hold_minutes": args.minutes,
        "writes_per_second": args.writes_per_second,
        "ping_interval": args.ping_interval,
        "inserted": expected,
        "insert_errors": writer.errors,
        "writer_behind_max_s": writer.behind_max,
        "events_expected_per_client": expected,
        "events_expected_total": expected * len(clients),
        "events_received_total": sum(received),
        "received_min": min(received, default=0),
        "received_max": max(received, default=0),
        "clients_missing_events": len(short),
        "events_missing_total": sum(expected - c.received for c in short),
        "gaps_in_order": sum(c.missing for c in clients),
        "duplicates": sum(c.duplicates for c in clients),
        "connections_dropped": sum(1 for c in clients if c.lost or c.close_code is not None),
        "close_codes": {str(k): v for k, v in totals.close_codes.items()},
        "pings_min": min(pings, default=0),
        "pings_median": statistics.median(pings) if pings else 0,
        "pings_max": max(pings, default=0),
        "other_messages": sum(c.other_text for c in clients),
        "drain_seconds": figures["drain_seconds"],
        "rss_idle_mb": figures["rss_idle"] / 2**20,
        "rss_start_mb": rows[0]["server_rss_mb"],
        "rss_middle_mb": middle["server_rss_mb"],
        "rss_end_mb": rows[-1]["server_rss_mb"],
        "rss_max_mb": max(r["server_rss_mb"] for r in rows),
        "server_cpu_pct": figures["server_cpu_pct"],
        "db_cpu_pct": figures["db_cpu_pct"],
        "others_cpu_pct": statistics.mean(
            [r["others_cpu_pct"] for r in rows if r["phase"] == "hold"] or [0.0]
        ),
        "latency_p50_ms": 1000 * harness.percentile(latencies, 0.5),
        "latency_p99_ms": 1000 * harness.percentile(latencies, 0.99),
        "latency_max_ms": 1000 * latencies[-1] if latencies else float("nan"),
        "latency_samples": len(latencies),
        "metrics": figures["metrics"],
    }
    return {"summary": summary, "series": rows, "config": vars(args)}


def print_summary(summary: dict[str, Any]) -> None:
    rows = [
        [
            "connections (open / requested)",
            f"{summary['connections_open']:,} / {summary['connections_requested']:,}",
        ],
        ["handshakes failed", summary["handshake_failures"]],
        ["time to open all", f"{summary['open_seconds']:.1f} s"],
        [
            "hold",
            f"{summary['hold_minutes']:g} min, {summary['writes_per_second']:g} inserts/s, "
            f"ping_interval {summary['ping_interval']} s",
        ],
        ["inserts written (errors)", f"{summary['inserted']:,} ({summary['insert_errors']})"],
        [
            "events expected / received",
            f"{summary['events_expected_total']:,} / {summary['events_received_total']:,}",
        ],
        [
            "per client received (min / max)",
            f"{summary['received_min']:,} / "
            f"{summary['received_max']:,} of {summary['events_expected_per_client']:,}",
        ],
        ["clients missing events", summary["clients_missing_events"]],
        ["gaps / duplicates", f"{summary['gaps_in_order']} / {summary['duplicates']}"],
        ["connections dropped", summary["connections_dropped"]],
        ["close codes", json.dumps(summary["close_codes"]) or "{}"],
        [
            "pings per client (min / median / max)",
            f"{summary['pings_min']} / {summary['pings_median']:g} / {summary['pings_max']}",
        ],
        [
            "server RSS idle / start / middle / end / max (MB)",
            " / ".join(
                f"{summary[k]:.0f}"
                for k in (
                    "rss_idle_mb",
                    "rss_start_mb",
                    "rss_middle_mb",
                    "rss_end_mb",
                    "rss_max_mb",
                )
            ),
        ],
        ["server CPU % during the hold", f"{summary['server_cpu_pct']:.1f}"],
        ["database CPU % during the hold", f"{summary['db_cpu_pct']:.1f}"],
        ["other processes' CPU % (machine)", f"{summary['others_cpu_pct']:.1f}"],
        [
            "latency p50 / p99 / max (ms)",
            f"{summary['latency_p50_ms']:.1f} / "
            f"{summary['latency_p99_ms']:.1f} / {summary['latency_max_ms']:.1f}",
        ],
        ["drain after last insert", f"{summary['drain_seconds']:.1f} s"],
        [
            "engine: slow-consumer closes / dropped frames",
            "{:.0f} / {:.0f}".format(
                summary["metrics"].get("mdb_realtime_slow_consumer_closes_total", float("nan")),
                summary["metrics"].get("mdb_realtime_messages_dropped_total", float("nan")),
            ),
        ],
    ]
    harness.print_table(["figure", "value"], rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prepare(args.pin)
    limit = harness.fd_limit()
    if limit < args.connections + 200:
        print(
            f"open-file limit is {limit}; {args.connections} connections need more "
            "(raise the hard limit: ulimit -Hn)",
            file=sys.stderr,
        )
        return 2
    with harness.workspace() as workdir, harness.database(workdir, True) as uri:
        db_pid = _embedded_pid(uri)
        try:
            result = asyncio.run(run(args, workdir, uri, db_pid))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    print()
    print_summary(result["summary"])
    path = harness.write_results("soak", result)
    print(f"\nresults: {path}")
    summary = result["summary"]
    ok = (
        summary["clients_missing_events"] == 0
        and summary["duplicates"] == 0
        and summary["connections_dropped"] == 0
        and summary["handshake_failures"] == 0
    )
    return 0 if ok else 1


def _embedded_pid(uri: str) -> int | None:
    """The pid of the embedded database listening on the URI's port, for its CPU figure."""
    try:
        port = int(uri.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None
    wanted = f":{port:04X}"
    inodes: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1].endswith(wanted) and parts[3] == "0A":  # listening
            inodes.add(parts[9])
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


if __name__ == "__main__":
    raise SystemExit(main())
