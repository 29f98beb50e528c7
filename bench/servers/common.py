"""What every benchmark server shares: the broadcast message, the pacing loop, the start-up line.

The servers run in other interpreters too (mdb-engine lives in its own virtualenv), so this
module imports only the standard library and, lazily, uvicorn and uvloop.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

SLUG = "bench"
WS_PATH = "/bench/ws"
# Outside every app's URL space (`/<slug>/...`), where the engine has routes of its own.
BROADCAST_PATH = "/_bench/broadcast"
COUNT_PATH = "/_bench/count"
MESSAGE_TYPE = "bcast"

# What the engine and mdb-engine add to every broadcast; the servers without an engine add the
# same two fields themselves, so every target puts the same number of bytes on the wire.
_SAMPLE_STAMP = {"app_slug": SLUG, "timestamp": "2025-01-01T00:00:00.000000Z"}

Broadcast = Callable[[dict[str, Any]], Awaitable[int]]


@dataclass(frozen=True)
class BroadcastRequest:
    """`count` broadcasts of about `size` bytes; `interval` seconds apart, or 0 for flat out."""

    count: int
    size: int
    interval: float

    @classmethod
    def from_query(cls, query: str) -> BroadcastRequest:
        values = {key: items[-1] for key, items in parse_qs(query).items()}
        return cls(
            count=int(values.get("count", "1")),
            size=int(values.get("size", "100")),
            interval=float(values.get("interval", "0")),
        )


def padding_for(size: int) -> str:
    """Padding that makes a stamped message about `size` bytes of JSON."""
    sample = {"type": MESSAGE_TYPE, "t": time.time(), "seq": 0, "pad": "", **_SAMPLE_STAMP}
    return "x" * max(0, size - len(json.dumps(sample, separators=(",", ":"))))


def stamp(message: dict[str, Any]) -> dict[str, Any]:
    """The fields an engine adds, for servers that have no engine to add them."""
    return {**message, "app_slug": SLUG, "timestamp": _utc_now_iso()}


def _utc_now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


async def run_broadcasts(request: BroadcastRequest, broadcast: Broadcast) -> dict[str, Any]:
    """Send the requested broadcasts; each carries `t`, the wall-clock time it was due.

    Paced sends are stamped with their scheduled time, not the time they went out, so a server
    that falls behind shows it as latency instead of hiding it (no coordinated omission).
    Flat-out sends yield to the event loop between broadcasts, as app code serving requests would.
    """
    pad = padding_for(request.size)
    started = time.time()
    reached = 0
    for seq in range(request.count):
        due = started + seq * request.interval
        if request.interval:
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            due = time.time()
        reached += await broadcast({"type": MESSAGE_TYPE, "t": due, "seq": seq, "pad": pad})
        if not request.interval:
            await asyncio.sleep(0)
    return {"reached": reached, "seconds": time.time() - started}


def announce(host: str, port: int) -> None:
    """The start-up line the harness waits for (the same shape `mdb-realtime serve` prints)."""
    print(f"bench server serving on http://{host}:{port}", flush=True)


def run(main: Coroutine[Any, Any, Any], loop: str) -> None:
    """Run `main` on uvloop or on the standard library's event loop.

    BENCH_GC=off in the environment turns the cyclic garbage collector off, to tell its pauses
    apart from the server's own work (a diagnostic: no server should run that way).
    """
    if os.environ.get("BENCH_GC") == "off":
        gc.disable()
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def serve_uvicorn(app: Any, host: str, port: int) -> None:
    """Serve an ASGI app with uvicorn's defaults (the WebSocket implementation included)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            await task
            return
        await asyncio.sleep(0.05)
    announce(host, server.servers[0].sockets[0].getsockname()[1])
    await task
