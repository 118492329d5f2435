"""The planner's own Prometheus metrics (``shoal_placement_*``), one registry per planner.

::

    shoal_placement_solve_seconds               histogram  one solve (the round's optimum)
    shoal_placement_solves_total{status}        counter    optimal, time_limit, greedy, capped,
                                                           empty, infeasible, error
    shoal_placement_errors_total{stage}         counter    fetch (the router's request sizes),
                                                           solve, state, scale (a pool)
    shoal_placement_plan_cost                   gauge      the plan in force, per hour
    shoal_placement_lp_bound                    gauge      its LP relaxation (NaN: none)
    shoal_placement_greedy_cost                 gauge      the greedy answer's cost (NaN: none)
    shoal_placement_target_replicas{gpu_type}   gauge      replicas asked of each pool
    shoal_placement_ready_replicas{gpu_type}    gauge      ready in each pool at the last round
    shoal_placement_workload_rate               gauge      requests/s planned for (headroom in)
    shoal_placement_window_requests             gauge      requests in the last window
    shoal_placement_unserved_share              gauge      share of the window's requests in
                                                           cells no GPU type serves (left out)
    shoal_placement_wakes_total{result}         counter    POST /v1/wake: scaled, already,
                                                           wrong-model, failed

A registry per instance (not the global one) so tests can run several planners in one
process without duplicate-metric errors, as ``control.autoscale.metrics``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from control.placement.types import Plan

__all__ = ["SOLVE_STATUSES", "PlacementMetrics"]

SOLVE_STATUSES = ("optimal", "time_limit", "greedy", "capped", "empty", "infeasible", "error")
WAKE_RESULTS = ("scaled", "already", "wrong-model", "failed")
ERROR_STAGES = ("fetch", "solve", "state", "scale")


class PlacementMetrics:
    def __init__(self, gpus: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.solve_seconds = Histogram(
            "shoal_placement_solve_seconds",
            "Seconds of one solve.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.solves = Counter("shoal_placement_solves", "Solves by status.", ["status"], registry=r)
        self.errors = Counter(
            "shoal_placement_errors", "Failed round stages.", ["stage"], registry=r
        )
        self.plan_cost = Gauge(
            "shoal_placement_plan_cost", "Cost of the plan in force.", registry=r
        )
        self.lp_bound = Gauge("shoal_placement_lp_bound", "LP bound of the plan.", registry=r)
        self.greedy_cost = Gauge(
            "shoal_placement_greedy_cost", "Greedy cost on the plan's problem.", registry=r
        )
        self.target = Gauge(
            "shoal_placement_target_replicas", "Replicas asked per GPU type.", ["gpu_type"],
            registry=r,
        )  # fmt: skip
        self.ready = Gauge(
            "shoal_placement_ready_replicas", "Ready replicas per GPU type.", ["gpu_type"],
            registry=r,
        )  # fmt: skip
        self.workload_rate = Gauge(
            "shoal_placement_workload_rate", "Requests/s planned for.", registry=r
        )
        self.window_requests = Gauge(
            "shoal_placement_window_requests", "Requests in the last window.", registry=r
        )
        self.unserved_share = Gauge(
            "shoal_placement_unserved_share",
            "Share of the window's requests in cells no GPU type serves.",
            registry=r,
        )
        self.wakes = Counter(
            "shoal_placement_wakes", "POST /v1/wake by result.", ["result"], registry=r
        )
        for result in WAKE_RESULTS:
            self.wakes.labels(result=result)
        for status in SOLVE_STATUSES:
            self.solves.labels(status=status)
        for stage in ERROR_STAGES:
            self.errors.labels(stage=stage)
        for gpu in gpus:
            self.target.labels(gpu_type=gpu)
            self.ready.labels(gpu_type=gpu)
        self.lp_bound.set(math.nan)
        self.greedy_cost.set(math.nan)

    def observe_plan(self, plan: Plan) -> None:
        self.plan_cost.set(plan.cost)
        self.lp_bound.set(math.nan if plan.lp_bound is None else plan.lp_bound)
        self.greedy_cost.set(math.nan if plan.greedy_cost is None else plan.greedy_cost)

    def render(self) -> bytes:
        return generate_latest(self.registry)
