"""Prometheus metrics of one engine, in a registry of its own (two engines never mix figures).

Everything is read from live state and plain counters (`engine.stats`) at scrape time, so the
hot paths never call into prometheus-client and there is no bookkeeping to drift.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from engine.delivery.window_groups import Windows
from engine.realtime import Realtime
from engine.stats import EndpointStats, EngineStats

ENDPOINT_LABELS = ["app", "endpoint"]

# (metric name without `_total`, help, EndpointStats attribute)
_ENDPOINT_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("mdb_realtime_frames_out", "Frames queued to client sockets", "frames_out"),
    (
        "mdb_realtime_messages_dropped",
        "Outgoing frames discarded because a connection's queue overflowed",
        "dropped",
    ),
    (
        "mdb_realtime_slow_consumer_closes",
        "Connections closed with 1013 because their outgoing queue overflowed",
        "slow_consumer_closes",
    ),
    ("mdb_realtime_handler_errors", "Message handlers that raised", "handler_errors"),
    (
        "mdb_realtime_resumes",
        "Connections served changes from history after `last_event_id`",
        "resumes",
    ),
    ("mdb_realtime_resyncs", "Connections sent `resync_required`", "resyncs"),
)


class _ConnectionsCollector(Collector):
    """Connection counts read from the live state at scrape time."""

    def __init__(self, realtime: Realtime) -> None:
        self._realtime = realtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mdb_realtime_connections",
            "Open WebSocket connections",
            labels=ENDPOINT_LABELS,
        )
        counts = Counter(
            (connection.app_slug, connection.endpoint)
            for connection in self._realtime.connections()
        )
        for (app, endpoint), count in sorted(counts.items()):
            family.add_metric([app, endpoint], count)
        yield family


class _StatsCollector(Collector):
    """The engine's counters: per endpoint (frames, drops, closes, errors) and per watcher."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        endpoints: list[tuple[tuple[str, str], EndpointStats]] = sorted(
            self._stats.endpoints.items()
        )
        for name, documentation, attribute in _ENDPOINT_COUNTERS:
            family = CounterMetricFamily(name, documentation, labels=ENDPOINT_LABELS)
            for (app, endpoint), stats in endpoints:
                family.add_metric([app, endpoint], getattr(stats, attribute))
            yield family
        yield from self._watcher_families()

    def _watcher_families(self) -> Iterator[Metric]:
        watchers = sorted(self._stats.watchers.items())
        events_in = CounterMetricFamily(
            "mdb_realtime_events_in",
            "Data changes read from the change stream",
            labels=["database"],
        )
        lag = GaugeMetricFamily(
            "mdb_realtime_watcher_lag_seconds",
            "When the last change was read: wall clock minus its cluster time (1 s resolution)",
            labels=["database"],
        )
        last = GaugeMetricFamily(
            "mdb_realtime_watcher_last_event_timestamp_seconds",
            "Cluster time of the last change read (unix seconds); "
            "time() minus this is how long the stream has been quiet",
            labels=["database"],
        )
        for database, stats in watchers:
            events_in.add_metric([database], stats.events_in)
            lag.add_metric([database], stats.lag_seconds)
            if stats.last_cluster_time is not None:
                last.add_metric([database], stats.last_cluster_time)
        yield from (events_in, lag, last)


class _WindowsCollector(Collector):
    """The live windows (SPEC 13): how many, and the database queries they made."""

    def __init__(self, windows: Windows) -> None:
        self._windows = windows

    def collect(self) -> Iterator[Metric]:
        stats = self._windows.stats
        kept = GaugeMetricFamily("mdb_realtime_windows", "Live windows kept (shared ones once)")
        kept.add_metric([], self._windows.group_count())
        queries = CounterMetricFamily(
            "mdb_realtime_window_queries",
            "Database queries of live windows: `load` when one starts, `refill` when one ran short",
            labels=["kind"],
        )
        queries.add_metric(["load"], stats.load_queries)
        queries.add_metric(["refill"], stats.refill_queries)
        departures = CounterMetricFamily(
            "mdb_realtime_window_departures",
            "Members that left a live window by a change of their own",
        )
        departures.add_metric([], stats.departures)
        yield from (kept, queries, departures)


class EngineMetrics:
    def __init__(self, realtime: Realtime, stats: EngineStats | None = None) -> None:
        self.stats = stats if stats is not None else EngineStats()
        self.registry = CollectorRegistry()
        self.registry.register(_ConnectionsCollector(realtime))
        self.registry.register(_StatsCollector(self.stats))

    def add_windows(self, windows: Windows) -> None:
        self.registry.register(_WindowsCollector(windows))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
