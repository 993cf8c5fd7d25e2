"""Prometheus metrics of the job API (``GET /metrics``): requests, and jobs by state.

Each app has its own registry, so several apps in one process (tests) do not clash.
Job counts are read from the store at scrape time, so they are right after a restart.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from services.api.states import JobState


class _JobsByState(Collector):
    def __init__(self, counts: Callable[[], dict[JobState, int]]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("grpo_api_jobs", "Jobs in the store by state.", labels=["state"])
        for state, count in self.counts().items():
            family.add_metric([state.value], count)
        yield family


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "grpo_api_requests",
            "HTTP requests by method, route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "grpo_api_request_seconds",
            "Time to answer a request, by route.",
            ["route"],
            registry=self.registry,
        )

    def watch_jobs(self, counts: Callable[[], dict[JobState, int]]) -> None:
        self.registry.register(_JobsByState(counts))

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
