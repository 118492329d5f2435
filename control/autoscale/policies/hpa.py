"""``hpa``: the Kubernetes Horizontal Pod Autoscaler's formula, tolerance and behaviour.

Algorithm (kubernetes ``pkg/controller/podautoscaler/replica_calculator.go``,
``horizontal.go``), per round, each target on its own:

* a replica metric is a Pods metric with an ``AverageValue`` target: over the ready
  replicas that reported it, ``ratio = sum / (target * n)``. Ready replicas that did not
  report (a failed scrape) are *missing*: on a scale-up (``ratio > 1``) they count as 0,
  on a scale-down as exactly the target. Pending replicas (asked for, not ready) are
  *unready*: ignored on a scale-down, counted as 0 on a scale-up ("rebalance ignored"),
  which is how the HPA keeps from asking again for replicas already starting. Within the
  ``tolerance`` (``|1 - ratio| <= 0.1``) or when the fill-ins flip the direction, the
  count stays at the current one (``spec_replicas``); otherwise
  ``ceil(new_ratio * pods counted)``.
* a router metric is an External metric with an ``AverageValue`` target:
  ``ratio = total / (target * current)``; outside the tolerance, ``ceil(total / target)``.
* the largest recommendation wins; when some target is unknown and the rest would scale
  down, the HPA holds (``computeReplicasForMetrics``); all unknown holds.

Behaviour (``normalizeDesiredReplicasWithBehaviors``): each recommendation is recorded;
the stabilized count is the current one raised to the MIN of the recommendations in the
scale-up window (``scale_up_stabilization_window_s``, 0 s) and lowered to the MAX of those
in the scale-down window (``scale_down_stabilization_window_s``, 300 s): the HPA-correct,
conservative choice in both directions. Then the rate policies: scale-up
``max(ceil(start * (1 + scale_up_percent/100)), start + scale_up_pods)`` per
``scale_up_period_s`` (100% or 4 pods per 15 s, ``selectPolicy: Max``), scale-down
``floor(start * (1 - scale_down_percent/100))`` per ``scale_down_period_s`` (100% per 15
s), ``start`` being the count at the beginning of the period: the count now, less the
replicas added and plus those removed within it, both directions' events counted in both
limits (``calculateScaleUpLimitWithScalingRules``,
``calculateScaleDownLimitWithBehaviors``), so a scale-up right after a scale-down starts
from the count before the scale-down.

Scale events are what was applied, not what was decided: the HPA records one only when it
has written the scale. The policy sees no write, so it infers them from ``spec_replicas``:
a change of the spec between two rounds is a scale event at the earlier round's time (the
write follows that round's decision). A dry run or a failed write leaves the spec as it
was and uses no rate budget. Rejected: recording ``decision.desired`` (it charged the
budget for scales never made) and a feedback call on the Policy protocol (an interface
change for what the spec already says). A change made by someone else between rounds (the
wake endpoint, a user) counts too, dated at the earlier round, where the HPA would not
count it: the policy cannot tell it from its own (the wake's 0 -> 1 thus takes one
replica off the next scale-up's period start).

Where ours differs: the HPA does not scale from zero (``minReplicas >= 1`` unless the
HPAScaleToZero gate); ours follows Shoal's shared rule (scale to zero after
``scale_to_zero_idle_s`` idle, default the scale-down window; held requests or arrivals
wake it). The pipeline delay (Prometheus scrape, the adapter's ``rate[1m]``, the 15 s
sync) is the simulator's to model, not the policy's.

Options: ``tolerance`` (0.1), ``scale_up_stabilization_window_s`` (0),
``scale_down_stabilization_window_s`` (300), ``scale_up_percent`` (100),
``scale_up_pods`` (4), ``scale_up_period_s`` (15), ``scale_up_select_policy`` (max|min),
``scale_down_percent`` (100), ``scale_down_pods`` (0 = no Pods policy),
``scale_down_period_s`` (15), ``scale_to_zero_idle_s`` (the scale-down window).
"""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar

from control.autoscale.errors import PolicyConfigError
from control.autoscale.policies.base import PolicyOptions, largest_known, register
from control.autoscale.policies.windows import (
    ROUTER_METRICS,
    RecommendationWindow,
    ZeroGate,
    finish_decision,
)
from control.autoscale.types import Decision, MetricTarget, PolicySpec, ScaleInput

__all__ = ["HorizontalPodAutoscaler", "replicas_for_metric"]


def _within(ratio: float, tolerance: float) -> bool:
    return abs(1.0 - ratio) <= tolerance


def _describe(observation: ScaleInput, target: MetricTarget) -> str:
    if target.metric in ROUTER_METRICS:
        total = observation.router.get(target.metric)
        shown = "unknown" if total is None else f"total {total:.4g}"
        return f"{target.metric} {shown} /{target.target:g}"
    values = observation.reporting(target.metric)
    if not values:
        return f"{target.metric} unknown"
    missing = max(0, observation.ready_replicas - len(values))
    return (
        f"{target.metric} mean {sum(values) / len(values):.4g} of {len(values)} "
        f"({missing} missing) /{target.target:g}"
    )


def replicas_for_metric(
    observation: ScaleInput, target: MetricTarget, tolerance: float
) -> int | None:
    """One target's HPA recommendation (``GetMetricReplicas`` / ``GetExternalPerPodMetric
    Replicas``); ``None`` when no replica reported it."""
    current = observation.spec_replicas
    if target.metric in ROUTER_METRICS:
        total = observation.router.get(target.metric)
        if total is None:
            return None
        if current > 0 and _within(total / (target.target * current), tolerance):
            return current
        return math.ceil(total / target.target - 1e-9)
    values = observation.reporting(target.metric)
    if not values:
        return None
    num_missing = max(0, observation.ready_replicas - len(values))
    num_unready = observation.pending_replicas
    ratio = sum(values) / (target.target * len(values))
    rebalance_unready = num_unready > 0 and ratio > 1.0
    if not rebalance_unready and num_missing == 0:
        if _within(ratio, tolerance):
            return current
        return math.ceil(ratio * len(values) - 1e-9)
    filled = sum(values)
    count = len(values)
    if ratio < 1.0:  # scale-down: a missing replica is taken at the target
        filled += num_missing * target.target
        count += num_missing
    elif ratio > 1.0:  # scale-up: a missing replica is taken at 0
        count += num_missing
    if rebalance_unready:  # scale-up: pending replicas count, at 0
        count += num_unready
    new_ratio = filled / (target.target * count)
    if _within(new_ratio, tolerance) or (ratio < 1.0 < new_ratio) or (new_ratio < 1.0 < ratio):
        return current
    proposed = math.ceil(new_ratio * count - 1e-9)
    if (new_ratio < 1.0 and proposed > current) or (new_ratio > 1.0 and proposed < current):
        return current
    return proposed


@register("hpa")
class HorizontalPodAutoscaler:
    """The Kubernetes HPA: per-target ratio with tolerance, stabilization, rate policies."""

    name: ClassVar[str] = "hpa"

    def __init__(self, spec: PolicySpec) -> None:
        options = PolicyOptions(self.name, spec.options)
        self.tolerance = options.number("tolerance", 0.1, minimum=0.0)
        up_window_s = options.number("scale_up_stabilization_window_s", 0.0, minimum=0.0)
        down_window_s = options.number("scale_down_stabilization_window_s", 300.0, minimum=0.0)
        self.scale_up_percent = options.number("scale_up_percent", 100.0, minimum=0.0)
        self.scale_up_pods = options.number("scale_up_pods", 4.0, minimum=0.0)
        self.scale_up_period_s = options.number("scale_up_period_s", 15.0, minimum=1.0)
        select = options.text("scale_up_select_policy", "max").lower()
        self.scale_down_percent = options.number("scale_down_percent", 100.0, minimum=0.0)
        self.scale_down_pods = options.number("scale_down_pods", 0.0, minimum=0.0)
        self.scale_down_period_s = options.number("scale_down_period_s", 15.0, minimum=1.0)
        idle_s = options.number("scale_to_zero_idle_s", down_window_s, minimum=0.0)
        options.check()
        if select not in ("max", "min"):
            raise PolicyConfigError(
                f"policy hpa: scale_up_select_policy must be max or min, got {select!r}"
            )
        if self.scale_down_percent > 100:
            raise PolicyConfigError("policy hpa: scale_down_percent must be <= 100")
        self._select_max = select == "max"
        self._spec = spec
        self._up = RecommendationWindow(up_window_s)
        self._down = RecommendationWindow(down_window_s)
        self._gate = ZeroGate(idle_s=idle_s)
        # (time, replicas added) and (time, replicas removed): the HPA's scale events,
        # inferred from the spec's changes between rounds
        self._up_events: deque[tuple[float, int]] = deque()
        self._down_events: deque[tuple[float, int]] = deque()
        self._last_now_s = -math.inf
        self._last_spec: int | None = None

    def decide(self, observation: ScaleInput) -> Decision:
        now_s = observation.now_s
        assert now_s >= self._last_now_s, f"hpa: time went backwards ({now_s})"
        self._record_applied(self._last_now_s, observation.spec_replicas)
        self._last_now_s = now_s
        self._gate.observe(observation, self._spec.targets)
        current = observation.spec_replicas
        per_metric = {
            t.metric: replicas_for_metric(observation, t, self.tolerance)
            for t in self._spec.targets
        }
        inputs = (
            "; ".join(
                f"{_describe(observation, t)} -> {per_metric[t.metric]}" for t in self._spec.targets
            )
            + f"; ready {observation.ready_replicas} pending {observation.pending_replicas}"
            f" spec {current}; windows up {self._up.window_s:g}s down {self._down.window_s:g}s"
        )
        recommendation = largest_known(per_metric.values())
        if recommendation is None:
            return self._finish(
                observation, current, None, inputs + "; all unknown: hold", per_metric, []
            )
        if None in per_metric.values() and recommendation < current:
            return self._finish(
                observation,
                current,
                recommendation,
                inputs + "; some unknown: no scale-down",
                per_metric,
                [],
            )
        bounds: list[str] = []
        self._up.record(now_s, recommendation)
        self._down.record(now_s, recommendation)
        stabilized = max(current, self._up.min())
        stabilized = min(stabilized, self._down.max())
        if stabilized != recommendation:
            bounds.append("stabilization")
        desired = self._limit_rate(now_s, current, stabilized, bounds)
        return self._finish(observation, desired, recommendation, inputs, per_metric, bounds)

    def _record_applied(self, previous_s: float, spec: int) -> None:
        """A change of the spec since the last round is a scale event at that round."""
        if self._last_spec is not None and spec != self._last_spec:
            if spec > self._last_spec:
                self._up_events.append((previous_s, spec - self._last_spec))
            else:
                self._down_events.append((previous_s, self._last_spec - spec))
        self._last_spec = spec

    @staticmethod
    def _changed_within(events: deque[tuple[float, int]], now_s: float, period_s: float) -> int:
        return sum(n for t, n in events if t > now_s - period_s)

    def _limit_rate(self, now_s: float, current: int, desired: int, bounds: list[str]) -> int:
        longest = max(self.scale_up_period_s, self.scale_down_period_s)
        for events in (self._up_events, self._down_events):
            while events and events[0][0] <= now_s - longest:
                events.popleft()
        if desired > current:
            period_s = self.scale_up_period_s
            start = (
                current
                - self._changed_within(self._up_events, now_s, period_s)
                + self._changed_within(self._down_events, now_s, period_s)
            )
            proposals = [
                math.ceil(start * (1 + self.scale_up_percent / 100) - 1e-9),
                start + int(self.scale_up_pods),
            ]
            limit = max(proposals) if self._select_max else min(proposals)
            limit = max(limit, current)
            if desired > limit:
                bounds.append("scale-up-policy")
                return limit
        elif desired < current:
            period_s = self.scale_down_period_s
            start = (
                current
                - self._changed_within(self._up_events, now_s, period_s)
                + self._changed_within(self._down_events, now_s, period_s)
            )
            proposals = [math.floor(start * (1 - self.scale_down_percent / 100) + 1e-9)]
            if self.scale_down_pods > 0:
                proposals.append(start - int(self.scale_down_pods))
            limit = min(*proposals, current)
            if desired < limit:
                bounds.append("scale-down-policy")
                return limit
        return desired

    def _finish(
        self,
        observation: ScaleInput,
        desired: int,
        recommendation: int | None,
        inputs: str,
        per_metric: dict[str, int | None],
        bounds: list[str],
    ) -> Decision:
        return finish_decision(
            self.name,
            self._gate,
            self._spec,
            observation,
            desired,
            recommendation,
            inputs,
            per_metric,
            bounds,
        )
