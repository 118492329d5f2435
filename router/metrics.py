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

    for the autoscaler (issue 13; contract in control/autoscale/types.py):
    shoal_router_arrivals_total{model}                   requests received (body parsed)
    shoal_router_in_flight{model}                        requests sent to an engine whose
                                                         answer has not ended
    shoal_router_held_requests{model}                    requests held for lack of an engine
                                                         (router/hold.py): scale from zero
    shoal_router_held_seconds                            how long held requests waited
                                                         (woken, timed out or gone)

    for GPU health (issue 15; router/gpu_health.py, with --gpu-health):
    shoal_router_engines_gpu_unhealthy                   engines out of service because a
                                                         health watcher reports one of their
                                                         GPUs unhealthy
    shoal_router_gpu_health_polls_total{result}          watcher polls: ok, unreachable,
                                                         bad_status, malformed

    for placement (issue 14; the windowed form is GET /v1/request_sizes, router/sizes.py):
    shoal_router_request_prompt_tokens{model}            prompt tokens of finished requests
    shoal_router_request_completion_tokens{model}        completion tokens of finished
                                                         requests (buckets: powers of two
                                                         16 .. 32768, as the size histogram)
    shoal_router_placement_decisions_total{outcome}      slo decisions with --placement-url:
                                                         plan (the request's cell), nearest_row
                                                         (a row near it with traffic), fallback
                                                         (no engine of the planned type met
                                                         the SLO), no_share (the plan has no
                                                         traffic in the prompt's column, or is
                                                         another model's), no_plan (none, or
                                                         stale)

The ``strategy`` label is the mix's member names joined by ``+`` (weights dropped): clients
choose mixes per request, and a label per weight would let them grow the registry without
bound. The ``model`` label is bounded the same way (``ModelLabels``): the models engines
serve always get their own label, other names (the client's body says them, and with zero
engines nobody serves anything yet) the first ``MAX_MODEL_LABELS``; the rest, and a
request without a model, count as ``other``. Every model the engines serve is reported
with 0 held and 0 in flight when idle, so the autoscaler reads an idle model as 0, never as
unknown. The state families are read from the components' ``statistics()`` at scrape time.

Each process (``--workers N``) has its own registry and answers its own ``/metrics``;
sum over scrapes for the whole router. (An autoscaler scraping one URL of a multi-worker
router sees one worker per scrape; scale from zero does not depend on it: every worker
that holds a request asks the autoscaler itself, ``--autoscaler-url``.) Rejected:
prometheus_client's multiprocess mode (files in a shared directory, one per process and
metric; the cost lands on every update).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = ["BREAKER_VALUES", "MAX_MODEL_LABELS", "OTHER_MODEL", "ModelLabels", "RouterMetrics"]

BREAKER_VALUES = {"closed": 0.0, "half-open": 1.0, "open": 2.0}
MAX_MODEL_LABELS = 64  # model names not served by any engine that get a label of their own
OTHER_MODEL = "other"
_HELD_BUCKETS = (0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 300.0)
_TOKEN_BUCKETS = tuple(float(2**k) for k in range(4, 16))  # router.sizes.EDGES
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip


PLACEMENT_OUTCOMES = ("plan", "nearest_row", "fallback", "no_share", "no_plan")


class ModelLabels:
    """A request's model -> its ``model`` label value, from a bounded set (module
    docstring). ``served`` names are always their own label; others are admitted first
    come until ``limit`` of them are known, then ``other``."""

    def __init__(self, limit: int = MAX_MODEL_LABELS) -> None:
        self.limit = limit
        self._served: set[str] = set()
        self._admitted: set[str] = set()

    def serve(self, models: Iterable[str]) -> None:
        """Models engines serve now (they keep their label once given one)."""
        self._served.update(m for m in models if m)

    def label(self, model: str) -> str:
        if not model:
            return OTHER_MODEL
        if model in self._served or model in self._admitted:
            return model
        if len(self._admitted) < self.limit:
            self._admitted.add(model)
            return model
        return OTHER_MODEL

    @property
    def served(self) -> frozenset[str]:
        return frozenset(self._served)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.models = ModelLabels()
        self.arrivals = Counter(
            "shoal_router_arrivals", "Requests received per model (body parsed).", ["model"],
            registry=r,
        )  # fmt: skip
        self.model_in_flight = Gauge(
            "shoal_router_in_flight", "Requests sent to an engine and not finished, per model.",
            ["model"], registry=r,
        )  # fmt: skip
        self.held_seconds = Histogram(
            "shoal_router_held_seconds",
            "Seconds a request was held waiting for a first engine of its model.",
            buckets=_HELD_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Histogram(
            "shoal_router_request_prompt_tokens",
            "Prompt tokens of finished requests (the engine's usage, else the router's count).",
            ["model"], buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.completion_tokens = Histogram(
            "shoal_router_request_completion_tokens",
            "Completion tokens of finished requests (usage, else streamed token events).",
            ["model"], buckets=_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
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
        self.placement_decisions = Counter(
            "shoal_router_placement_decisions",
            "slo decisions by how the placement plan applied.",
            ["outcome"],
            registry=r,
        )
        for outcome in PLACEMENT_OUTCOMES:
            self.placement_decisions.labels(outcome)
        self.rejected = Counter(
            "shoal_router_rejected", "Requests the router refused itself.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.gpu_unhealthy_engines = Gauge(
            "shoal_router_engines_gpu_unhealthy",
            "Engines given no new requests because a health watcher reports a GPU of theirs "
            "unhealthy.",
            registry=r,
        )
        self.gpu_health_polls = Counter(
            "shoal_router_gpu_health_polls", "Polls of the GPU health watchers, by result.",
            ["result"], registry=r,
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

    def observe_sizes(self, label: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._child(self.prompt_tokens, "prompt_tokens", label).observe(prompt_tokens)
        self._child(self.completion_tokens, "completion_tokens", label).observe(completion_tokens)

    def count_decision(self, strategy: str, reason: str) -> None:
        names = "+".join(sorted(part.partition(":")[0].strip() for part in strategy.split(",")))
        self._child(self.decisions, "decisions", names, reason).inc()

    def count_placement(self, outcome: str) -> None:
        """One slo decision's placement outcome (``PLACEMENT_OUTCOMES``)."""
        self._child(self.placement_decisions, "placement", outcome).inc()

    def watch_gpu_health(self, count_engines: Callable[[], int], results: Iterable[str]) -> None:
        """``--gpu-health``: the gauge reads ``count_engines()`` at scrape time; every poll
        result is reported from 0."""
        self.gpu_unhealthy_engines.set_function(lambda: float(count_engines()))
        for result in results:
            self._child(self.gpu_health_polls, "gpu_health", result)

    def count_gpu_health_poll(self, result: str) -> None:
        self._child(self.gpu_health_polls, "gpu_health", result).inc()

    def watch(self, state: Callable[[], RouterState]) -> None:
        """Report ``state()`` (read at every scrape) as the state families."""
        self.registry.register(_StateCollector(state))

    def engine_in_flight(self, engine_id: str) -> Any:
        return self._child(self.in_flight, "in_flight", engine_id)

    def count_arrival(self, model: str) -> str:
        """Count one request for ``model``; its (bounded) label, for the gauges."""
        label = self.models.label(model)
        self._child(self.arrivals, "arrivals", label).inc()
        return label

    def in_flight_of(self, label: str) -> Any:
        return self._child(self.model_in_flight, "model_in_flight", label)

    def serve_models(self, models: Iterable[str]) -> None:
        """Models the engines serve: labelled, and reported at 0 while idle."""
        fresh = set(models) - self.models.served
        self.models.serve(fresh)
        for model in fresh:
            if model:
                self._child(self.arrivals, "arrivals", model)
                self.in_flight_of(model)

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
        held: Mapping[str, int] | None = None,  # model label -> held now (0s included)
    ) -> None:
        self.fresh = fresh
        self.shared = shared
        self.locator = locator
        self.held = held


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
        if state.held is not None:
            held = GaugeMetricFamily(
                "shoal_router_held_requests",
                "Requests held because no engine serves their model yet (scale from zero).",
                labels=["model"],
            )
            for model, count in state.held.items():
                held.add_metric([model], float(count))
            yield held
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
