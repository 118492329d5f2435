"""``shoal_router_*`` Prometheus metrics of one router process.

::

    shoal_router_requests_total{route, status}           answered requests
    shoal_router_decisions_total{strategy, reason}       routing decisions
    shoal_router_added_latency_seconds                   router time before the upstream
                                                         request is sent (parse, limits,
                                                         routing, ledger)
    shoal_router_engine_in_flight{engine}                this process's requests in flight
    shoal_router_retries_total{reason}                   attempts moved to another engine
    shoal_router_upstream_errors_total{engine, kind}     refused, reset, timeout, 5xx,
                                                         mid-stream
    shoal_router_breaker_state{engine}                   0 closed, 1 half-open, 2 open
    shoal_router_rejected_total{reason}                  429/503 by the router itself

Each process (``--workers N``) has its own registry and answers its own ``/metrics``;
sum over scrapes for the whole router. Rejected: prometheus_client's multiprocess mode
(files in a shared directory, one per process and metric; the cost lands on every
update).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BREAKER_VALUES", "RouterMetrics"]

BREAKER_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "shoal_router_requests", "Requests answered by the router.", ["route", "status"],
            registry=r,
        )  # fmt: skip
        self.decisions = Counter(
            "shoal_router_decisions", "Routing decisions.", ["strategy", "reason"], registry=r
        )
        self.added_latency = Histogram(
            "shoal_router_added_latency_seconds",
            "Router time between receiving a request and sending it upstream.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "shoal_router_engine_in_flight", "Requests in flight per engine.", ["engine"],
            registry=r,
        )  # fmt: skip
        self.retries = Counter(
            "shoal_router_retries", "Requests retried on another engine.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "shoal_router_upstream_errors", "Engine failures seen by the proxy.",
            ["engine", "kind"], registry=r,
        )  # fmt: skip
        self.breaker = Gauge(
            "shoal_router_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["engine"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "shoal_router_rejected", "Requests the router refused itself.", ["reason"],
            registry=r,
        )  # fmt: skip

        # children by label values: ``labels()`` takes a lock and builds a tuple per call,
        # which the hot path pays three times per request otherwise
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, kind: str, *values: str) -> Any:
        key = (kind, *values)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*values)
            if len(self._children) < 10_000:  # strategy texts come from clients: bounded
                self._children[key] = child
        return child

    def count_request(self, route: str, status: int) -> None:
        self._child(self.requests, "requests", route, str(status)).inc()

    def count_decision(self, strategy: str, reason: str) -> None:
        self._child(self.decisions, "decisions", strategy, reason).inc()

    def engine_in_flight(self, engine_id: str) -> Any:
        return self._child(self.in_flight, "in_flight", engine_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)
