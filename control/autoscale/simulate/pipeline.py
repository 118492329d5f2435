"""Each policy's control pipeline as deployed: how old and how smoothed its signal is.

A policy decides on what reaches it, not on what the engines are doing right now::

    direct (kpa, apa, aibrix-kpa, shoal)      engines --scrape every round--> policy
        the controller scrapes every ready replica's /metrics itself at each round
        (``interval_s``: Knative's autoscaler ticks every 2 s; AIBrix's podautoscaler
        and Shoal's controller are configured alike here); gauges are as of the round,
        counter rates are over the last round.

    prometheus (hpa)   engines --scrape_s--> Prometheus --rate[1m]--> adapter --sync_s--> HPA
        Prometheus scrapes each pod every ``scrape_s`` (15 s here: kube-prometheus'
        ServiceMonitors use 15-30 s); prometheus-adapter answers the HPA's query with the
        last scraped gauge and ``rate(...[1m])`` of counters (two scrapes needed, so a new
        pod has no rate for one scrape interval); the HPA syncs every ``sync_s`` (15 s,
        ``--horizontal-pod-autoscaler-sync-period``). A failed scrape makes the pod's
        series stale (Prometheus' staleness marker): absent until the next good scrape.

Pod start (``start_delay_s``) is the run's parameter (``run.py``), applied to every
policy alike. Failed scrapes are injected with ``failure_rate`` (per replica per scrape,
seeded): a failed direct scrape is ``ReplicaSample(ok=False)`` (unknown, never zero).

Router metrics (arrivals/s, in flight, held) travel the same path as the engines' (the
controller scrapes the router directly; for the HPA through Prometheus).

Invariant: a ``ScaleInput`` built here holds only what the pipeline could know at its
``now_s``: no sample newer than its last scrape, none of a replica not ready at that scrape.

Rejected: modelling prometheus-adapter's metric relist interval (it delays new metric
*names*, not new pods' series) and the HPA's readiness delay and CPU initialization period
(they apply to resource metrics, not to the custom metrics autoscaled on here).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from control.autoscale.simulate.replicas import ReplicaCounters
from control.autoscale.types import (
    GENERATION_TOKENS_PER_S,
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_PER_S,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    TTFT_MEAN_S,
    ReplicaSample,
    ScaleInput,
)

__all__ = ["PIPELINES", "ControlPipeline", "PipelineSpec", "RouterCounters", "pipeline_for"]


@dataclass(frozen=True, slots=True)
class PipelineSpec:
    kind: str  # "direct" or "prometheus"
    interval_s: float  # between control rounds (direct) / HPA syncs (prometheus)
    scrape_s: float = 15.0  # Prometheus' scrape interval (prometheus only)
    rate_window_s: float = 60.0  # the adapter's rate[...] window (prometheus only)
    failure_rate: float = 0.0  # fraction of replica scrapes that fail
    round_phase_s: float = 0.0  # first round at interval_s + this
    scrape_phase_s: float = 0.0  # first Prometheus scrape at scrape_s + this

    def __post_init__(self) -> None:
        assert self.kind in ("direct", "prometheus"), f"unknown pipeline {self.kind}"
        assert self.interval_s > 0 and self.scrape_s > 0, "intervals must be > 0"
        assert 0 <= self.failure_rate < 1, "failure rate is a fraction"
        assert self.round_phase_s >= 0 and self.scrape_phase_s >= 0, "phases are >= 0"


PIPELINES: dict[str, PipelineSpec] = {
    "kpa": PipelineSpec("direct", 2.0),
    "apa": PipelineSpec("direct", 2.0),
    "aibrix-kpa": PipelineSpec("direct", 2.0),
    "shoal": PipelineSpec("direct", 2.0),
    "hpa": PipelineSpec("prometheus", 15.0, scrape_s=15.0, rate_window_s=60.0),
}


def pipeline_for(policy: str, *, failure_rate: float = 0.0, seed: int = 0) -> PipelineSpec:
    """The pipeline a policy is deployed with (an unknown name gets the direct one).

    Its clocks run at phases drawn from ``seed``: a controller's rounds, Prometheus'
    scrapes and the HPA's syncs are not aligned with each other or with a trace's load
    step (aligned, the HPA would see a scrape the instant it is taken, and save half a
    sync interval on average that no cluster gives it)."""
    base = PIPELINES.get(policy, PIPELINES["shoal"])
    rng = random.Random(f"{policy}/{seed}")
    return PipelineSpec(
        base.kind,
        base.interval_s,
        base.scrape_s,
        base.rate_window_s,
        failure_rate,
        round_phase_s=rng.uniform(0, base.interval_s),
        scrape_phase_s=rng.uniform(0, base.scrape_s),
    )


@dataclass(frozen=True, slots=True)
class RouterCounters:
    """The router's series for the model: ``shoal_router_arrivals_total``,
    ``shoal_router_in_flight``, ``shoal_router_held_requests``."""

    now_s: float
    arrivals_total: int
    in_flight: int
    held: int


def _since(series: Iterable[ReplicaCounters], start_s: float) -> list[ReplicaCounters]:
    return [s for s in series if s.now_s >= start_s - 1e-9]


def _since_router(series: Iterable[RouterCounters], start_s: float) -> list[RouterCounters]:
    return [s for s in series if s.now_s >= start_s - 1e-9]


def _gauges(c: ReplicaCounters) -> dict[str, float]:
    return {
        KV_CACHE_USAGE: c.kv_cache_usage,
        REQUESTS_WAITING: float(c.num_waiting),
        REQUESTS_RUNNING: float(c.num_running),
    }


def _rates(old: ReplicaCounters, new: ReplicaCounters) -> dict[str, float]:
    span = new.now_s - old.now_s
    if span <= 0:
        return {}
    rates = {
        PROMPT_TOKENS_PER_S: (new.prompt_tokens_total - old.prompt_tokens_total) / span,
        GENERATION_TOKENS_PER_S: (new.generation_tokens_total - old.generation_tokens_total) / span,
        REQUESTS_PER_S: (new.requests_total - old.requests_total) / span,
    }
    count = new.ttft_count - old.ttft_count
    if count > 0:  # no first token in the interval: the mean is unknown, not 0
        rates[TTFT_MEAN_S] = (new.ttft_sum_s - old.ttft_sum_s) / count
    return rates


def _router_values(old: RouterCounters | None, new: RouterCounters) -> dict[str, float]:
    values = {ROUTER_IN_FLIGHT: float(new.in_flight), ROUTER_HELD: float(new.held)}
    if old is not None and new.now_s > old.now_s:
        values[ROUTER_ARRIVALS_PER_S] = (new.arrivals_total - old.arrivals_total) / (
            new.now_s - old.now_s
        )
    return values


class ControlPipeline:
    """Feeds one policy: ``due(now)`` says when a round is, ``observe`` builds its input.

    The run calls ``scrape(now, counters, router)`` at every tick where ``scrape_due``;
    for a direct pipeline scrape and round coincide.
    """

    def __init__(self, spec: PipelineSpec, rng: random.Random) -> None:
        self.spec = spec
        self._rng = rng
        self._next_round_s = spec.interval_s + spec.round_phase_s
        self._next_scrape_s = (
            spec.scrape_s + spec.scrape_phase_s if spec.kind == "prometheus" else self._next_round_s
        )
        # direct: the previous scrape of each replica; prometheus: its stored samples.
        self._last: dict[str, ReplicaCounters] = {}
        self._series: dict[str, deque[ReplicaCounters]] = {}
        self._stale: set[str] = set()
        self._router_series: deque[RouterCounters] = deque()
        self._last_router: RouterCounters | None = None

    def next_event_s(self) -> float:
        return min(self._next_round_s, self._next_scrape_s)

    def step(
        self,
        now_s: float,
        counters: Mapping[str, ReplicaCounters],
        router: RouterCounters,
        spec_replicas: int,
        pending_replicas: int,
    ) -> ScaleInput | None:
        """Scrape and/or decide at ``now_s`` if due; the policy's input when a round is."""
        observation = None
        if self.spec.kind == "direct":
            if now_s + 1e-9 >= self._next_round_s:
                self._next_round_s += self.spec.interval_s
                self._next_scrape_s = self._next_round_s
                observation = self._direct(now_s, counters, router, spec_replicas, pending_replicas)
            return observation
        if now_s + 1e-9 >= self._next_scrape_s:
            self._next_scrape_s += self.spec.scrape_s
            self._prometheus_scrape(now_s, counters, router)
        if now_s + 1e-9 >= self._next_round_s:
            self._next_round_s += self.spec.interval_s
            observation = self._adapter(now_s, counters, spec_replicas, pending_replicas)
        return observation

    # -- direct scrapes -------------------------------------------------------------

    def _failed(self) -> bool:
        return self.spec.failure_rate > 0 and self._rng.random() < self.spec.failure_rate

    def _direct(
        self,
        now_s: float,
        counters: Mapping[str, ReplicaCounters],
        router: RouterCounters,
        spec_replicas: int,
        pending_replicas: int,
    ) -> ScaleInput:
        samples = []
        for replica_id, current in counters.items():
            if self._failed():
                samples.append(ReplicaSample(replica_id, {}, ok=False))
                continue
            values = _gauges(current)
            previous = self._last.get(replica_id)
            if previous is not None:
                values.update(_rates(previous, current))
            self._last[replica_id] = current
            samples.append(ReplicaSample(replica_id, values))
        for gone in set(self._last) - set(counters):
            del self._last[gone]
        router_values = _router_values(self._last_router, router)
        self._last_router = router
        return ScaleInput(
            now_s=now_s,
            spec_replicas=spec_replicas,
            ready_replicas=len(counters),
            pending_replicas=pending_replicas,
            samples=tuple(samples),
            router=router_values,
        )

    # -- Prometheus, adapter, HPA ----------------------------------------------------

    def _prometheus_scrape(
        self, now_s: float, counters: Mapping[str, ReplicaCounters], router: RouterCounters
    ) -> None:
        horizon = now_s - self.spec.rate_window_s - self.spec.scrape_s
        for replica_id, current in counters.items():
            if self._failed():
                self._stale.add(replica_id)
                continue
            self._stale.discard(replica_id)
            series = self._series.setdefault(replica_id, deque())
            series.append(current)
            while series and series[0].now_s < horizon:
                series.popleft()
        for gone in set(self._series) - set(counters):
            del self._series[gone]
            self._stale.discard(gone)
        self._router_series.append(router)
        while self._router_series and self._router_series[0].now_s < horizon:
            self._router_series.popleft()

    def _adapter(
        self,
        now_s: float,
        counters: Mapping[str, ReplicaCounters],
        spec_replicas: int,
        pending_replicas: int,
    ) -> ScaleInput:
        samples = []
        for replica_id in counters:
            series = self._series.get(replica_id)
            if not series or replica_id in self._stale:
                continue  # Prometheus has no fresh series for this pod yet
            values = _gauges(series[-1])
            window = _since(series, now_s - self.spec.rate_window_s)
            if len(window) >= 2:
                values.update(_rates(window[0], window[-1]))
            samples.append(ReplicaSample(replica_id, values))
        router_values: dict[str, float] = {}
        if self._router_series:
            last = self._router_series[-1]
            window_r = _since_router(self._router_series, now_s - self.spec.rate_window_s)
            first = window_r[0] if len(window_r) >= 2 else None
            router_values = _router_values(first, last)
        return ScaleInput(
            now_s=now_s,
            spec_replicas=spec_replicas,
            ready_replicas=len(counters),
            pending_replicas=pending_replicas,
            samples=tuple(samples),
            router=router_values,
        )
