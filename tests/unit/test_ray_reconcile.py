"""control.ray.reconcile: exact scenarios, then the invariants over random histories."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from control.ray.reconcile import (
    GPU_UNHEALTHY,
    OUTDATED,
    SCALE_DOWN,
    Actions,
    Stop,
    effective_surge,
    reconcile,
)
from control.ray.types import FleetSpec, GroupPhase, GroupSpec, GroupStatus

W, S, R, F = GroupPhase.WAITING, GroupPhase.STARTING, GroupPhase.READY, GroupPhase.FAILED


def fleet(replicas: int, revision: str = "1", surge: int = 1, unavailable: int = 0) -> FleetSpec:
    template = GroupSpec(model="m", engine_command="sim {port}", revision=revision)
    return FleetSpec(template, replicas, max_surge=surge, max_unavailable=unavailable)


def group(
    gid: str,
    phase: GroupPhase,
    created: float,
    revision: str = "1",
    *,
    gpus: tuple[str, ...] = (),
    reason: str = "",
) -> GroupStatus:
    return GroupStatus(gid, phase, revision, created, gpus=gpus, reason=reason)


# -- scenarios ---------------------------------------------------------------------------


def test_empty_fleet_starts_replicas() -> None:
    assert reconcile(fleet(3), []) == Actions(3)


def test_steady_state_does_nothing() -> None:
    groups = [group("a", R, 1), group("b", S, 2), group("c", W, 3)]
    assert reconcile(fleet(3), groups).empty


def test_failed_group_is_stopped_and_replaced() -> None:
    groups = [group("a", R, 1), group("b", F, 2, reason="node_died")]
    assert reconcile(fleet(2), groups) == Actions(1, (Stop("b", "node_died"),))


def test_group_on_unhealthy_gpu_is_stopped_without_drain_and_replaced() -> None:
    groups = [group("a", R, 1, gpus=("n1/gpu0",)), group("b", R, 2, gpus=("n2/gpu0", "n2/gpu1"))]
    actions = reconcile(fleet(2), groups, unhealthy=frozenset({"n2/gpu1"}))
    assert actions == Actions(1, (Stop("b", GPU_UNHEALTHY),))
    assert actions.stops[0].replaced


def test_scale_down_removes_waiting_then_starting_then_newest_ready() -> None:
    groups = [
        group("r-old", R, 1),
        group("r-new", R, 5),
        group("s-old", S, 2),
        group("s-new", S, 6),
        group("w-old", W, 3),
        group("w-new", W, 7),
    ]
    actions = reconcile(fleet(1), groups)
    assert actions == Actions(
        0,
        (
            Stop("w-new", SCALE_DOWN),
            Stop("w-old", SCALE_DOWN),
            Stop("s-new", SCALE_DOWN),
            Stop("s-old", SCALE_DOWN),
            Stop("r-new", SCALE_DOWN, drain=True),
        ),
    )
    assert not actions.stops[0].replaced


def test_rolling_update_max_unavailable_zero_waits_for_a_new_ready_group() -> None:
    spec = fleet(2, revision="2", surge=1, unavailable=0)
    old = [group("o1", R, 1), group("o2", R, 2)]
    # round 1: one surge group, nothing stopped
    assert reconcile(spec, old) == Actions(1)
    # the new one is starting: nothing more
    assert reconcile(spec, [*old, group("n1", S, 3, "2")]).empty
    # it is ready: the oldest old group drains (and holds its GPUs while it does)
    actions = reconcile(spec, [*old, group("n1", R, 3, "2")])
    assert actions == Actions(0, (Stop("o1", OUTDATED, drain=True),))
    # drained: the next new one starts
    assert reconcile(spec, [old[1], group("n1", R, 3, "2")]) == Actions(1)
    # last step: the second new one ready, the last old one goes
    actions = reconcile(spec, [old[1], group("n1", R, 3, "2"), group("n2", R, 4, "2")])
    assert actions == Actions(0, (Stop("o2", OUTDATED, drain=True),))


def test_a_stale_group_is_no_capacity_and_stale_old_ones_retire_first() -> None:
    spec = fleet(2, revision="2", surge=1, unavailable=0)
    old = [group("o1", R, 1), group("o2", R, 2)]
    groups = [*old, group("n1", R, 3, "2")]
    # the new group's status is stale: it may be gone, so no old group goes for it
    assert reconcile(spec, groups, stale=frozenset({"n1"})).empty
    # an old group's status is stale: the known ready ones (o1, n1) are R; nothing goes
    assert reconcile(spec, groups, stale=frozenset({"o2"})).empty
    # with one ready beyond R - U, the stale old group retires before older known ones
    spec = fleet(2, revision="2", surge=1, unavailable=1)
    actions = reconcile(spec, groups, stale=frozenset({"o2"}))
    assert actions == Actions(0, (Stop("o2", OUTDATED, drain=True),))


def test_rolling_update_surge_zero_unavailable_one_stops_first() -> None:
    spec = fleet(3, revision="2", surge=0, unavailable=1)
    old = [group("o1", R, 1), group("o2", R, 2), group("o3", R, 3)]
    assert reconcile(spec, old) == Actions(0, (Stop("o1", OUTDATED, drain=True),))
    assert reconcile(spec, old[1:]) == Actions(1)  # o1 drained
    # the new one starts: ready is 2 = R - U, nothing more may go
    assert reconcile(spec, [*old[1:], group("n1", S, 4, "2")]).empty


def test_update_whose_new_groups_fail_keeps_old_ones() -> None:
    spec = fleet(2, revision="2", surge=1, unavailable=0)
    old = [group("o1", R, 1), group("o2", R, 2)]
    groups = [*old, group("n1", F, 3, "2", reason="engine_exited")]
    assert reconcile(spec, groups) == Actions(1, (Stop("n1", "engine_exited"),))


def test_old_unready_groups_are_stopped_at_once() -> None:
    spec = fleet(1, revision="2")
    groups = [group("o1", R, 1), group("o2", W, 2)]
    assert reconcile(spec, groups) == Actions(1, (Stop("o2", OUTDATED),))


def test_surge_shrunk_mid_update_trims_newest_unready() -> None:
    spec = fleet(1, revision="2", surge=0, unavailable=0)  # surge taken as 1
    assert effective_surge(spec) == 1
    groups = [group("o1", R, 1), group("n1", S, 2, "2"), group("n2", W, 3, "2")]
    actions = reconcile(spec, groups)
    # one current too many (rule 3 takes the waiting one); then 2 alive = R + 1: no trim
    assert actions == Actions(0, (Stop("n2", SCALE_DOWN),))


def test_draining_groups_use_the_surge_budget() -> None:
    spec = fleet(2, revision="2", surge=1, unavailable=0)
    groups = [group("o2", R, 2), group("n1", R, 3, "2")]
    # o1 was retired last round and still drains: ready = 2 keeps o2, nothing may start
    assert reconcile(spec, groups, num_draining=1).empty
    assert reconcile(spec, groups) == Actions(1)
    # a group retired in this round drains too: no start in the same round
    groups = [group("o2", R, 2), group("n1", R, 3, "2"), group("n2", R, 4, "2")]
    assert reconcile(fleet(2, "2", surge=1), groups) == Actions(0, (Stop("o2", OUTDATED, True),))


def test_kept_group_stopped_from_outside_is_replaced() -> None:
    groups = [group("a", GroupPhase.STOPPING, 1), group("b", GroupPhase.STOPPED, 2)]
    assert reconcile(fleet(2), groups) == Actions(2, (Stop("a", "stopped"), Stop("b", "stopped")))


# -- invariants over random histories ----------------------------------------------------

EVENTS = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 20)),
    st.tuples(st.just("fail"), st.integers(0, 20)),
    st.tuples(st.just("sick"), st.integers(0, 20)),
    st.tuples(st.just("scale"), st.integers(0, 5)),
    st.tuples(st.just("update"), st.integers(0, 0)),
    st.tuples(st.just("bounds"), st.integers(0, 3)),
    st.tuples(st.just("round"), st.integers(0, 0)),
    st.tuples(st.just("stopped"), st.integers(0, 20)),
)


class World:
    """Groups the fleet owns, moved by random events and by reconcile's actions."""

    def __init__(self) -> None:
        self.spec = fleet(2, surge=1, unavailable=0)
        self.groups: dict[str, GroupStatus] = {}
        self.unhealthy: set[str] = set()
        self.seq = 0
        self.now = 0.0
        self.draining: dict[str, int] = {}  # retired ready groups -> rounds left to drain

    def nth(self, i: int) -> GroupStatus | None:
        alive = sorted(self.groups.values(), key=lambda g: g.group_id)
        return alive[i % len(alive)] if alive else None

    def event(self, kind: str, arg: int) -> None:
        self.now += 1.0
        g = self.nth(arg)
        if kind == "advance" and g is not None and g.phase in (W, S):
            self.groups[g.group_id] = replace(g, phase=S if g.phase is W else R)
        elif kind == "fail" and g is not None and g.phase is not F:
            self.groups[g.group_id] = replace(g, phase=F, reason="node_died")
        elif kind == "stopped" and g is not None:
            self.groups[g.group_id] = replace(g, phase=GroupPhase.STOPPED)
        elif kind == "sick" and g is not None and g.phase is not F:
            self.unhealthy.add(g.gpus[0])
        elif kind == "scale":
            self.spec = replace(self.spec, replicas=arg)
        elif kind == "update":
            template = self.spec.template
            self.spec = replace(
                self.spec, template=replace(template, revision=str(int(template.revision) + 1))
            )
        elif kind == "bounds":
            self.spec = replace(self.spec, max_surge=arg % 2 + arg // 2, max_unavailable=arg % 2)

    def round(self) -> Actions:
        before = list(self.groups.values())
        unhealthy = frozenset(self.unhealthy)
        self.draining = {gid: n - 1 for gid, n in self.draining.items() if n > 1}
        num_draining = len(self.draining)
        actions = reconcile(self.spec, before, unhealthy=unhealthy, num_draining=num_draining)
        check(self.spec, before, unhealthy, actions, num_draining)
        for stop in actions.stops:
            del self.groups[stop.group_id]
            if stop.drain:
                self.draining[stop.group_id] = 2
        for _ in range(actions.num_start):
            self.seq += 1
            gid = f"g{self.seq:03d}"
            rev = self.spec.template.revision
            self.groups[gid] = GroupStatus(gid, W, rev, self.now, gpus=(f"{gid}/gpu0",))
        return actions


def check(
    spec: FleetSpec,
    before: list[GroupStatus],
    unhealthy: frozenset[str],
    actions: Actions,
    num_draining: int = 0,
) -> None:
    stopped = {s.group_id: s for s in actions.stops}
    assert len(stopped) == len(actions.stops), "a group stopped twice"
    assert actions.num_start >= 0
    lost = {g.group_id for g in before if g.phase is F or unhealthy.intersection(g.gpus)}
    lost |= {g.group_id for g in before if g.phase in (GroupPhase.STOPPING, GroupPhase.STOPPED)}
    assert lost <= set(stopped), "a failed or sick group was kept"
    assert all(stopped[gid].replaced for gid in lost)
    after = [g for g in before if g.group_id not in stopped]
    assert len(after) + actions.num_start <= spec.replicas + effective_surge(spec)
    if actions.num_start:  # draining groups hold GPUs: they count toward the surge
        assert len(after) + actions.num_start + num_draining <= spec.replicas + effective_surge(
            spec
        )
    ready_before = sum(1 for g in before if g.phase is R and g.group_id not in lost)
    ready_after = sum(1 for g in after if g.phase is R)
    floor = min(ready_before, max(0, spec.replicas - spec.max_unavailable))
    assert ready_after >= floor, f"ready {ready_before} -> {ready_after} under {floor}"
    for stop in actions.stops:  # only ready healthy groups drain
        group_ = next(g for g in before if g.group_id == stop.group_id)
        assert stop.drain == (group_.phase is R and not stop.replaced)
    current = [g for g in after if g.revision == spec.template.revision]
    assert len(current) + actions.num_start <= spec.replicas


def converge(world: World) -> None:
    """Every group gets ready, nothing fails: a fixed point of R current ready groups."""
    world.unhealthy.clear()
    for _ in range(60):
        world.round()
        for gid, g in world.groups.items():
            world.groups[gid] = replace(g, phase=R)
    assert world.round().empty
    revision = world.spec.template.revision
    assert len(world.groups) == world.spec.replicas
    assert all(g.phase is R and g.revision == revision for g in world.groups.values())


@settings(max_examples=300, deadline=None)
@given(st.lists(EVENTS, max_size=60))
def test_invariants_hold_over_random_histories(events: list[tuple[str, int]]) -> None:
    world = World()
    world.round()
    for kind, arg in events:
        if kind == "round":
            world.round()
        else:
            world.event(kind, arg)
    world.round()
    converge(world)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(0, 2),
    st.lists(st.integers(0, 30), max_size=40),
)
def test_failing_update_never_takes_old_below_replicas(
    replicas: int, surge: int, schedule: list[int]
) -> None:
    """max_unavailable=0 and every new-revision group fails at some point: the old
    revision's ready groups stay at ``replicas`` throughout."""
    world = World()
    world.spec = fleet(replicas, surge=surge, unavailable=0)
    converge(world)
    world.event("update", 0)
    for arg in schedule:
        world.round()
        assert sum(1 for g in world.groups.values() if g.phase is R) >= replicas
        g = world.nth(arg)
        if g is not None and g.revision == world.spec.template.revision:
            # new groups advance through waiting and starting but fail instead of ready
            world.event("advance" if arg % 3 else "fail", arg)
            if world.groups[g.group_id].phase is R:
                world.groups[g.group_id] = replace(world.groups[g.group_id], phase=F)
    old = [g for g in world.groups.values() if g.revision != world.spec.template.revision]
    assert sum(1 for g in old if g.phase is R) == replicas
