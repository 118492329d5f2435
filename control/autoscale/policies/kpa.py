"""``kpa``: Knative's Pod Autoscaler, faithfully, on Shoal's signals.

Algorithm (knative/serving ``pkg/autoscaler/scaling/autoscaler.go``, ``Scale``), per round:

1. Each target's observed value is the service-wide TOTAL (KV usage, running requests,
   ... summed over replicas; ``observed_total``), recorded into a stable window
   (``stable_window_s``, 60 s) and a panic window (``panic_window_percentage`` of it, 10%,
   so 6 s), each averaged over per-second buckets (``windows.WindowAverage``).
2. ``desired_stable = ceil(stable / target)``, ``desired_panic = ceil(panic / target)``;
   with several targets the largest known of each wins.
3. Both are kept in ``[floor(ready / max_scale_down_rate), ceil(max_scale_up_rate * ready)]``
   (``ready`` at least 1 for the rates; defaults 2 and 1000, relative to READY replicas).
4. Panic starts when ``desired_panic / ready >= panic_threshold_percentage / 100`` (200%)
   and is held until a full stable window has passed with no round over the threshold;
   in panic the count never goes down (the largest panic count so far is kept).
5. ``scale_down_delay_s`` (0): the count is the maximum over that window.
6. Scale to zero (``min_replicas == 0``) once the service has been idle for the stable
   window plus ``scale_to_zero_grace_s`` (30 s); from zero, held requests or arrivals ask
   for at least one replica (Knative's activator does both in its request path).

How it fails: a metric nobody reported is unknown; when every target is unknown (or its
windows hold nothing) the policy keeps ``spec_replicas`` as Knative returns an invalid
scale result on ``ErrNoData``. A failed scrape of one replica makes the total the
reporting replicas' mean times the ready ones (Knative's scraper extrapolates a sample
alike), so a hung replica neither idles nor vanishes.

Where ours differs from Knative: windows skip the seconds between control rounds instead
of counting them as 0 (see ``windows``); several targets instead of one metric; pending
replicas: Knative's desired count is absolute (``ceil(total/target)``), so what is already
asked for counts: while replicas start, the same load asks for the same count, not more
(the rates stay relative to ready replicas, as Knative's); ``activation_scale`` as in
Knative; no excess-burst-capacity (the router, not the activator, holds requests).

Options (Knative's annotation names in snake_case): ``stable_window_s`` (60, at least 6),
``panic_window_percentage`` (10) or ``panic_window_s``, ``panic_threshold_percentage``
(200) or ``panic_threshold`` (the same as a ratio, 2, AIBrix's name), ``max_scale_up_rate`` (1000),
``max_scale_down_rate`` (2), ``scale_down_delay_s`` (0), ``scale_to_zero_grace_s`` (30),
``activation_scale`` (1), ``granularity_s`` (1).
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

from control.autoscale.errors import PolicyConfigError
from control.autoscale.policies.base import PolicyOptions, largest_known, register
from control.autoscale.policies.windows import (
    RecommendationWindow,
    WindowAverage,
    ZeroGate,
    finish_decision,
    observed_total,
)
from control.autoscale.types import Decision, PolicySpec, ScaleInput

__all__ = ["KnativePodAutoscaler"]

logger = logging.getLogger("shoal." + __name__)


@register("kpa")
class KnativePodAutoscaler:
    """Knative's KPA: stable and panic windows on the total, held panic, rate limits."""

    name: ClassVar[str] = "kpa"

    def __init__(self, spec: PolicySpec) -> None:
        options = PolicyOptions(self.name, spec.options)
        # Knative's bounds: a stable window of at least 6 s, a panic percentage >= 1
        self.stable_window_s = options.number("stable_window_s", 60.0, minimum=6.0)
        percentage = options.number("panic_window_percentage", 10.0, minimum=1.0)
        self.panic_window_s = options.number(
            "panic_window_s", self.stable_window_s * percentage / 100.0, minimum=0.001
        )
        percent = options.number("panic_threshold_percentage", 200.0, minimum=100.0)
        self.panic_threshold = options.number("panic_threshold", percent / 100.0, minimum=1.0)
        self.max_scale_up_rate = options.number("max_scale_up_rate", 1000.0, minimum=1.0)
        self.max_scale_down_rate = options.number("max_scale_down_rate", 2.0, minimum=1.0)
        self.scale_down_delay_s = options.number("scale_down_delay_s", 0.0, minimum=0.0)
        grace_s = options.number("scale_to_zero_grace_s", 30.0, minimum=0.0)
        self.activation_scale = int(options.number("activation_scale", 1.0, minimum=1.0))
        granularity_s = options.number("granularity_s", 1.0, minimum=0.001)
        options.check()
        for pair in (
            ("panic_window_s", "panic_window_percentage"),
            ("panic_threshold", "panic_threshold_percentage"),
        ):
            if all(name in spec.options for name in pair):
                raise PolicyConfigError(f"policy kpa: give {pair[0]} or {pair[1]}, not both")
        if self.panic_window_s > self.stable_window_s:
            raise PolicyConfigError(
                f"policy kpa: panic window {self.panic_window_s}s is longer than the stable "
                f"window {self.stable_window_s}s; lower panic_window_percentage"
            )
        self._spec = spec
        self._stable = {
            t.metric: WindowAverage(self.stable_window_s, granularity_s) for t in spec.targets
        }
        self._panic = {
            t.metric: WindowAverage(self.panic_window_s, granularity_s) for t in spec.targets
        }
        self._delay = (
            RecommendationWindow(self.scale_down_delay_s) if self.scale_down_delay_s > 0 else None
        )
        self._gate = ZeroGate(idle_s=self.stable_window_s + grace_s)
        self._panic_time_s: float | None = None
        self._max_panic_pods = 0
        self._last_now_s = -math.inf

    @property
    def panicking(self) -> bool:
        return self._panic_time_s is not None

    def decide(self, observation: ScaleInput) -> Decision:
        now_s = observation.now_s
        assert now_s >= self._last_now_s, (
            f"kpa: time went backwards ({now_s} after {self._last_now_s})"
        )
        self._last_now_s = now_s
        self._gate.observe(observation, self._spec.targets)

        stable_counts: dict[str, int | None] = {}
        panic_counts: dict[str, int | None] = {}
        shown: list[str] = []
        for target in self._spec.targets:
            total = observed_total(observation, target.metric)
            if total is not None:
                self._stable[target.metric].record(now_s, total)
                self._panic[target.metric].record(now_s, total)
            stable = self._stable[target.metric].average(now_s)
            panic = self._panic[target.metric].average(now_s)
            if stable is None:
                stable_counts[target.metric] = panic_counts[target.metric] = None
                shown.append(f"{target.metric} unknown")
                continue
            if panic is None:  # nothing in the last panic window: judge on the stable one
                panic = stable
            stable_counts[target.metric] = math.ceil(stable / target.target - 1e-9)
            panic_counts[target.metric] = math.ceil(panic / target.target - 1e-9)
            shown.append(
                f"{target.metric} stable {stable:.4g} panic {panic:.4g} /{target.target:g}"
            )

        ready = observation.ready_replicas
        inputs = (
            f"{'; '.join(shown)}; ready {ready} pending {observation.pending_replicas} "
            f"spec {observation.spec_replicas}; windows {self.stable_window_s:g}s/"
            f"{self.panic_window_s:g}s"
        )
        dspc = largest_known(stable_counts.values())
        dppc = largest_known(panic_counts.values())
        if dspc is None or dppc is None:
            return self._hold(observation, inputs, stable_counts)

        bounds: list[str] = []
        ready_for_rates = max(1, ready)
        max_up = math.ceil(self.max_scale_up_rate * ready_for_rates)
        max_down = math.floor(ready_for_rates / self.max_scale_down_rate) if ready > 0 else 0
        desired_stable = min(max(dspc, max_down), max_up)
        desired_panic = min(max(dppc, max_down), max_up)
        if self.activation_scale > 1:
            if dspc > 0:
                desired_stable = max(desired_stable, self.activation_scale)
            if dppc > 0:
                desired_panic = max(desired_panic, self.activation_scale)

        over_threshold = dppc / ready_for_rates >= self.panic_threshold
        if over_threshold:
            if self._panic_time_s is None:
                logger.info("kpa: panicking (panic count %d on %d ready)", dppc, ready)
            self._panic_time_s = now_s
        elif self._panic_time_s is not None and now_s - self._panic_time_s > self.stable_window_s:
            logger.info("kpa: un-panicking after a stable window below the threshold")
            self._panic_time_s = None
            self._max_panic_pods = 0

        recommendation = dspc
        desired = desired_stable
        if self._panic_time_s is not None:
            recommendation = max(dspc, dppc)
            desired = max(desired, desired_panic)
        if recommendation > max_up:
            bounds.append("max-scale-up-rate")
        elif recommendation < max_down:
            bounds.append("max-scale-down-rate")
        if self._panic_time_s is not None:
            if desired > self._max_panic_pods:
                self._max_panic_pods = desired
            elif desired < self._max_panic_pods:
                bounds.append("panic-hold")
            desired = self._max_panic_pods

        if self._delay is not None:
            self._delay.record(now_s, desired)
            delayed = self._delay.max()
            if delayed != desired:
                bounds.append("scale-down-delay")
                desired = delayed

        per_metric = stable_counts
        if self._panic_time_s is not None:
            per_metric = {
                m: None if s is None else max(s, panic_counts[m] or 0)
                for m, s in stable_counts.items()
            }
        return self._finish(observation, desired, recommendation, inputs, per_metric, bounds)

    def _hold(
        self, observation: ScaleInput, inputs: str, per_metric: dict[str, int | None]
    ) -> Decision:
        return self._finish(
            observation,
            observation.spec_replicas,
            None,
            inputs + "; all unknown: hold",
            per_metric,
            [],
        )

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
            panic=self.panicking,
        )
