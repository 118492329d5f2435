"""The controller's own Prometheus metrics (``shoal_autoscale_*``), one registry per controller.

::

    shoal_autoscale_desired_replicas            gauge    what the last decision asked for
    shoal_autoscale_ready_replicas              gauge    ready at the last round
    shoal_autoscale_pending_replicas            gauge    asked for, still starting
    shoal_autoscale_decisions_total{direction}  counter  up, down, hold
    shoal_autoscale_panic                       gauge    1 while the policy is in panic mode
    shoal_autoscale_scrape_failures_total       counter  engine or router scrapes that failed
    shoal_autoscale_round_seconds               histogram one round: state, scrape, decide, scale
    shoal_autoscale_actuator_errors_total       counter  state() or scale() raised
    shoal_autoscale_policy_errors_total         counter  policy.decide raised (round held)
    shoal_autoscale_wakes_total{result}         counter  POST /v1/wake: scaled, already,
                                                         cached (already, from the last
                                                         state read), wrong-model

A registry per instance (not the global one) so tests can run several controllers in one
process without duplicate-metric errors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from control.autoscale.types import Decision, ReplicaState

__all__ = ["AutoscaleMetrics"]


class AutoscaleMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.desired = Gauge(
            "shoal_autoscale_desired_replicas", "Replicas last asked for.", registry=r
        )
        self.ready = Gauge("shoal_autoscale_ready_replicas", "Ready replicas.", registry=r)
        self.pending = Gauge("shoal_autoscale_pending_replicas", "Starting replicas.", registry=r)
        self.decisions = Counter(
            "shoal_autoscale_decisions", "Decisions by direction.", ["direction"], registry=r
        )
        self.panic = Gauge("shoal_autoscale_panic", "1 while the policy panics.", registry=r)
        self.scrape_failures = Counter(
            "shoal_autoscale_scrape_failures", "Failed engine or router scrapes.", registry=r
        )
        self.round_seconds = Histogram(
            "shoal_autoscale_round_seconds",
            "Seconds of one control round.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.actuator_errors = Counter(
            "shoal_autoscale_actuator_errors", "Actuator calls that raised.", registry=r
        )
        self.policy_errors = Counter(
            "shoal_autoscale_policy_errors", "Rounds whose policy raised.", registry=r
        )
        self.wakes = Counter(
            "shoal_autoscale_wakes", "Wake requests by result.", ["result"], registry=r
        )
        for direction in ("up", "down", "hold"):
            self.decisions.labels(direction=direction)
        for result in ("scaled", "already", "cached", "wrong-model"):
            self.wakes.labels(result=result)

    def observe(self, state: ReplicaState, decision: Decision) -> None:
        self.ready.set(state.ready)
        self.pending.set(state.pending)
        self.desired.set(decision.desired)
        self.panic.set(1 if decision.panic else 0)
        if decision.desired > state.spec:
            direction = "up"
        elif decision.desired < state.spec:
            direction = "down"
        else:
            direction = "hold"
        self.decisions.labels(direction=direction).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
