"""The engines daemon's Prometheus metrics (``shoal_engines_*``), one registry per daemon.

::

    shoal_engines_groups{phase}                    gauge     groups per phase at the last round
    shoal_engines_replicas_desired                 gauge     the fleet's replicas
    shoal_engines_ready                            gauge     ready groups
    shoal_engines_group_failures_total{reason}     counter   groups the fleet replaced, by why:
                                                             node_died, worker_died, ...,
                                                             gpu_unhealthy, start_failed
    shoal_engines_replacements_total               counter   the same, all reasons together
    shoal_engines_update_revision_info{revision}   info      the template's revision
    shoal_engines_reconcile_seconds                histogram one fleet round
    shoal_engines_wait_seconds                     histogram a group's wait for capacity:
                                                             created -> first seen placed

Everything is derived from what the fleet reports after each round (``observe``): its
statuses and its replacement totals (``EngineFleet.counters().groups_replaced``), as data
coming up (STYLE.md §5): the fleet does not call its metrics. Failures come from the
totals, not from statuses, because the fleet removes a failed group in the very round that
polled it failed (it never shows as ``failed`` between rounds). A wait is measured to the
round that first saw the group placed, so its precision is one round (``--interval-s``).
A registry per instance (not the global one) so tests can run several daemons in one
process.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from control.ray.types import FAILURE_REASONS, FleetSpec, GroupPhase, GroupStatus

__all__ = ["EnginesMetrics"]

_PLACED = (GroupPhase.STARTING, GroupPhase.READY)


class EnginesMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.groups = Gauge("shoal_engines_groups", "Engine groups per phase.", ["phase"],
                            registry=r)  # fmt: skip
        self.desired = Gauge(
            "shoal_engines_replicas_desired", "Engine groups the fleet keeps.", registry=r
        )
        self.ready = Gauge("shoal_engines_ready", "Ready engine groups.", registry=r)
        self.failures = Counter(
            "shoal_engines_group_failures", "Groups seen failed, by reason.", ["reason"],
            registry=r,
        )  # fmt: skip
        self.replacements = Counter(
            "shoal_engines_replacements", "Failed groups removed from the fleet.", registry=r
        )
        self.revision = Info(
            "shoal_engines_update_revision", "The group template's revision.", registry=r
        )
        self.reconcile_seconds = Histogram(
            "shoal_engines_reconcile_seconds",
            "Seconds of one fleet round.",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.wait_seconds = Histogram(
            "shoal_engines_wait_seconds",
            "Seconds a group waited for capacity (created to placed).",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=r,
        )
        for phase in GroupPhase:
            self.groups.labels(phase=phase.value)
        for reason in FAILURE_REASONS:
            self.failures.labels(reason=reason)
        self.failures.labels(reason="start_failed")
        self._replaced: dict[str, int] = {}  # the fleet's totals at the last observe
        self._placed: set[str] = set()  # ids whose wait was observed, until they leave

    def observe_round(self, seconds: float) -> None:
        self.reconcile_seconds.observe(seconds)

    def observe(
        self,
        spec: FleetSpec,
        statuses: Iterable[GroupStatus],
        now: float,
        replaced: Mapping[str, int],
    ) -> None:
        """One round's view: ``now`` on the clock of the statuses' ``created``; ``replaced``
        the fleet's totals of replaced groups by reason (they only grow)."""
        self.desired.set(spec.replicas)
        self.revision.info({"revision": spec.template.revision})
        counts = dict.fromkeys(GroupPhase, 0)
        present = set()
        for status in statuses:
            counts[status.phase] += 1
            present.add(status.group_id)
            if status.phase in _PLACED and status.group_id not in self._placed:
                self._placed.add(status.group_id)
                self.wait_seconds.observe(max(0.0, now - status.created))
        for phase, count in counts.items():
            self.groups.labels(phase=phase.value).set(count)
        self.ready.set(counts[GroupPhase.READY])
        self._placed &= present
        for reason, total in replaced.items():
            new = total - self._replaced.get(reason, 0)
            assert new >= 0, f"the fleet's replaced total for {reason} went down"
            if new:
                self.failures.labels(reason=reason).inc(new)
                self.replacements.inc(new)
            self._replaced[reason] = total

    def render(self) -> bytes:
        return generate_latest(self.registry)
