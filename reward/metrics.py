"""Prometheus metrics of one reward-service app, in its own CollectorRegistry.

A registry per app (not prometheus_client's global one) lets several apps live in one
process (tests, a driver that embeds the service) without duplicate-metric errors.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)


class RewardMetrics:
    """Requests, items, latency and errors, per route and per verifier."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "reward_requests",
            "HTTP requests by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "reward_request_duration_seconds",
            "HTTP request latency by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.items = Counter(
            "reward_items",
            "Items scored, by verifier and status.",
            ["verifier", "status"],
            registry=self.registry,
        )
        self.errors = Counter(
            "reward_verifier_errors",
            "Items a verifier failed (status error or timeout).",
            ["verifier"],
            registry=self.registry,
        )
        self.verifier_seconds = Histogram(
            "reward_verifier_duration_seconds",
            "Time a verifier took for one batch.",
            ["verifier"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_verifier(self, verifier: str, statuses: Iterable[str], seconds: float) -> None:
        self.verifier_seconds.labels(verifier).observe(seconds)
        for status in statuses:
            self.items.labels(verifier, status).inc()
            if status != "ok":
                self.errors.labels(verifier).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
