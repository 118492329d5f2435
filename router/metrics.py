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
    shoal_router_engine_metrics_fresh{engine}            1 when the engine's last scrape is
                                                         fresh, 0 when it is unknown
    shoal_router_shared_state_calls_total{part, result}  Redis calls of the ledger/limiter
    shoal_router_shared_state_degraded{part}             1 while Redis fails (local view)
    shoal_router_replicas                                live replicas on the shared ledger
    shoal_router_prefix_lookups_total{result}            precise lookups: located, failed,
                                                         unknown (prompt could not be keyed)

The ``strategy`` label is the mix's member names joined by ``+`` (weights dropped): clients
choose mixes per request, and a label per weight would let them grow the registry without
bound. The state families are read from the components' ``statistics()`` at scrape time.

Each process (``--workers N``) has its own registry and answers its own ``/metrics``;
sum over scrapes for the whole router. Rejected: prometheus_client's multiprocess mode
(files in a shared directory, one per process and metric; the cost lands on every
update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

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
        names = "+".join(sorted(part.partition(":")[0].strip() for part in strategy.split(",")))
        self._child(self.decisions, "decisions", names, reason).inc()

    def watch(self, state: Callable[[], RouterState]) -> None:
        """Report ``state()`` (read at every scrape) as the state families."""
        self.registry.register(_StateCollector(state))

    def engine_in_flight(self, engine_id: str) -> Any:
        return self._child(self.in_flight, "in_flight", engine_id)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RouterState:
    """What the scrape-time families read: plain values, gathered by the proxy."""

    def __init__(
        self,
        *,
        fresh: Mapping[str, bool],
        shared: Mapping[str, Any],  # part ("ledger", "limiter") -> SharedStats
        locator: Any | None,  # LocatorStats
    ) -> None:
        self.fresh = fresh
        self.shared = shared
        self.locator = locator


class _StateCollector(Collector):
    def __init__(self, state: Callable[[], RouterState]) -> None:
        self._state = state

    def collect(self) -> Iterator[Any]:
        state = self._state()
        fresh = GaugeMetricFamily(
            "shoal_router_engine_metrics_fresh",
            "1 when the engine's last /metrics scrape is fresh, 0 when unknown.",
            labels=["engine"],
        )
        for engine_id, is_fresh in state.fresh.items():
            fresh.add_metric([engine_id], 1.0 if is_fresh else 0.0)
        yield fresh
        if state.shared:
            calls = CounterMetricFamily(
                "shoal_router_shared_state_calls", "Redis calls of the shared ledger and limits.",
                labels=["part", "result"],
            )  # fmt: skip
            degraded = GaugeMetricFamily(
                "shoal_router_shared_state_degraded",
                "1 while Redis fails and this replica decides on its own view.",
                labels=["part"],
            )
            for part, stats in state.shared.items():
                calls.add_metric([part, "ok"], stats.redis_calls)
                calls.add_metric([part, "failed"], stats.redis_failures)
                degraded.add_metric([part], 1.0 if stats.degraded else 0.0)
            yield calls
            yield degraded
            ledger = state.shared.get("ledger")
            if ledger is not None:
                yield GaugeMetricFamily(
                    "shoal_router_replicas", "Live router replicas on the shared ledger.",
                    value=ledger.replicas,
                )  # fmt: skip
        if state.locator is not None:
            lookups = CounterMetricFamily(
                "shoal_router_prefix_lookups", "Precise prefix lookups through the cache daemon.",
                labels=["result"],
            )  # fmt: skip
            lookups.add_metric(["located"], state.locator.num_located)
            lookups.add_metric(["failed"], state.locator.num_failures)
            lookups.add_metric(["unknown"], state.locator.num_unknown)
            yield lookups
