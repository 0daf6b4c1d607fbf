"""Prometheus metrics of the agent: build info, connections, UP per slug, check durations."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from outpost import __version__
from outpost.api.service import AgentService


class _ConnectionCollector(Collector):
    """Reads the connections and their last status at scrape time."""

    def __init__(self, service: AgentService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily(
            "outpost_build_info", "Outpost build information", labels=["version"]
        )
        build.add_metric([__version__], 1)
        yield build
        infos = self.service.list_connections()
        total = GaugeMetricFamily("outpost_connections", "Connections configured on this agent")
        total.add_metric([], len(infos))
        yield total
        up = GaugeMetricFamily(
            "outpost_connection_up",
            "1 if the last check of the connection succeeded, 0 if it failed",
            labels=["slug", "driver"],
        )
        for info in infos:
            if info.up is not None:
                up.add_metric([info.slug, info.driver], 1 if info.up else 0)
        yield up


class AgentMetrics:
    def __init__(self, service: AgentService) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_ConnectionCollector(service))
        self.check_duration = Histogram(
            "outpost_connection_check_duration_seconds",
            "Time taken by one connection check",
            ["driver"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.checks = Counter(
            "outpost_connection_checks_total",
            "Connection checks by result",
            ["driver", "result"],
            registry=self.registry,
        )
        self.queries = Counter(
            "outpost_queries_total",
            "Queries run through the agent by result",
            ["driver", "result"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
