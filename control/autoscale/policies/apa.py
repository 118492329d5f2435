"""``apa``: AIBrix's Application-specific Pod Autoscaler (tolerance bands, scale rates).

Algorithm (vllm-project/aibrix ``pkg/controller/podautoscaler/algorithm/apa.go``, after
Huo et al. 2023, "High Concurrency Response Strategy based on Kubernetes HPA"), per round
and target:

* the per-replica value (mean over the replicas that reported it; a router total divided
  by the ready replicas) is averaged over ``stable_window_s`` (AIBrix's
  ``ObserveWindowSeconds``, 180 s; APA reads the stable window only);
* ``ratio = value / target``; above ``1 + up_fluctuation_tolerance`` (0.1):
  ``ceil(ready * ratio)`` capped at ``ceil(max_scale_up_rate * ready)`` (2);
  below ``1 - down_fluctuation_tolerance`` (0.2, AIBrix's APA sample): ``ceil(ready *
  ratio)`` floored at ``floor(ready / max_scale_down_rate)`` (2); inside the band the
  current count stays;
* the largest target's count wins; then the cooldown windows
  (``scale_up_cooldown_window_s`` 0 s, ``scale_down_cooldown_window_s`` 300 s).

Where ours differs from AIBrix HEAD (e3e10f9, 2026-08-22) on purpose:

* pending replicas count: AIBrix multiplies the ratio and the rates by the *spec* count,
  which includes replicas that are starting and report nothing, so the same hot ready
  replicas ask for 4, 8, 16 (RFC #2670, later guarded by PR #2671). Ours multiplies by
  the ready replicas that produced the ratio, and "inside the band" keeps the spec count
  (what is already asked for);
* the cooldown windows are stabilized the HPA-correct way (scale-up: the smallest
  recommendation in its window; scale-down: the largest in its window), not AIBrix's
  ``stabilizeRecommendation`` that picks the most aggressive one in each (``aibrix-kpa``
  keeps that bug);
* a failed scrape is unknown (excluded from the mean; all unknown holds), not 0;
* scale to zero (``min_replicas == 0``) after the stable window plus
  ``scale_to_zero_grace_s`` (30 s) of idleness; held requests or arrivals wake it.

Options: ``up_fluctuation_tolerance`` (0.1), ``down_fluctuation_tolerance`` (0.2),
``max_scale_up_rate`` (2), ``max_scale_down_rate`` (2), ``stable_window_s`` (180),
``scale_up_cooldown_window_s`` (0), ``scale_down_cooldown_window_s`` (300),
``scale_to_zero_grace_s`` (30), ``granularity_s`` (1).
"""

from __future__ import annotations

import math
from typing import ClassVar

from control.autoscale.policies.base import PolicyOptions, largest_known, register
from control.autoscale.policies.windows import (
    RecommendationWindow,
    WindowAverage,
    ZeroGate,
    finish_decision,
    observed_per_replica,
)
from control.autoscale.types import Decision, PolicySpec, ScaleInput

__all__ = ["AppPodAutoscaler"]


@register("apa")
class AppPodAutoscaler:
    """AIBrix's APA: a ratio with up/down fluctuation bands and rate limits."""

    name: ClassVar[str] = "apa"

    def __init__(self, spec: PolicySpec) -> None:
        options = PolicyOptions(self.name, spec.options)
        self.up_tolerance = options.number("up_fluctuation_tolerance", 0.1, minimum=0.0)
        self.down_tolerance = options.number("down_fluctuation_tolerance", 0.2, minimum=0.0)
        self.max_scale_up_rate = options.number("max_scale_up_rate", 2.0, minimum=1.0)
        self.max_scale_down_rate = options.number("max_scale_down_rate", 2.0, minimum=1.0)
        self.stable_window_s = options.number("stable_window_s", 180.0, minimum=1.0)
        up_window_s = options.number("scale_up_cooldown_window_s", 0.0, minimum=0.0)
        down_window_s = options.number("scale_down_cooldown_window_s", 300.0, minimum=0.0)
        grace_s = options.number("scale_to_zero_grace_s", 30.0, minimum=0.0)
        granularity_s = options.number("granularity_s", 1.0, minimum=0.001)
        options.check()
        self._spec = spec
        self._values = {
            t.metric: WindowAverage(self.stable_window_s, granularity_s) for t in spec.targets
        }
        self._up = RecommendationWindow(up_window_s)
        self._down = RecommendationWindow(down_window_s)
        self._gate = ZeroGate(idle_s=self.stable_window_s + grace_s)
        self._last_now_s = -math.inf

    def decide(self, observation: ScaleInput) -> Decision:
        now_s = observation.now_s
        assert now_s >= self._last_now_s, f"apa: time went backwards ({now_s})"
        self._last_now_s = now_s
        self._gate.observe(observation, self._spec.targets)
        ready = observation.ready_replicas
        current = observation.spec_replicas
        per_metric: dict[str, int | None] = {}
        shown: list[str] = []
        rate_bounds: dict[str, str] = {}  # metric -> the rate that limited its count
        for target in self._spec.targets:
            value = observed_per_replica(observation, target.metric)
            if value is not None:
                self._values[target.metric].record(now_s, value)
            average = self._values[target.metric].average(now_s)
            if average is None or ready == 0:
                per_metric[target.metric] = None
                shown.append(f"{target.metric} unknown")
                continue
            ratio = average / target.target
            shown.append(f"{target.metric} {average:.4g}/{target.target:g} = {ratio:.3f}")
            if ratio > 1 + self.up_tolerance:
                expected = math.ceil(ready * ratio - 1e-9)
                max_up = math.ceil(self.max_scale_up_rate * ready - 1e-9)
                if expected > max_up:
                    expected, rate_bounds[target.metric] = max_up, "max-scale-up-rate"
            elif ratio < 1 - self.down_tolerance:
                expected = math.ceil(ready * ratio - 1e-9)
                max_down = math.floor(ready / self.max_scale_down_rate + 1e-9)
                if expected < max_down:
                    expected, rate_bounds[target.metric] = max_down, "max-scale-down-rate"
            else:
                expected = current
            per_metric[target.metric] = expected
        inputs = (
            f"{'; '.join(shown)}; band -{self.down_tolerance:g}/+{self.up_tolerance:g}; "
            f"ready {ready} pending {observation.pending_replicas} spec {current}; "
            f"window {self.stable_window_s:g}s"
        )
        recommendation = largest_known(per_metric.values())
        if recommendation is None:
            return finish_decision(
                self.name,
                self._gate,
                self._spec,
                observation,
                current,
                None,
                inputs + "; all unknown: hold",
                per_metric,
                [],
            )
        winner = next(m for m, r in per_metric.items() if r == recommendation)
        bounds = [rate_bounds[winner]] if winner in rate_bounds else []
        self._up.record(now_s, recommendation)
        self._down.record(now_s, recommendation)
        desired = min(max(current, self._up.min()), self._down.max())
        if desired != recommendation:
            bounds.append("cooldown")
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
