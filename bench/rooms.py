"""Rooms and presence: a join storm on two processes, room publishes against broadcast_to_app.

Two engine processes (bench/servers/rooms_app.py, both pinned to the server core) serve one
database. Three measurements:

- join storm: --members clients (half on each process) join one presence room at once.
  Reported: how long until every `joined` came back and until presence went quiet, presence
  frames and events each member received (without batching a member would get one frame per
  other member), server CPU of both processes for the storm, and RSS growth per membership.
  --samples clients keep the full member list, which must end with every member in it.
- publish throughput: --room-members clients on one process join a room without presence;
  app code then sends M messages flat out with `broadcast_to_room`, and, in the same round,
  M with `broadcast_to_app` to the same sockets (the only ones connected then). Deliveries
  per second from the request to the last frame; ratio room / app per round, median over
  rounds. A room message goes through MongoDB (the bus, then the change stream) even on the
  process that sends it; broadcast_to_app delivers locally at once and only publishes to the
  bus for the other processes.

Settings changed from the defaults: none in the engine, except MDB_REALTIME_MAX_CONNECTIONS_
PER_IP=0 (every client comes from 127.0.0.1). The load generator, and the embedded database
when MONGODB_URI is not set, share the second core. The machine is shared: read ratios.

Run: python -m bench.rooms [--members 5000] [--room-members 1000] [--messages 500] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import harness
from bench.harness import Server, Target
from bench.servers.common import WS_PATH
from bench.wsclient import _OP_TEXT, Tally, WsClient, close_clients
from engine.auth import issue_token

MANIFESTS = harness.REPO / "bench" / "manifests_rooms"
SECRET = "bench-secret-that-is-long-enough-for-hs256"
QUIET_SECONDS = 2.0  # no presence frame for this long: the storm is over


def _text_frame(payload: bytes) -> bytes:
    """A masked client text frame of any length (zero mask key: payload unchanged)."""
    size = len(payload)
    if size < 126:
        head = bytes((0x80 | _OP_TEXT, 0x80 | size))
    elif size < 65536:
        head = bytes((0x80 | _OP_TEXT, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x80 | _OP_TEXT, 0x80 | 127)) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


@dataclass
class RoomTally:
    """What the room clients received, added up."""

    joined: int = 0
    presence_frames: int = 0
    presence_events: int = 0
    room_messages: int = 0
    last_presence: float = 0.0
    last_message: float = 0.0
    target_messages: int = 0
    all_joined: asyncio.Event = field(default_factory=asyncio.Event)
    expected_joined: int = 0
    messages_done: asyncio.Event = field(default_factory=asyncio.Event)


class RoomClient(WsClient):
    """A WsClient that also counts room frames; `sampled` ones keep the member list."""

    def __init__(
        self, host: str, port: int, path: str, tally: Tally, rooms: RoomTally, sampled: bool
    ) -> None:
        super().__init__(host, port, path, tally, False)
        self.rooms = rooms
        self.keeps_members = sampled
        self.members: set[str] = set()
        self.connection_id = ""

    def join(self, room: str) -> None:
        assert self.transport is not None
        message = {"type": "join", "id": 1, "room": room}
        self.transport.write(_text_frame(json.dumps(message).encode()))

    def _control(self, opcode: int, payload: bytes) -> None:
        if opcode != _OP_TEXT:
            super()._control(opcode, payload)
            return
        rooms = self.rooms
        if payload.startswith(b'{"type":"room_message"'):
            rooms.room_messages += 1
            rooms.last_message = time.time()
            if rooms.target_messages and rooms.room_messages >= rooms.target_messages:
                rooms.messages_done.set()
        elif payload.startswith(b'{"type":"presence"'):
            rooms.presence_frames += 1
            rooms.presence_events += max(1, payload.count(b'"event":'))
            rooms.last_presence = time.time()
            if self.keeps_members:
                self._apply_presence(json.loads(payload))
        elif payload.startswith(b'{"type":"joined"'):
            rooms.joined += 1
            if self.keeps_members:
                joined = json.loads(payload)
                self.members = {m["connection_id"] for m in joined.get("members", [])}
            if rooms.joined >= rooms.expected_joined:
                rooms.all_joined.set()
        else:
            if payload.startswith(b'{"type":"connected"'):
                self.connection_id = json.loads(payload)["connection_id"]
            super()._control(opcode, payload)

    def _apply_presence(self, message: dict[str, Any]) -> None:
        for item in message.get("events", [message]):
            if item["event"] == "join":
                self.members.add(item["member"]["connection_id"])
            else:
                self.members.discard(item["member"]["connection_id"])


async def open_room_clients(
    server: Server, count: int, tally: Tally, rooms: RoomTally, samples: int, first_user: int
) -> list[RoomClient]:
    loop = asyncio.get_running_loop()
    clients: list[RoomClient] = []
    gate = asyncio.Semaphore(64)
    step = max(1, count // samples) if samples else 0

    async def one(index: int) -> None:
        token = issue_token(SECRET, app_slug="bench", user_id=f"u{first_user + index}")
        path = f"{WS_PATH}?token={token}"
        sampled = bool(step) and index % step == 0 and index // step < samples
        async with gate:
            _, client = await loop.create_connection(
                lambda: RoomClient(server.host, server.port, path, tally, rooms, sampled),
                server.host,
                server.port,
            )
            await asyncio.wait_for(client.opened, 30)
            await asyncio.wait_for(client.first_text, 30)  # `connected`
            clients.append(client)

    await asyncio.gather(*(one(i) for i in range(count)))
    return clients


def rooms_target(env: dict[str, str]) -> Target:
    python = sys.executable
    return Target(
        "engine-rooms",
        "rooms_app on the engine (uvicorn websockets-sansio, uvloop)",
        (python, "-m", "bench.servers.rooms_app", "--manifests", str(MANIFESTS)),
        env,
    )


async def join_storm(servers: list[Server], members: int, samples: int) -> dict[str, Any]:
    tally, rooms = Tally(), RoomTally(expected_joined=members)
    half = members // len(servers)
    clients: list[RoomClient] = []
    for index, server in enumerate(servers):
        clients += await open_room_clients(
            server, half, tally, rooms, samples // len(servers), index * half
        )
    for server in servers:
        await harness.wait_idle(server.pid)
    # Memory of plain memberships first: the same members join a room without presence.
    rss_connected = sum(harness.rss_bytes(s.pid) for s in servers)
    for client in clients:
        client.join("plain:0")
    await asyncio.wait_for(rooms.all_joined.wait(), 300)
    rooms.joined, rooms.presence_frames, rooms.presence_events = 0, 0, 0
    rooms.all_joined.clear()
    for server in servers:
        await harness.wait_idle(server.pid)
    rss_before = [harness.rss_bytes(s.pid) for s in servers]
    plain_bytes = (sum(rss_before) - rss_connected) / len(clients)
    cpu_before = sum(harness.cpu_seconds(s.pid) for s in servers)
    core_before, loadgen_before = (
        harness.core_busy_seconds(harness.SERVER_CORE),
        harness.own_cpu_seconds(),
    )
    started = time.time()
    for client in clients:  # every member asks at once
        client.join("storm")
    await asyncio.wait_for(rooms.all_joined.wait(), 300)
    all_joined = time.time() - started
    sampled = [c for c in clients if c.keeps_members]
    everyone = {c.connection_id for c in clients}
    deadline = time.time() + 300
    while time.time() < deadline:
        quiet = time.time() - max(rooms.last_presence, started)
        if quiet >= QUIET_SECONDS and all(c.members == everyone for c in sampled):
            break
        await asyncio.sleep(0.2)
    settled = max(rooms.last_presence, started) - started
    cpu = sum(harness.cpu_seconds(s.pid) for s in servers) - cpu_before
    others = harness.core_busy_seconds(harness.SERVER_CORE) - core_before - cpu
    elapsed = time.time() - started
    rss_after = [harness.rss_bytes(s.pid) for s in servers]
    complete = sum(1 for c in sampled if c.members == everyone)
    result = {
        "members": len(clients),
        "seconds_until_all_joined": all_joined,
        "seconds_until_presence_settled": settled,
        "frames_per_member": (rooms.presence_frames + rooms.joined) / len(clients),
        "presence_events_per_member": rooms.presence_events / len(clients),
        "server_cpu_seconds": cpu,
        "server_cpu_ms_per_join": 1000 * cpu / len(clients),
        # Includes what was still buffered for sockets then: the storm moves N^2 member entries.
        "rss_growth_bytes_per_member": (sum(rss_after) - sum(rss_before)) / len(clients),
        "rss_bytes_per_plain_membership": plain_bytes,
        "loadgen_cpu_seconds": harness.own_cpu_seconds() - loadgen_before,
        "others_on_server_core_pct": 100 * max(0.0, others) / elapsed,
        "sampled_with_full_list": f"{complete}/{len(sampled)}",
    }
    close_clients(clients)
    for server in servers:  # every member leaves: let the processes and the database settle
        await harness.wait_idle(server.pid, quiet_seconds=1.0, timeout=120)
    return result


async def publish_round(server: Server, room_members: int, messages: int, size: int) -> dict:
    tally, rooms = Tally(), RoomTally(expected_joined=room_members)
    clients = await open_room_clients(server, room_members, tally, rooms, 0, 100_000)
    await server.wait_connections(room_members)
    await harness.wait_idle(server.pid)
    for client in clients:
        client.join("plain:1")
    await asyncio.wait_for(rooms.all_joined.wait(), 120)
    await harness.wait_idle(server.pid)
    result: dict[str, Any] = {}
    for kind in ("room", "app"):
        await harness.wait_idle(server.pid)
        cpu_before = harness.cpu_seconds(server.pid)
        started = time.time()
        if kind == "room":
            rooms.room_messages, rooms.target_messages = 0, messages * room_members
            rooms.messages_done.clear()
            path = f"/_bench/room_broadcast?room=plain:1&count={messages}&size={size}"
            await server.request(path, "POST")
            await asyncio.wait_for(rooms.messages_done.wait(), 300)
            last = rooms.last_message
        else:
            tally.expect(messages * room_members)
            await server.broadcast(messages, size, 0, 300)
            await asyncio.wait_for(tally.done.wait(), 300)
            last = tally.last_received
        seconds = last - started
        result[kind] = {
            "deliveries_per_second": messages * room_members / seconds,
            "server_cpu_us_per_delivery": 1e6
            * (harness.cpu_seconds(server.pid) - cpu_before)
            / (messages * room_members),
        }
    result["ratio_room_over_app"] = (
        result["room"]["deliveries_per_second"] / result["app"]["deliveries_per_second"]
    )
    close_clients(clients)
    await asyncio.sleep(1.0)
    return result


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with harness.workspace() as workdir, harness.database(workdir, True) as uri:
        env = harness._engine_env(uri, workdir)
        database = env["MDB_REALTIME_DB"]
        servers = []
        for _ in range(2):
            own = {**harness._engine_env(uri, workdir), "MDB_REALTIME_DB": database}
            servers.append(Server(rooms_target(own), workdir).start())
        try:
            storm = await join_storm(servers, args.members, args.samples)
            harness.print_table(
                [
                    "members",
                    "all joined s",
                    "settled s",
                    "frames/member",
                    "events/member",
                    "server CPU s",
                    "CPU ms/join",
                    "RSS B/plain membership",
                    "RSS growth B/member",
                    "loadgen CPU s",
                    "others on server core %",
                    "full lists",
                ],
                [
                    [
                        storm["members"],
                        storm["seconds_until_all_joined"],
                        storm["seconds_until_presence_settled"],
                        storm["frames_per_member"],
                        storm["presence_events_per_member"],
                        storm["server_cpu_seconds"],
                        storm["server_cpu_ms_per_join"],
                        storm["rss_bytes_per_plain_membership"],
                        storm["rss_growth_bytes_per_member"],
                        storm["loadgen_cpu_seconds"],
                        storm["others_on_server_core_pct"],
                        storm["sampled_with_full_list"],
                    ]
                ],
            )
            rounds = []
            for _ in range(args.rounds):
                rounds.append(
                    await publish_round(servers[0], args.room_members, args.messages, args.size)
                )
            harness.print_table(
                [
                    "round",
                    "room msg/s delivered",
                    "app msg/s delivered",
                    "room/app",
                    "room CPU us/delivery",
                    "app CPU us/delivery",
                ],
                [
                    [
                        n + 1,
                        r["room"]["deliveries_per_second"],
                        r["app"]["deliveries_per_second"],
                        r["ratio_room_over_app"],
                        r["room"]["server_cpu_us_per_delivery"],
                        r["app"]["server_cpu_us_per_delivery"],
                    ]
                    for n, r in enumerate(rounds)
                ],
            )
            ratio = harness.median([r["ratio_room_over_app"] for r in rounds])
            print(f"median room/app ratio: {ratio:.2f} (target >= 0.8)")
            return {"join_storm": storm, "publish_rounds": rounds, "median_ratio": ratio}
        finally:
            for server in servers:
                server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rooms",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--members", type=int, default=5000, help="join storm size (5000)")
    parser.add_argument("--samples", type=int, default=20, help="members keeping full lists")
    parser.add_argument("--room-members", type=int, default=1000, help="publish room (1000)")
    parser.add_argument("--messages", type=int, default=500, help="messages per trial (500)")
    parser.add_argument("--size", type=int, default=100, help="message bytes (100)")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    harness.prepare_loadgen()
    results = asyncio.run(run(args))
    path = harness.write_results("rooms", {"settings": vars(args), **results})
    print(f"results: {Path(path).relative_to(harness.REPO)}")


if __name__ == "__main__":
    main()
