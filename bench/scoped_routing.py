"""Scoped routing: what a change costs when each change has one recipient among N users.

(a) In process, the engine's `Router` alone (no sockets, no database): one endpoint whose
    `orders` binding is scoped `{"owner_id": "$user.id"}`, N connected users (one connection
    each), inserts each owned by one random user, so each change has exactly one recipient.
    Also the unscoped case (the binding has no scope: every connection gets every change).
    Both engines side by side in one run: `--before-ref` (default fd4f9ed, before the recipient
    index) and `--engine-ref` (default HEAD), each in its own child process, rounds
    interleaved. Reported: µs per change, changes/s, and with `--memory` the bytes per
    connection that attaching costs (tracemalloc), and the recipient index's share of it.
(b) End to end: `mdb-realtime serve` (as users start it) on the embedded database, N real
    sockets each with its own user's token, then `--writes` inserts in one `insert_many`,
    spread evenly over the connected users. Reported: time from the call until the last
    delivery, until a plain change-stream client in this process, reading the same stream as
    the engine (database-wide, same pipeline and options), saw the last change, and server
    CPU seconds per change. N = 50 and 5,000 in one run.

Settings changed from the defaults: none (the per-address connection limit is off by default,
so 5,000 sockets from 127.0.0.1 need no override).

Run: python -m bench.scoped_routing [--users 100,1000,10000,100000] [--sockets 50,5000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import harness

MANIFESTS = harness.REPO / "bench" / "manifests_scoped"
SLUG, PATH = "orders", "/ws"
CHANGE_MARKS = (b'{"type":"change"',)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scoped_routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--users", default="100,1000,10000,100000", help="(a) users connected")
    parser.add_argument("--changes", type=int, default=5000, help="(a) scoped changes per trial")
    parser.add_argument(
        "--deliveries", type=int, default=1_000_000, help="(a) unscoped: deliveries per trial"
    )
    parser.add_argument("--rounds", type=int, default=3, help="(a) interleaved rounds")
    parser.add_argument("--memory", action="store_true", help="(a) also measure memory")
    parser.add_argument("--sockets", default="50,5000", help="(b) sockets connected")
    parser.add_argument("--writes", type=int, default=2000, help="(b) documents inserted")
    parser.add_argument("--skip", choices=("a", "b"), help="leave out one part")
    parser.add_argument("--before-ref", default="fd4f9ed", help="(a) engine to compare with")
    parser.add_argument("--engine-ref", default="HEAD", help="engine to measure (or worktree)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # JSON arguments of one trial
    return parser.parse_args(argv)


# -- (a) in process -----------------------------------------------------------------------------


def child_trial(spec: dict[str, Any]) -> dict[str, Any]:
    """One trial, in a process whose `engine` is the one measured (its working folder)."""
    import tracemalloc
    from dataclasses import dataclass

    from bson import Timestamp

    from engine.auth import Principal
    from engine.changes import ChangeEvent, cluster_time_iso
    from engine.hub import WebSocketConnection
    from engine.manifest import parse_manifest

    try:
        from engine.delivery.router import Router
    except ImportError:  # engines before the recipient index
        from engine.router import Router  # type: ignore[no-redef]

    @dataclass(eq=False)
    class CountingConnection(WebSocketConnection):
        received: int = 0

        def send(self, frame: str) -> bool:
            self.received += 1
            return True

    users, scoped = spec["users"], spec["scoped"]
    watch: dict[str, Any] = {"scope": {"owner_id": "$user.id"}} if scoped else {}
    manifest = {
        "slug": SLUG,
        "name": "Orders",
        "websockets": {"live": {"path": PATH, "watch": {"orders": watch}}},
    }
    router = Router()
    router.add_app(parse_manifest(manifest), "db")
    if spec["memory"]:
        tracemalloc.start()
    connections = []
    for number in range(users):
        user = f"user-{number}"
        principal = Principal(user_id=user, claims={"sub": user})
        connection = CountingConnection(
            websocket=object(), app_slug=SLUG, user_id=user, endpoint="live", principal=principal
        )
        router.attach(connection)
        connections.append(connection)
    memory: dict[str, float] = {}
    if spec["memory"]:
        snapshot = tracemalloc.take_snapshot()
        tracemalloc.stop()
        total = sum(stat.size for stat in snapshot.statistics("filename"))
        index = sum(
            stat.size
            for stat in snapshot.statistics("filename")
            if stat.traceback[0].filename.endswith(("delivery/index.py", "delivery/members.py"))
        )
        memory = {"attach_bytes_per_connection": total / users, "index_bytes_per_connection": 0}
        memory["index_bytes_per_connection"] = index / users
    changes = spec["changes"]
    rng = random.Random(7)
    events = []
    for number in range(changes):
        owner = f"user-{rng.randrange(users)}"
        document = {"_id": number, "owner_id": owner, "item": f"item-{number}", "qty": number}
        cluster_time = Timestamp(1_700_000_000, number + 1)
        events.append(
            ChangeEvent(
                event_id=f"e{number}",
                resume_token={"_data": f"e{number}"},
                operation="insert",
                database="db",
                collection=f"{SLUG}_orders",
                document_id=number,
                document=document,
                before=None,
                updated_fields=None,
                removed_fields=None,
                cluster_time=cluster_time,
                timestamp=cluster_time_iso(cluster_time),
            )
        )
    started = time.perf_counter()
    for event in events:
        router.route(event)
    elapsed = time.perf_counter() - started
    delivered = sum(c.received for c in connections)
    expected = changes if scoped else changes * users
    if delivered != expected:
        raise RuntimeError(f"delivered {delivered}, expected {expected}")
    return {
        "us_per_change": 1e6 * elapsed / changes,
        "changes_per_second": changes / elapsed,
        "us_per_delivery": 1e6 * elapsed / delivered,
        **memory,
    }


def run_child(engine_dir: Path, spec: dict[str, Any]) -> dict[str, Any]:
    env = {"PYTHONPATH": str(harness.REPO), "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "bench.scoped_routing", "--child", json.dumps(spec)]
    done = subprocess.run(
        command, cwd=engine_dir, env=env, check=True, capture_output=True, text=True
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _changes_per_trial(args: argparse.Namespace, engine: str, scoped: bool, users: int) -> int:
    """Enough changes for a steady figure, few enough that an engine whose cost grows with
    the users connected finishes: unscoped trials and the engine before the index get a budget
    of deliveries (unscoped) or of connections visited (before), at least 5 changes."""
    if not scoped:
        return max(5, args.deliveries // users)
    if engine == "before":
        return max(5, min(args.changes, 10 * args.deliveries // users))
    return args.changes


def in_process(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    engines = {
        "before": harness.engine_snapshot(args.before_ref, workdir),
        "after": harness.engine_snapshot(args.engine_ref, workdir),
    }
    users = [int(n) for n in args.users.split(",")]
    trials: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for round_number in range(args.rounds):
        order = list(engines) if round_number % 2 == 0 else list(reversed(engines))
        for count in users:
            for scoped in (True, False):
                for name in order:
                    changes = _changes_per_trial(args, name, scoped, count)
                    spec = {"users": count, "scoped": scoped, "changes": changes, "memory": False}
                    mode = "scoped" if scoped else "unscoped"
                    trials.setdefault((name, mode, count), []).append(
                        run_child(engines[name][0], spec)
                    )
                    print(f"round {round_number + 1} {name} {mode} {count}", file=sys.stderr)
    memory = {}
    if args.memory:
        for name, (folder, _commit) in engines.items():
            spec = {"users": max(users), "scoped": True, "changes": 1, "memory": True}
            memory[name] = run_child(folder, spec)
    rows = []
    for mode in ("scoped", "unscoped"):
        for count in users:
            before = trials[("before", mode, count)]
            after = trials[("after", mode, count)]
            pairs = zip(after, before, strict=True)
            ratios = [a["us_per_change"] / b["us_per_change"] for a, b in pairs]
            ratio = harness.median(ratios)
            rows.append(
                [
                    mode,
                    count,
                    harness.median([t["us_per_change"] for t in before]),
                    harness.median([t["us_per_change"] for t in after]),
                    harness.median([t["changes_per_second"] for t in after]),
                    harness.median([t["us_per_delivery"] for t in after]),
                    ratio,
                ]
            )
    commits = {name: commit[:10] for name, (_folder, commit) in engines.items()}
    print(
        f"\n(a) in process, medians of {args.rounds} rounds; before {commits['before']}, "
        f"after {commits['after']}"
    )
    harness.print_table(
        [
            "binding",
            "users",
            "before µs/change",
            "after µs/change",
            "after changes/s",
            "after µs/delivery",
            "after / before",
        ],
        rows,
    )
    if memory:
        print(f"\nmemory at {max(users):,} users, bytes per connection (tracemalloc)")
        harness.print_table(
            ["engine", "attach, all", "of which the recipient index"],
            [
                [name, m["attach_bytes_per_connection"], m["index_bytes_per_connection"]]
                for name, m in memory.items()
            ],
        )
    return {"commits": commits, "rows": rows, "memory": memory}


# -- (b) end to end -----------------------------------------------------------------------------


async def end_to_end(args: argparse.Namespace, setting: harness.Setting) -> dict[str, Any]:
    import jwt
    from pymongo import AsyncMongoClient

    from bench.wsclient import Tally, close_clients, open_clients
    from engine.watcher import build_pipeline, stream_options

    rows = []
    results = []
    for count in [int(n) for n in args.sockets.split(",")]:
        target = harness.make_target("engine-cli", setting)
        command = [*target.command]
        command[command.index("--manifests") + 1] = str(MANIFESTS)
        target = harness.Target(
            f"engine-cli-{count}", target.description, tuple(command), target.env, target.cwd
        )
        server = harness.Server(target, setting.workdir).start()
        client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(setting.database_uri)
        try:
            secret = target.env["MDB_REALTIME_JWT_SECRET"]
            users = [f"user-{n}" for n in range(count)]
            exp = int(time.time()) + 3600
            paths = [
                f"/{SLUG}{PATH}?token=" + jwt.encode({"sub": u, "exp": exp}, secret, "HS256")
                for u in users
            ]
            tally = Tally()
            sockets = await open_clients(
                server.host, server.port, paths[0], count, tally, paths=paths, marks=CHANGE_MARKS
            )
            await asyncio.wait_for(asyncio.gather(*(s.first_text for s in sockets)), 120)
            collection = client[target.env["MDB_REALTIME_DB"]][f"{SLUG}_orders"]
            documents = [
                {"_id": n, "owner_id": users[n % count], "item": f"item-{n}", "qty": n}
                for n in range(args.writes)
            ]
            raw_last: asyncio.Future[float] = asyncio.get_running_loop().create_future()
            # The same stream the engine reads: database-wide, its pipeline and options.
            stream = await collection.database.watch(
                build_pipeline({collection.name: frozenset({"insert"})}),
                **stream_options(None, start_after=False),
            )
            tailing = asyncio.create_task(_tail(stream, args.writes, raw_last))
            await asyncio.sleep(0.5)
            await harness.wait_idle(server.pid)
            tally.expect(args.writes)
            cpu_before = harness.cpu_seconds(server.pid)
            started = time.time()
            await collection.insert_many(documents, ordered=True)
            await asyncio.wait_for(tally.done.wait(), 300)
            last_delivery = tally.last_received
            raw_at = await asyncio.wait_for(raw_last, 60)
            await harness.wait_idle(server.pid)
            cpu = harness.cpu_seconds(server.pid) - cpu_before
            tailing.cancel()
            await stream.close()
            close_clients(sockets)
            row = {
                "sockets": count,
                "last_delivery_ms": 1000 * (last_delivery - started),
                "raw_stream_last_ms": 1000 * (raw_at - started),
                "server_cpu_ms_per_change": 1000 * cpu / args.writes,
                "delivered": tally.broadcasts,
            }
            results.append(row)
            rows.append(list(row.values()))
        finally:
            await client.close()
            server.stop()
    print(f"\n(b) end to end: serve, {args.writes:,} inserts (one insert_many), one owner each")
    harness.print_table(
        ["sockets", "last delivery ms", "raw stream last ms", "server CPU ms/change", "delivered"],
        rows,
    )
    if len(results) >= 2:
        ratio = results[-1]["server_cpu_ms_per_change"] / results[0]["server_cpu_ms_per_change"]
        print(
            f"CPU per change at {results[-1]['sockets']:,} / at {results[0]['sockets']:,}: "
            f"{ratio:.2f}"
        )
    return {"rows": results}


async def _tail(stream: Any, expected: int, last: asyncio.Future[float]) -> None:
    """A plain change-stream client: when it saw the `expected`-th change."""
    seen = 0
    async for _change in stream:
        seen += 1
        if seen == expected:
            last.set_result(time.time())
            return


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_trial(json.loads(args.child))))
        return 0
    harness.raise_fd_limit()
    payload: dict[str, Any] = {"args": vars(args)}
    args.targets = "engine-cli"
    args.mdb_engine_python = ""
    with harness.setting(args) as setting:
        if args.skip != "a":
            payload["in_process"] = in_process(args, setting.workdir)
        if args.skip != "b":
            harness.prepare_loadgen()
            payload["end_to_end"] = asyncio.run(end_to_end(args, setting))
    print(f"\nresults: {harness.write_results('scoped_routing', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
