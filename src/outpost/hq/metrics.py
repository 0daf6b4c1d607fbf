"""HQ's Prometheus metrics (``GET /metrics``), in a registry of their own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from outpost import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class HQMetrics:
    def __init__(self, connected: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.agents_connected = Gauge(
            "outpost_hq_agents_connected",
            "Agents with a live link to HQ (WebSocket or long-poll).",
            registry=self.registry,
        )
        self.agents_connected.set_function(lambda: float(connected()))
        self.jobs = Counter(
            "outpost_hq_jobs_total",
            "Jobs that entered a state, by kind and state.",
            ["kind", "state"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "outpost_hq_job_duration_seconds",
            "Run time of finished jobs as the agent measured it.",
            ["kind"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=self.registry,
        )
        build = Gauge("outpost_build_info", "Outpost version.", ["version"], registry=self.registry)
        build.labels(__version__).set(1)

    def job_state(self, kind: str, state: str) -> None:
        self.jobs.labels(kind, state).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
