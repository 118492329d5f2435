"""Time windows on injected time, and the observed signals policies average in them.

Invariant: every helper here is a pure function of what was recorded and the ``now_s``
it is asked at; none reads a clock. A window that holds nothing for ``now_s`` answers
``None`` (unknown), never 0: a controller that could not scrape for a while must not see
an idle service.

Pieces:

* ``WindowAverage``: Knative's per-second buckets (``aggregation/bucketing.go``,
  ``TimedFloat64Buckets``) averaged over the window. Knative sums every pod's stat that
  lands in one bucket and divides the window total by the buckets since the first write,
  counting seconds nobody wrote as 0, which is right for its 1 s scrape of every pod.
  Ours differs on purpose: one value is recorded per control round (already a total), a
  bucket written twice keeps the mean of its values, and seconds *between* rounds are
  not zeros but absent, so a 2 s or 15 s scrape interval does not dilute the average
  (rejected: zero-filling, which makes a 15 s scrape read 1/15 of the load).
* ``RecommendationWindow``: recommendations with their times, for the maximum (Knative's
  scale-down delay window, ``aggregation/max``; the HPA's scale-down stabilization) or the
  minimum (the HPA's scale-up stabilization) over the last ``window_s``. As in the HPA
  (``stabilizeRecommendationWithBehaviors``), an entry counts while it is younger than the
  window, and the latest one always counts (so a 0 s window is "no stabilization").
* ``TrendWindow``: the least-squares slope of a signal over a window (units per second),
  for proactive policies (the arrival-rate trend).
* ``observed_total``, ``observed_per_replica``, ``demand_seen``, ``ZeroGate``: the signal a
  target reads (a replica metric extrapolated over the ready replicas, as Knative's
  scraper does; a router metric as it is), and the scale-to-zero / scale-from-zero rule
  every policy shares; ``finish_decision`` applies that rule and the replica bounds last
  and writes the one-line reason.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from control.autoscale.types import (
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    Decision,
    MetricTarget,
    PolicySpec,
    ScaleInput,
)

__all__ = [
    "RecommendationWindow",
    "TrendWindow",
    "WindowAverage",
    "ZeroGate",
    "demand_seen",
    "finish_decision",
    "least_squares_slope",
    "observed_per_replica",
    "observed_total",
]

ROUTER_METRICS = frozenset({ROUTER_IN_FLIGHT, ROUTER_ARRIVALS_PER_S, ROUTER_HELD})


class WindowAverage:
    """Mean of the recorded per-``granularity_s`` buckets within the last ``window_s``.

    Bucket ``b`` covers ``[b*g, (b+1)*g)``; at ``now_s`` the window holds the buckets
    ``now_bucket - n + 1 .. now_bucket`` with ``n = ceil(window_s / g)`` (Knative's count).
    """

    def __init__(self, window_s: float, granularity_s: float = 1.0) -> None:
        assert window_s > 0 and granularity_s > 0, "window and granularity must be > 0"
        self.window_s = window_s
        self._granularity_s = granularity_s
        self._num_buckets = max(1, math.ceil(window_s / granularity_s - 1e-9))
        # (bucket index, sum, count), bucket indexes increasing
        self._buckets: deque[list[float]] = deque()

    def _bucket(self, now_s: float) -> int:
        return math.floor(now_s / self._granularity_s + 1e-9)

    def record(self, now_s: float, value: float) -> None:
        index = self._bucket(now_s)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += value
            self._buckets[-1][2] += 1
        else:
            assert not self._buckets or self._buckets[-1][0] < index, "time went backwards"
            self._buckets.append([index, value, 1])
        self._expire(index)

    def _expire(self, now_index: int) -> None:
        while self._buckets and self._buckets[0][0] <= now_index - self._num_buckets:
            self._buckets.popleft()

    def average(self, now_s: float) -> float | None:
        """The mean of the window's bucket means; ``None`` if no bucket is in the window."""
        self._expire(self._bucket(now_s))
        if not self._buckets:
            return None
        return sum(total / count for _, total, count in self._buckets) / len(self._buckets)


class RecommendationWindow:
    """Recommendations recorded with their time; max or min over the last ``window_s``."""

    def __init__(self, window_s: float) -> None:
        assert window_s >= 0, "window must be >= 0"
        self.window_s = window_s
        self._entries: deque[tuple[float, int]] = deque()

    def record(self, now_s: float, value: int) -> None:
        assert not self._entries or self._entries[-1][0] <= now_s, "time went backwards"
        self._entries.append((now_s, value))
        cutoff = now_s - self.window_s
        while len(self._entries) > 1 and self._entries[0][0] <= cutoff:
            self._entries.popleft()

    def _live(self) -> list[int]:
        assert self._entries, "query after record"
        cutoff = self._entries[-1][0] - self.window_s
        latest = self._entries[-1][1]
        return [v for t, v in self._entries if t > cutoff] or [latest]

    def max(self) -> int:
        """Largest recommendation in the window ending at the latest record."""
        return max(self._live())

    def min(self) -> int:
        """Smallest recommendation in the window ending at the latest record."""
        return min(self._live())


def least_squares_slope(points: list[tuple[float, float]]) -> float | None:
    """Slope of the least-squares line through ``(t, v)`` points; ``None`` for fewer than
    two distinct times."""
    if len(points) < 2:
        return None
    mean_t = sum(t for t, _ in points) / len(points)
    mean_v = sum(v for _, v in points) / len(points)
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return None
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t


class TrendWindow:
    """The least-squares slope (units/s) of the values recorded within ``window_s``."""

    def __init__(self, window_s: float) -> None:
        assert window_s > 0, "window must be > 0"
        self.window_s = window_s
        self._points: deque[tuple[float, float]] = deque()

    def record(self, now_s: float, value: float) -> None:
        assert not self._points or self._points[-1][0] <= now_s, "time went backwards"
        self._points.append((now_s, value))

    def slope(self, now_s: float) -> float | None:
        while self._points and self._points[0][0] <= now_s - self.window_s:
            self._points.popleft()
        return least_squares_slope(list(self._points))


def observed_total(observation: ScaleInput, metric: str) -> float | None:
    """The service-wide total of ``metric`` this round, ``None`` when unknown.

    A router metric is already a total. A replica metric is the mean over the replicas
    that reported it times the replicas that should have (the ready ones): Knative's
    scraper extrapolates its sample the same way, so a replica whose scrape failed counts
    as an average one, neither as idle (AIBrix's 0) nor as absent (a plain sum).
    """
    if metric in ROUTER_METRICS:
        return observation.router.get(metric)
    mean = observation.mean(metric)
    if mean is None:
        return None
    return mean * max(observation.ready_replicas, len(observation.reporting(metric)))


def observed_per_replica(observation: ScaleInput, metric: str) -> float | None:
    """The per-ready-replica value of ``metric`` (a router total divided by the ready
    replicas, at least one); ``None`` when unknown."""
    if metric in ROUTER_METRICS:
        total = observation.router.get(metric)
        return None if total is None else total / max(1, observation.ready_replicas)
    return observation.mean(metric)


def demand_seen(observation: ScaleInput) -> bool:
    """Requests are waiting for an engine or arriving (the router's held/arrival counts)."""
    return (
        observation.router.get(ROUTER_HELD, 0.0) > 0
        or observation.router.get(ROUTER_ARRIVALS_PER_S, 0.0) > 0
    )


@dataclass(slots=True)
class ZeroGate:
    """Scale to zero only after ``idle_s`` of known idleness; scale from zero on demand.

    A round is *idle* when at least one signal is known (a target's total or a router
    count) and every known one is 0; a round with demand or with nothing known restarts
    the idle period (unknown is not idle). ``apply`` takes a policy's desired count:

    * with 0 ready replicas and demand (held requests or arrivals), at least 1
      ("activation"), whatever the metrics say;
    * a desired 0 is kept only when ``min_replicas == 0`` and the service has been idle
      for ``idle_s``; before that, one replica stays ("scale-to-zero-grace").
    """

    idle_s: float
    idle_since_s: float | None = None

    def observe(self, observation: ScaleInput, targets: tuple[MetricTarget, ...]) -> None:
        known = [observed_total(observation, t.metric) for t in targets]
        known += [observation.router.get(m) for m in sorted(ROUTER_METRICS)]
        values = [v for v in known if v is not None]
        if values and all(v == 0 for v in values):
            if self.idle_since_s is None:
                self.idle_since_s = observation.now_s
        else:
            self.idle_since_s = None

    def idle_for(self, now_s: float) -> float:
        return 0.0 if self.idle_since_s is None else now_s - self.idle_since_s

    def apply(self, desired: int, observation: ScaleInput, spec: PolicySpec) -> tuple[int, str]:
        if observation.ready_replicas == 0 and demand_seen(observation) and desired < 1:
            return 1, "activation"
        if desired <= 0 < spec.min_replicas:
            return desired, ""  # the min-replicas bound applies, not this rule
        if desired <= 0:
            current = observation.ready_replicas + observation.pending_replicas
            if spec.min_replicas == 0 and self.idle_for(observation.now_s) >= self.idle_s:
                return 0, ""
            if current > 0 or demand_seen(observation):
                return 1, "scale-to-zero-grace"
            return 0, ""
        return desired, ""


def finish_decision(
    policy: str,
    gate: ZeroGate,
    spec: PolicySpec,
    observation: ScaleInput,
    desired: int,
    recommendation: int | None,
    inputs: str,
    per_metric: dict[str, int | None],
    bounds: list[str],
    *,
    panic: bool = False,
) -> Decision:
    """The zero rule, then ``[min_replicas, max_replicas]``, then the decision-log line:
    ``POLICY [PANIC]: inputs; recommend R; desired D (bounds applied)``."""
    desired, applied = gate.apply(desired, observation, spec)
    if applied:
        bounds.append(applied)
    desired = max(0, desired)
    if desired > spec.max_replicas:
        desired = spec.max_replicas
        bounds.append("max-replicas")
    elif desired < spec.min_replicas:
        desired = spec.min_replicas
        bounds.append("min-replicas")
    head = f"{policy} PANIC" if panic else policy
    reason = f"{head}: {inputs}; recommend {recommendation}; desired {desired}"
    if bounds:
        reason += f" ({', '.join(bounds)})"
    return Decision(
        desired=desired,
        recommendation=recommendation,
        reason=reason,
        panic=panic,
        per_metric=dict(per_metric),
        bounds=",".join(bounds),
    )
