"""The fleet's decision, pure: desired spec + its groups' latest statuses -> actions.

One call per control round. Input: ``FleetSpec`` (``replicas`` R of ``template`` at its
``revision``, ``max_surge`` S, ``max_unavailable`` U) and the ``GroupStatus`` of every group
the fleet still owns (groups it already stops are not passed), each with its ``revision``
and ``created`` time (the fleet's clock), plus the GPUs the health feed calls unhealthy
and the groups whose status is ``stale`` (their last poll got no answer: alive, holding
GPUs, but not counted as ready capacity).
Output: ``Actions``: start ``num_start`` groups of the template; stop these groups, each
with why (``Stop.reason``) and whether it is drained first (ready ones leave the router's
discovery file before they stop).

Rules, in the order they are applied:

1. a failed group, or one with a GPU in ``unhealthy``, or one that says it is stopping or
   stopped though the fleet keeps it (stopped from outside), is stopped (reason: its
   failure reason, ``gpu_unhealthy`` or ``stopped``) and counts toward nothing: it is
   replaced by rule 5;
2. a group of an old revision that is not ready serves nothing: stopped (``outdated``);
3. more groups of the current revision than R (scale down): stopped in removal order —
   waiting first, then starting, then ready; newest first within each (``scale_down``);
4. rolling update: old ready groups are stopped (stale ones first, then oldest first,
   ``outdated``) only while ``ready >= R - U`` still holds after each stop, where
   ``ready`` leaves stale groups out, so capacity is kept (U = 0: a new group must be
   ready before an old one goes; a new group whose status is stale is no capacity);
5. start ``min(R - current, R + S - alive - draining)`` groups (never below 0), where
   ``draining`` counts groups retired but still draining (earlier or in this round):
   they hold GPUs;
6. alive groups beyond ``R + S`` (S shrank mid-update) lose their newest unready
   current-revision groups.

Invariants (``tests/unit/test_ray_reconcile.py`` checks them over random histories):

* after the actions, at most ``R + S`` groups are alive, draining ones included, unless
  they were already more and nothing starts (``S`` is taken as 1 when both S and U are 0,
  as Kubernetes refuses that pair: no update could ever progress);
* the fleet's own stops never take ready groups below ``min(ready_before, R - U)``, where
  ``ready_before`` counts healthy ready groups (scale down to R < ready is asked for; its
  stops keep exactly R of them ready when R of them were);
* an update whose new groups keep failing never takes down more than U old ready groups:
  failed new groups are replaced, old ones stay;
* with every group getting ready and none failing, repeated rounds reach exactly R ready
  groups of the current revision and nothing else.

Choices: the decision takes no clock: time enters through ``created`` (removal order) and
the fleet owns the crash-loop backoff (it may start fewer than ``num_start``), so this
function stays a table of rules. Rejected: a per-group state machine here (the group
reports its own phase; duplicating it would let the two disagree), and stopping old
unready groups only when over budget (they hold GPUs a new group may wait for).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from control.ray.types import FleetSpec, GroupPhase, GroupStatus

__all__ = [
    "GPU_UNHEALTHY",
    "OUTDATED",
    "SCALE_DOWN",
    "Actions",
    "Stop",
    "effective_surge",
    "reconcile",
]

SCALE_DOWN = "scale_down"
OUTDATED = "outdated"
GPU_UNHEALTHY = "gpu_unhealthy"

_ALIVE = (GroupPhase.WAITING, GroupPhase.STARTING, GroupPhase.READY)
# removal order for scale down: waiting, then starting, then ready
_REMOVAL_RANK = {GroupPhase.WAITING: 0, GroupPhase.STARTING: 1, GroupPhase.READY: 2}


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop ``group_id`` because of ``reason``: a failure reason of ``types``
    (``node_died`` ...), ``gpu_unhealthy``, ``scale_down`` or ``outdated``. ``drain``:
    the group is ready and healthy; it leaves the discovery file first and stops after
    the fleet's drain time (requests the router already sent it finish)."""

    group_id: str
    reason: str
    drain: bool = False

    @property
    def replaced(self) -> bool:
        """The group was lost (failed or on a sick GPU), not retired by the fleet."""
        return self.reason not in (SCALE_DOWN, OUTDATED)


@dataclass(frozen=True, slots=True)
class Actions:
    num_start: int = 0
    stops: tuple[Stop, ...] = ()

    @property
    def empty(self) -> bool:
        return self.num_start == 0 and not self.stops


def effective_surge(spec: FleetSpec) -> int:
    """``max_surge``, or 1 when both it and ``max_unavailable`` are 0 (no update could
    progress otherwise)."""
    assert spec.max_surge >= 0 and spec.max_unavailable >= 0, f"negative bound in {spec}"
    if spec.max_surge == 0 and spec.max_unavailable == 0:
        return 1
    return spec.max_surge


def _lost_reason(status: GroupStatus, unhealthy: frozenset[str]) -> str:
    """Why the group must be replaced, or "" when it is not lost."""
    if status.phase is GroupPhase.FAILED:
        return status.reason or "failed"
    if status.phase in (GroupPhase.STOPPING, GroupPhase.STOPPED):
        return "stopped"  # a kept group stopped by someone else: lost all the same
    if status.phase in _ALIVE and unhealthy.intersection(status.gpus):
        return GPU_UNHEALTHY
    return ""


def _removal_order(groups: Iterable[GroupStatus]) -> list[GroupStatus]:
    """Unready first (waiting, then starting), newest first within a phase; groups
    created at the same time: the later id first (``group-10`` after ``group-9``)."""
    by_id = sorted(groups, key=lambda g: (len(g.group_id), g.group_id), reverse=True)
    return sorted(by_id, key=lambda g: (_REMOVAL_RANK[g.phase], -g.created))


def reconcile(
    spec: FleetSpec,
    groups: Sequence[GroupStatus],
    *,
    unhealthy: frozenset[str] = frozenset(),
    num_draining: int = 0,
    stale: frozenset[str] = frozenset(),
) -> Actions:
    """The actions of one round (rules 1-6 of the module docstring)."""
    assert spec.replicas >= 0, f"replicas {spec.replicas} < 0"
    replicas, surge = spec.replicas, effective_surge(spec)
    min_ready = max(0, replicas - spec.max_unavailable)
    revision = spec.template.revision
    stops: list[Stop] = []

    alive: list[GroupStatus] = []
    for status in groups:
        reason = _lost_reason(status, unhealthy)
        if reason:  # rule 1
            stops.append(Stop(status.group_id, reason))
        else:
            alive.append(status)

    current = [g for g in alive if g.revision == revision]
    old = [g for g in alive if g.revision != revision]
    old_ready = [g for g in old if g.phase is GroupPhase.READY]
    for status in old:  # rule 2
        if status.phase is not GroupPhase.READY:
            stops.append(Stop(status.group_id, OUTDATED))

    surplus = len(current) - replicas  # rule 3
    if surplus > 0:
        leaving = _removal_order(current)[:surplus]
        for status in leaving:
            ready = status.phase is GroupPhase.READY
            stops.append(Stop(status.group_id, SCALE_DOWN, drain=ready))
        current = [g for g in current if g not in leaving]

    num_ready = sum(  # rule 4: stale groups are no capacity
        1 for g in old_ready + current if g.phase is GroupPhase.READY and g.group_id not in stale
    )
    num_retire = min(len(old_ready), max(0, num_ready - min_ready))
    retiring = sorted(
        old_ready,
        key=lambda g: (g.group_id not in stale, g.created, len(g.group_id), g.group_id),
    )[:num_retire]
    stops.extend(Stop(g.group_id, OUTDATED, drain=True) for g in retiring)
    num_alive = len(current) + len(old_ready) - num_retire

    num_draining += sum(1 for stop in stops if stop.drain)  # retired now, still serving
    budget = replicas + surge - num_alive - num_draining  # rule 5
    num_start = max(0, min(replicas - len(current), budget))

    over = num_alive - (replicas + surge)  # rule 6
    if over > 0:
        unready = [g for g in _removal_order(current) if g.phase is not GroupPhase.READY]
        stops.extend(Stop(g.group_id, SCALE_DOWN) for g in unready[:over])
    return Actions(num_start, tuple(stops))
