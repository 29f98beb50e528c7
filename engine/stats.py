"""Plain counters the engine bumps on its hot paths; `engine.metrics` turns them into Prometheus.

Counting is an attribute increment on an object the counting code already holds (no lookup,
no lock, no Prometheus call per frame). Each engine has its own `EngineStats`, so two engines
in one process never mix figures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from bson import Timestamp

T = TypeVar("T")


class _Event(Protocol):
    @property
    def cluster_time(self) -> Timestamp | None: ...


@dataclass(slots=True)
class EndpointStats:
    """What happened on the connections of one (app, endpoint)."""

    frames_out: int = 0  # frames queued to sockets (changes, broadcasts, replies, pings)
    dropped: int = 0  # outgoing frames discarded because their connection's queue overflowed
    slow_consumer_closes: int = 0
    handler_errors: int = 0
    resumes: int = 0  # connections that asked for `last_event_id` and were served from history
    resyncs: int = 0  # connections told `resync_required`


@dataclass(slots=True)
class WatcherStats:
    """What one database's change stream delivered."""

    events_in: int = 0  # data changes read from the stream
    last_cluster_time: float | None = None  # unix seconds of the last event's cluster time
    lag_seconds: float = 0.0  # at the last event: wall clock minus its cluster time

    def observe(self, cluster_time: Timestamp | None, now: float | None = None) -> None:
        self.events_in += 1
        if cluster_time is not None:
            moment = float(cluster_time.time)
            self.last_cluster_time = moment
            # Cluster time has a resolution of one second; never report a negative lag.
            self.lag_seconds = max(0.0, (time.time() if now is None else now) - moment)


def counting(stats: WatcherStats, sink: Callable[[Any], T]) -> Callable[[_Event], T]:
    """`sink`, counting every event handed to it (a watcher's sink: the changes it read)."""

    def count_then_sink(event: _Event) -> T:
        stats.observe(event.cluster_time)
        return sink(event)

    return count_then_sink


@dataclass
class EngineStats:
    endpoints: dict[tuple[str, str], EndpointStats] = field(default_factory=dict)
    watchers: dict[str, WatcherStats] = field(default_factory=dict)

    def endpoint(self, app_slug: str, name: str) -> EndpointStats:
        key = (app_slug, name)
        stats = self.endpoints.get(key)
        if stats is None:
            stats = self.endpoints[key] = EndpointStats()
        return stats

    def watcher(self, database: str) -> WatcherStats:
        stats = self.watchers.get(database)
        if stats is None:
            stats = self.watchers[database] = WatcherStats()
        return stats
