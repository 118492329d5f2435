"""``aibrix-kpa``: AIBrix HEAD's KPA as it really behaves, bugs included (for the simulator).

This is not a policy to run: it exists so ``shoal autoscale simulate`` can show what
AIBrix users get. Modelled on vllm-project/aibrix at e3e10f9 (2026-08-22),
``pkg/controller/podautoscaler/``. Per round:

1. each pod's value is fetched; the values are AVERAGED per pod and the average is
   recorded into a stable (``stable_window_s``, 180 s) and a panic window
   (``panic_window_s``, 60 s) (``metrics/client.go`` ``UpdateMetrics``);
2. panic is decided afresh: ``stable <= 0`` or ``panic / stable > panic_threshold`` (2)
   (``algorithm/kpa.go`` ``shouldEnterPanicMode``);
3. ``dspc = ceil(stable / target)`` and ``dppc = ceil(panic / target)`` unless the value
   is within ``target * (1 +- tolerance)`` (0.1 both), when the current count stays;
   both kept in ``[floor(current / max_scale_down_rate), max(1, ceil(max_scale_up_rate *
   current))]`` (2 and 2), ``current`` being the scale's replica count; in panic the
   larger of the two (``computeTargetReplicas``);
4. the cooldown windows (``podautoscaler_controller.go`` ``stabilizeRecommendation``):
   a recommendation above the current count takes the MAX over the scale-up window
   (0 s), one below the MIN over the scale-down window (300 s); then min/max replicas.

The bugs, each shown by a test in tests/unit/test_autoscale_aibrix_kpa.py:

* **average for total**: step 1 averages per pod but step 3's formula (Knative's) needs
  the total over pods, so the count no longer grows with the number of loaded pods: four
  pods at 0.9 KV usage, target 0.7, ask for 2 (AIBrix's own ``kpa_test.go`` feeds totals,
  so its tests pass);
* **panic rebuilt every cycle**: the ScalingContext is built per reconcile, so
  ``maxPanicPods`` starts at 0 and panic lasts exactly as long as the ratio: a panic
  round can scale down, and panic ends the round the ratio drops (Knative holds it for a
  stable window);
* **most aggressive stabilization**: MAX on the way up and MIN on the way down, the
  opposite of the HPA's damping, so one low sample in 300 s scales down at once;
* **failed scrape = 0**: ``metrics/fetcher.go`` ``FetchPodMetrics`` logs and returns
  ``0.0, nil``: a hung pod lowers the average like an idle one (issue 13);
* **pending ignored**: rates and the tolerance hold use the scale's count, which
  includes starting pods that report nothing, so the same hot ready pods push 2 -> 4 ->
  8 -> 16 (RFC #2670; guarded by PR #2671 after this snapshot).

Kept from Shoal's shared rules: held requests or arrivals wake a zero-replica service
(the controller's ``/v1/wake`` does that for every policy; AIBrix has no activator,
issue #476); all metrics absent (no pod at all) holds. A router metric is used as it is.

Options: ``stable_window_s`` (180), ``panic_window_s`` (60), ``panic_threshold`` (2),
``up_fluctuation_tolerance`` (0.1), ``down_fluctuation_tolerance`` (0.1),
``max_scale_up_rate`` (2), ``max_scale_down_rate`` (2), ``scale_up_cooldown_window_s``
(0), ``scale_down_cooldown_window_s`` (300), ``granularity_s`` (1).
"""

from __future__ import annotations

import math
from collections import deque
from typing import ClassVar

from control.autoscale.policies.base import PolicyOptions, largest_known, register
from control.autoscale.policies.windows import (
    ROUTER_METRICS,
    WindowAverage,
    ZeroGate,
    finish_decision,
)
from control.autoscale.types import Decision, PolicySpec, ScaleInput

__all__ = ["AIBrixKPA"]


def _per_pod_average(observation: ScaleInput, metric: str) -> float | None:
    """AIBrix's value: the mean over every scraped pod, a failed scrape counting 0."""
    if metric in ROUTER_METRICS:
        return observation.router.get(metric)
    if not observation.samples:
        return None
    values = [s.values.get(metric, 0.0) if s.ok else 0.0 for s in observation.samples]
    return sum(values) / len(values)


@register("aibrix-kpa")
class AIBrixKPA:
    """AIBrix HEAD's KPA, bugs included (see the module docstring)."""

    name: ClassVar[str] = "aibrix-kpa"

    def __init__(self, spec: PolicySpec) -> None:
        options = PolicyOptions(self.name, spec.options)
        self.stable_window_s = options.number("stable_window_s", 180.0, minimum=1.0)
        self.panic_window_s = options.number("panic_window_s", 60.0, minimum=1.0)
        self.panic_threshold = options.number("panic_threshold", 2.0, minimum=0.0)
        self.up_tolerance = options.number("up_fluctuation_tolerance", 0.1, minimum=0.0)
        self.down_tolerance = options.number("down_fluctuation_tolerance", 0.1, minimum=0.0)
        self.max_scale_up_rate = options.number("max_scale_up_rate", 2.0, minimum=1.0)
        self.max_scale_down_rate = options.number("max_scale_down_rate", 2.0, minimum=1.0)
        self.up_window_s = options.number("scale_up_cooldown_window_s", 0.0, minimum=0.0)
        self.down_window_s = options.number("scale_down_cooldown_window_s", 300.0, minimum=0.0)
        granularity_s = options.number("granularity_s", 1.0, minimum=0.001)
        options.check()
        self._spec = spec
        self._stable = {
            t.metric: WindowAverage(self.stable_window_s, granularity_s) for t in spec.targets
        }
        self._panic = {
            t.metric: WindowAverage(self.panic_window_s, granularity_s) for t in spec.targets
        }
        self._history: deque[tuple[float, int]] = deque()
        self._gate = ZeroGate(idle_s=0.0)
        self._last_now_s = -math.inf

    def _count(self, value: float, target: float, current: int) -> int:
        low, high = target * (1 - self.down_tolerance), target * (1 + self.up_tolerance)
        return math.ceil(value / target - 1e-9) if value > high or value < low else current

    def decide(self, observation: ScaleInput) -> Decision:
        now_s = observation.now_s
        assert now_s >= self._last_now_s, f"aibrix-kpa: time went backwards ({now_s})"
        self._last_now_s = now_s
        self._gate.observe(observation, self._spec.targets)
        current = observation.spec_replicas  # bug: starting pods count as serving ones
        max_up = max(1, math.ceil(self.max_scale_up_rate * current - 1e-9))
        max_down = math.floor(current / self.max_scale_down_rate + 1e-9)
        per_metric: dict[str, int | None] = {}
        shown: list[str] = []
        panic_any = False
        for target in self._spec.targets:
            value = _per_pod_average(observation, target.metric)
            if value is not None:
                self._stable[target.metric].record(now_s, value)
                self._panic[target.metric].record(now_s, value)
            stable = self._stable[target.metric].average(now_s)
            panic = self._panic[target.metric].average(now_s)
            if stable is None or panic is None:
                per_metric[target.metric] = None
                shown.append(f"{target.metric} unknown")
                continue
            in_panic = stable <= 0 or panic / stable > self.panic_threshold
            panic_any = panic_any or in_panic
            dspc = min(max(self._count(stable, target.target, current), max_down), max_up)
            dppc = min(max(self._count(panic, target.target, current), max_down), max_up)
            per_metric[target.metric] = max(dspc, dppc) if in_panic else dspc
            shown.append(
                f"{target.metric} avg/pod stable {stable:.4g} panic {panic:.4g} "
                f"/{target.target:g}{' PANIC' if in_panic else ''}"
            )
        inputs = (
            f"{'; '.join(shown)}; current {current} (ready {observation.ready_replicas} "
            f"pending {observation.pending_replicas}); windows {self.stable_window_s:g}s/"
            f"{self.panic_window_s:g}s"
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
        bounds: list[str] = []
        if recommendation == max_up and recommendation > current:
            bounds.append("max-scale-up-rate")
        desired = self._stabilize(now_s, recommendation, current)
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
            panic=panic_any,
        )

    def _stabilize(self, now_s: float, recommendation: int, current: int) -> int:
        """AIBrix's ``stabilizeRecommendation``: the most aggressive entry of the window."""
        self._history.append((now_s, recommendation))
        longest = max(self.up_window_s, self.down_window_s)
        while self._history and self._history[0][0] <= now_s - longest:
            self._history.popleft()
        if recommendation == current:
            return current
        window_s = self.up_window_s if recommendation > current else self.down_window_s
        live = [r for t, r in self._history if t > now_s - window_s]
        if not live:
            return recommendation
        return max(live) if recommendation > current else min(live)
