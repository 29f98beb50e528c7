"""Prometheus metrics of one engine, in a registry of its own (two engines never mix figures)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.realtime import Realtime


class _ConnectionsCollector(Collector):
    """Connection counts read from the live state at scrape time: no bookkeeping to drift."""

    def __init__(self, realtime: Realtime) -> None:
        self._realtime = realtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "mdb_realtime_connections",
            "Open WebSocket connections",
            labels=["app", "endpoint"],
        )
        counts = Counter(
            (connection.app_slug, connection.endpoint)
            for connection in self._realtime.connections()
        )
        for (app, endpoint), count in sorted(counts.items()):
            family.add_metric([app, endpoint], count)
        yield family


class EngineMetrics:
    def __init__(self, realtime: Realtime) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ConnectionsCollector(realtime))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
