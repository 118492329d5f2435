"""Values that cross the autoscaler's module boundaries (frozen, slotted; STYLE.md §4).

One control round: the scraper turns each ready replica's ``/metrics`` (and the router's)
into ``ReplicaSample`` values; the actuator reports ``ReplicaState``; the controller joins
them into one ``ScaleInput`` and asks the policy, which answers a ``Decision``. The trace
simulator builds the same ``ScaleInput`` from simulated replicas, so a policy cannot tell
a simulation from production.

Metric names are Shoal's own (``KV_CACHE_USAGE`` ...), engine-independent: the scraper
maps vLLM's names onto them (``vllm:kv_cache_usage_perc`` and the legacy
``vllm:gpu_cache_usage_perc`` are both ``kv_cache_usage``).

Invariant: *unknown is not zero*. A metric a replica did not report (its scrape failed,
timed out or lacked the series) is absent from that replica's ``values``; a failed scrape
has ``ok=False``. ``ScaleInput.total``/``mean`` are ``None`` when no replica reported the
metric, and policies hold (keep the current scale) on ``None``: a hung replica must never
look idle (AIBrix's KPA counts a failed scrape as 0 and scales down under load).

Units: times are seconds (``*_s``) on the controller's monotonic clock, rates per second,
``kv_cache_usage`` a fraction in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "GENERATION_TOKENS_PER_S",
    "KV_CACHE_USAGE",
    "METRICS",
    "PROMPT_TOKENS_PER_S",
    "REQUESTS_PER_S",
    "REQUESTS_RUNNING",
    "REQUESTS_WAITING",
    "ROUTER_ARRIVALS_PER_S",
    "ROUTER_HELD",
    "ROUTER_IN_FLIGHT",
    "TTFT_MEAN_S",
    "Decision",
    "MetricTarget",
    "PolicySpec",
    "ReplicaSample",
    "ReplicaState",
    "ScaleInput",
]

# Per replica, from the engine's /metrics.
KV_CACHE_USAGE = "kv_cache_usage"  # fraction of KV blocks in use, 0..1
REQUESTS_WAITING = "requests_waiting"  # queued, not yet scheduled
REQUESTS_RUNNING = "requests_running"  # in the running batch
PROMPT_TOKENS_PER_S = "prompt_tokens_per_s"  # rate of prompt tokens processed
GENERATION_TOKENS_PER_S = "generation_tokens_per_s"  # rate of tokens generated
REQUESTS_PER_S = "requests_per_s"  # rate of requests finished
TTFT_MEAN_S = "ttft_mean_s"  # mean time to first token over the last scrape interval
# Router-wide, from the router's /metrics (for the served model).
ROUTER_IN_FLIGHT = "router_in_flight"  # requests sent to engines, not finished
ROUTER_ARRIVALS_PER_S = "router_arrivals_per_s"  # requests arriving at the router
ROUTER_HELD = "router_held"  # requests held because no engine serves the model

METRICS = (
    KV_CACHE_USAGE,
    REQUESTS_WAITING,
    REQUESTS_RUNNING,
    PROMPT_TOKENS_PER_S,
    GENERATION_TOKENS_PER_S,
    REQUESTS_PER_S,
    TTFT_MEAN_S,
    ROUTER_IN_FLIGHT,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
)


@dataclass(frozen=True, slots=True)
class ReplicaSample:
    """One ready replica's metrics at one scrape. ``ok=False``: the scrape failed (the
    replica is unknown this round, never idle); a metric absent from ``values`` is unknown."""

    replica_id: str
    values: Mapping[str, float] = field(default_factory=dict)
    ok: bool = True


@dataclass(frozen=True, slots=True)
class ReplicaState:
    """What the actuator knows of the scale target.

    ``spec`` is the replica count last asked for (Kubernetes ``spec.replicas``);
    ``ready`` serve traffic; ``pending`` were asked for and are starting (they count toward
    capacity, so a policy does not ask again for what is on its way: AIBrix RFC #2670).
    ``endpoints`` are the ready replicas' base URLs, to scrape.
    """

    spec: int
    ready: int
    pending: int
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ScaleInput:
    """Everything a policy sees in one round."""

    now_s: float
    spec_replicas: int
    ready_replicas: int
    pending_replicas: int
    samples: tuple[ReplicaSample, ...] = ()  # one per ready replica scraped this round
    router: Mapping[str, float] = field(default_factory=dict)  # absent key = unknown

    def reporting(self, metric: str) -> list[float]:
        """The values of ``metric`` from the replicas that reported it."""
        return [s.values[metric] for s in self.samples if s.ok and metric in s.values]

    def total(self, metric: str) -> float | None:
        """Sum over reporting replicas; ``None`` when none reported (unknown, not 0)."""
        values = self.reporting(metric)
        return sum(values) if values else None

    def mean(self, metric: str) -> float | None:
        """Mean over reporting replicas; ``None`` when none reported."""
        values = self.reporting(metric)
        return sum(values) / len(values) if values else None

    @property
    def num_failed(self) -> int:
        return sum(1 for s in self.samples if not s.ok)


@dataclass(frozen=True, slots=True)
class MetricTarget:
    """Scale on ``metric`` so each replica holds about ``target`` of it (KV usage 0.7,
    8 waiting requests, ...). Router metrics are totals: the target is still per replica."""

    metric: str
    target: float

    def __post_init__(self) -> None:
        if not self.target > 0:
            raise ValueError(f"target of {self.metric} must be > 0, got {self.target}")


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """What every policy is built from: its metric targets, replica bounds and tunables.

    ``options`` holds the policy's own tunables by name (``stable_window_s``, ...); a name
    the policy does not know is an error (``PolicyConfigError``), never silently ignored.
    """

    targets: tuple[MetricTarget, ...]
    min_replicas: int = 1
    max_replicas: int = 10
    options: Mapping[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, "
                f"{self.max_replicas}"
            )


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer for one round, with what the decision log needs to explain it.

    ``desired`` is what the actuator is asked for (after stabilization and bounds);
    ``recommendation`` the raw figure before them (``None``: every metric unknown, so the
    policy held). ``per_metric`` is each metric's own recommendation (``None`` = unknown).
    ``bounds`` names what limited ``desired`` ("max-scale-up-rate", "scale-down-delay",
    "max-replicas", ...; empty when nothing did).
    """

    desired: int
    recommendation: int | None
    reason: str
    panic: bool = False
    per_metric: Mapping[str, int | None] = field(default_factory=dict)
    bounds: str = ""
