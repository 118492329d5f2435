"""control.ray.fleet.EngineFleet on in-memory groups and virtual time (no Ray, no sockets).

The real groups (RayEngineGroup on a real Ray cluster) are driven by
tests/integration/test_ray_fleet.py; here the loop's bookkeeping is checked exactly.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import itertools
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from control.autoscale.types import ReplicaState
from control.health.types import GpuHealth, NodeHealth, Problem, Remedy, Severity
from control.ray.errors import CapacityTimeout, RayUnavailable
from control.ray.fleet import MAX_BACKOFF_S, EngineFleet
from control.ray.types import FleetSpec, GroupPhase, GroupSpec, GroupStatus


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """The test's coroutine on a fresh event loop (fixtures pass through)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


TEMPLATE = GroupSpec(model="m", engine_command="sim --port {port}", gpu_type="H100")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeGroup:
    """A group whose phase the test sets; ``ready()`` gives it a URL and a GPU."""

    def __init__(self, spec: GroupSpec, group_id: str, world: World) -> None:
        self._spec, self._group_id, self.world = spec, group_id, world
        self.phase = GroupPhase.WAITING
        self.reason = ""
        self.started = False
        self.stops: list[float] = []
        self.hang = False
        self.poll_error: BaseException | None = None
        self.stop_errors: list[BaseException] = []  # raised by the next stops, in order
        n = int(group_id.rsplit("-", 1)[1])
        self.url = f"http://10.0.0.{n}:8000"
        self.gpus = (f"node-{n}/gpu0",)

    @property
    def group_id(self) -> str:
        return self._group_id

    @property
    def spec(self) -> GroupSpec:
        return self._spec

    async def start(self) -> None:
        if self.world.fail_starts:
            raise CapacityTimeout("no GPU", waiting_for="1 GPU")
        self.started = True

    async def poll(self) -> GroupStatus:
        if self.hang:
            await asyncio.sleep(3600)
        if self.poll_error is not None:
            raise self.poll_error
        url = self.url if self.phase in (GroupPhase.STARTING, GroupPhase.READY) else ""
        return GroupStatus(
            self._group_id, self.phase, url=url, gpus=self.gpus, reason=self.reason
        )  # revision and created are the fleet's to set

    async def stop(self, grace_s: float = 30.0) -> None:
        self.stops.append(grace_s)
        if self.stop_errors:
            raise self.stop_errors.pop(0)
        self.phase = GroupPhase.STOPPED


class World:
    def __init__(self) -> None:
        self.groups: dict[str, FakeGroup] = {}
        self.fail_starts = False

    def factory(self, spec: GroupSpec, group_id: str) -> FakeGroup:
        group = FakeGroup(spec, group_id, self)
        self.groups[group_id] = group
        return group

    def alive(self) -> list[FakeGroup]:
        return [g for g in self.groups.values() if not g.stops]

    def ready_all(self) -> None:
        for g in self.alive():
            g.phase = GroupPhase.READY


class Feed:
    def __init__(self) -> None:
        self.sick: frozenset[str] = frozenset()
        self.nodes: dict[str, NodeHealth] = {}

    def unhealthy_gpus(self) -> frozenset[str]:
        return self.sick

    def reports(self) -> dict[str, NodeHealth]:
        return self.nodes


def discovery(path: Path) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = json.loads(path.read_text())
    return entries


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def make(
    tmp_path: Path, replicas: int = 2, **kwargs: object
) -> tuple[EngineFleet, World, Clock, Path]:
    world, clock, path = World(), Clock(), tmp_path / "engines.json"
    spec = FleetSpec(TEMPLATE, replicas, max_surge=1, max_unavailable=0)
    fleet = EngineFleet(
        spec,
        group_factory=world.factory,
        discovery_file=path,
        clock=clock,
        drain_s=5.0,
        **kwargs,  # type: ignore[arg-type]
    )
    return fleet, world, clock, path


@run_async
async def test_scale_up_publishes_ready_groups_only(tmp_path: Path) -> None:
    fleet, world, clock, path = make(tmp_path)
    assert discovery(path) == []  # exists before the first round: the router can start
    await fleet.reconcile_once()
    assert sorted(world.groups) == ["group-1", "group-2"]
    assert all(g.started for g in world.groups.values())
    assert fleet.state() == ReplicaState(spec=2, ready=0, pending=2)
    world.groups["group-1"].phase = GroupPhase.READY
    world.groups["group-2"].phase = GroupPhase.STARTING
    clock.now += 1
    await fleet.reconcile_once()
    assert discovery(path) == [
        {"url": "http://10.0.0.1:8000", "gpus": ["node-1/gpu0"], "gpu_type": "H100"}
    ]
    assert fleet.discovery() == discovery(path)  # GET /v1/discovery: the same list
    assert fleet.state() == ReplicaState(2, 1, 1, ("http://10.0.0.1:8000",))
    assert fleet.counters().groups_started == 2


@run_async
async def test_without_a_file_the_discovery_list_follows_the_ready_groups(
    tmp_path: Path,
) -> None:
    world, clock = World(), Clock()
    spec = FleetSpec(TEMPLATE, 2, max_surge=1, max_unavailable=0)
    fleet = EngineFleet(spec, group_factory=world.factory, clock=clock, drain_s=5.0)
    assert fleet.discovery() == []
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    assert [e["url"] for e in fleet.discovery()] == ["http://10.0.0.1:8000",
                                                    "http://10.0.0.2:8000"]  # fmt: skip
    world.groups["group-1"].phase = GroupPhase.FAILED
    await fleet.reconcile_once()  # out in the round that saw it
    assert fleet.discovery() == [
        {"url": "http://10.0.0.2:8000", "gpus": ["node-2/gpu0"], "gpu_type": "H100"}
    ]
    fleet.discovery()[0]["gpus"].append("x")  # type: ignore[attr-defined]  # a copy
    assert fleet.discovery()[0]["gpus"] == ["node-2/gpu0"]
    await fleet.close()
    assert fleet.discovery() == [] and not list(tmp_path.iterdir())


@run_async
async def test_failed_group_leaves_discovery_in_the_same_round_and_is_replaced(
    tmp_path: Path,
) -> None:
    fleet, world, _clock, path = make(tmp_path)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    assert len(discovery(path)) == 2
    world.groups["group-1"].phase = GroupPhase.FAILED
    world.groups["group-1"].reason = "node_died"
    await fleet.reconcile_once()
    assert [e["url"] for e in discovery(path)] == ["http://10.0.0.2:8000"]
    await settle()
    assert world.groups["group-1"].stops == [30.0]  # stopped at once, not drained
    assert "group-3" in world.groups and world.groups["group-3"].started
    assert fleet.counters().groups_replaced == {"node_died": 1}
    assert fleet.state() == ReplicaState(2, 1, 1, ("http://10.0.0.2:8000",))


@run_async
async def test_scale_down_drains_newest_ready_then_stops_it(tmp_path: Path) -> None:
    fleet, world, clock, path = make(tmp_path, replicas=3)
    await fleet.reconcile_once()
    world.ready_all()
    world.groups["group-3"].phase = GroupPhase.STARTING
    await fleet.reconcile_once()
    fleet.scale(1)
    clock.now += 1
    await fleet.reconcile_once()
    await settle()
    # the starting one goes at once; the newest ready one (group-2) leaves the file first
    assert world.groups["group-3"].stops == [30.0]
    assert world.groups["group-2"].stops == []
    assert [e["url"] for e in discovery(path)] == ["http://10.0.0.1:8000"]
    assert [(s.group_id, s.phase) for s in fleet.status()] == [
        ("group-1", GroupPhase.READY),
        ("group-2", GroupPhase.STOPPING),
    ]
    clock.now += 4.9
    await fleet.reconcile_once()
    await settle()
    assert world.groups["group-2"].stops == []
    clock.now += 0.1
    await fleet.reconcile_once()
    await settle()
    assert world.groups["group-2"].stops == [30.0]
    assert fleet.num_stopping == 0
    assert fleet.counters().groups_retired == {"scale_down": 2}
    assert fleet.state() == ReplicaState(1, 1, 0, ("http://10.0.0.1:8000",))


@run_async
async def test_group_on_unhealthy_gpu_is_replaced(tmp_path: Path) -> None:
    feed = Feed()
    fleet, world, _clock, path = make(tmp_path, health=feed)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    feed.sick = frozenset({"node-2/gpu0"})
    await fleet.reconcile_once()
    await settle()
    assert [e["url"] for e in discovery(path)] == ["http://10.0.0.1:8000"]
    assert world.groups["group-2"].stops == [30.0]
    assert world.groups["group-3"].started
    assert fleet.counters().groups_replaced == {"gpu_unhealthy": 1}


@run_async
async def test_node_to_drain_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    feed = Feed()
    problem = Problem("xid", Severity.CRITICAL, "xid 79", Remedy.DRAIN_NODE)
    feed.nodes = {"http://w": NodeHealth("node-9", 1.0, (GpuHealth(3, "u", (problem,)),))}
    fleet, _world, _clock, _path = make(tmp_path, health=feed)
    with caplog.at_level(logging.WARNING, logger="shoal.control.ray.fleet"):
        await fleet.reconcile_once()
        await fleet.reconcile_once()
    drains = [r for r in caplog.records if "should be drained" in r.getMessage()]
    assert [r.getMessage().split(" should")[0] for r in drains] == ["health: node node-9"]


@run_async
async def test_rolling_update_keeps_ready_at_replicas_every_round(tmp_path: Path) -> None:
    fleet, world, clock, _path = make(tmp_path)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    assert fleet.update(replace(TEMPLATE, engine_command="sim2 --port {port}")) == "2"
    ready_per_round, alive_per_round = [], []
    for _ in range(20):
        clock.now += 1
        await fleet.reconcile_once()
        await settle()
        ready_per_round.append(fleet.state().ready)
        alive_per_round.append(len(world.alive()))
        world.ready_all()  # every new group gets ready by the next round
    assert min(ready_per_round) >= 2
    assert max(alive_per_round) <= 3  # replicas + max_surge, drained ones included
    revisions = {s.revision for s in fleet.status()}
    assert revisions == {"2"}
    assert fleet.state().ready == 2
    assert [g for g in world.alive() if g.spec.revision == "1"] == []
    assert fleet.counters().updates == 1
    assert fleet.counters().groups_retired == {"outdated": 2}


@run_async
async def test_update_with_same_template_is_no_update(tmp_path: Path) -> None:
    fleet, *_ = make(tmp_path)
    assert fleet.update(TEMPLATE) == "1"
    assert fleet.update(replace(TEMPLATE, revision="v7", env={"A": "1"})) == "v7"
    assert fleet.counters().updates == 1


@run_async
async def test_failing_new_groups_back_off_and_old_ones_stay(tmp_path: Path) -> None:
    fleet, world, clock, _path = make(tmp_path, replicas=1)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    fleet.update(replace(TEMPLATE, engine_command="typo {port}"))
    starts: list[float] = []
    for _ in range(40):
        before = set(world.groups)
        await fleet.reconcile_once()
        await settle()
        starts += [clock.now for _ in set(world.groups) - before]
        for g in world.alive():
            if g.spec.revision == "2":
                g.phase, g.reason = GroupPhase.FAILED, "engine_exited"
        assert fleet.state().ready == 1  # the old group keeps serving
        clock.now += 0.5
    # starts at t, then after failures seen at t+0.5: waits of 1, 2, 4, 8 s
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[:4] == [1.5, 2.5, 4.5, 8.5]
    assert world.groups["group-1"].stops == []


@run_async
async def test_start_error_is_stopped_and_backed_off(tmp_path: Path) -> None:
    fleet, world, clock, _path = make(tmp_path, replicas=1)
    world.fail_starts = True
    await fleet.reconcile_once()
    await settle()
    assert world.groups["group-1"].stops == [30.0]
    assert fleet.counters().start_errors == 1
    assert fleet.counters().groups_replaced == {"start_failed": 1}
    world.fail_starts = False
    clock.now += 0.5
    await fleet.reconcile_once()
    assert "group-2" not in world.groups  # backoff: 1 s
    clock.now += 0.5
    await fleet.reconcile_once()
    assert world.groups["group-2"].started


@run_async
async def test_hung_poll_is_stale_then_unlisted_then_replaced(tmp_path: Path) -> None:
    """A group whose poll times out is no capacity at once, stays in the discovery file
    for that round only, and is replaced (unreachable) after 3 failed polls in a row."""
    fleet, world, _clock, path = make(tmp_path, poll_timeout_s=0.05)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    world.groups["group-1"].hang = True
    async with asyncio.timeout(2.0):
        await fleet.reconcile_once()
    assert fleet.state() == ReplicaState(2, 1, 0, ("http://10.0.0.2:8000",))
    assert len(discovery(path)) == 2  # one slow poll does not flap the router
    assert fleet.counters().poll_failures == 1
    await fleet.reconcile_once()
    assert [e["url"] for e in discovery(path)] == ["http://10.0.0.2:8000"]
    assert world.groups["group-1"].stops == []
    await fleet.reconcile_once()
    await settle()
    assert world.groups["group-1"].stops == [30.0]
    assert fleet.counters().groups_replaced == {"unreachable": 1}
    assert fleet.counters().poll_failures == 3
    assert world.groups["group-3"].started


@run_async
async def test_a_poll_that_answers_again_ends_the_streak(tmp_path: Path) -> None:
    fleet, world, _clock, path = make(tmp_path, replicas=1, poll_timeout_s=0.05)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    group = world.groups["group-1"]
    for _ in range(3):
        group.poll_error = RayUnavailable("gcs down")
        await fleet.reconcile_once()
        await fleet.reconcile_once()
        assert discovery(path) == []
        group.poll_error = None
        await fleet.reconcile_once()
        assert fleet.state().ready == 1 and len(discovery(path)) == 1
    assert group.stops == [] and sorted(world.groups) == ["group-1"]
    assert fleet.counters().poll_failures == 6


@run_async
async def test_a_stale_new_group_is_no_capacity_for_a_rolling_update(tmp_path: Path) -> None:
    fleet, world, clock, _path = make(tmp_path, poll_timeout_s=0.05)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    fleet.update(replace(TEMPLATE, engine_command="sim2 --port {port}"))
    await fleet.reconcile_once()  # group-3 (revision 2) started
    world.groups["group-3"].phase = GroupPhase.READY
    await fleet.reconcile_once()  # group-3 ready: group-1 retired (drains)
    clock.now += 5.0
    await fleet.reconcile_once()  # group-1 stopped, group-4 started
    await settle()
    assert world.groups["group-1"].stops == [30.0] and "group-4" in world.groups
    world.groups["group-3"].hang = True  # its status is now unknown
    world.groups["group-4"].phase = GroupPhase.READY
    await fleet.reconcile_once()
    # known ready: group-2 (old) and group-4; retiring group-2 would leave 1 < R - U = 2
    assert [s.group_id for s in fleet.status() if s.phase is GroupPhase.STOPPING] == []
    assert fleet.state().ready == 2


@run_async
async def test_any_exception_from_a_poll_is_a_counted_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not only Ray's errors: a port answering non-HTTP (BadStatusLine), a bug."""
    fleet, world, _clock, path = make(tmp_path)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    world.groups["group-1"].poll_error = http.client.BadStatusLine("SSH-2.0-x")
    with caplog.at_level(logging.WARNING, logger="shoal.control.ray.fleet"):
        await fleet.reconcile_once()
        await fleet.reconcile_once()
    traced = [r for r in caplog.records if r.exc_info is not None]
    assert [r.getMessage() for r in traced] == ["group group-1: poll raised"]  # once
    assert fleet.counters().poll_failures == 2
    assert [e["url"] for e in discovery(path)] == ["http://10.0.0.2:8000"]


@run_async
async def test_backoff_is_capped_after_many_failed_starts(tmp_path: Path) -> None:
    """1100 starts failing in a row: the wait stays MAX_BACKOFF_S (2.0 ** 1024 would
    raise OverflowError and end the loop)."""
    fleet, world, clock, _path = make(tmp_path, replicas=1)
    world.fail_starts = True
    for _ in range(1100):
        await fleet.reconcile_once()
        await settle()
        clock.now += MAX_BACKOFF_S
    assert fleet.counters().start_errors == 1100
    clock.now -= 0.1  # the last failure was MAX_BACKOFF_S - 0.1 s ago
    await fleet.reconcile_once()
    assert fleet.counters().start_errors == 1100
    clock.now += 0.1
    await fleet.reconcile_once()
    assert fleet.counters().start_errors == 1101


@run_async
async def test_a_failed_stop_is_kept_and_retried_each_round(tmp_path: Path) -> None:
    fleet, world, _clock, _path = make(tmp_path)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    group = world.groups["group-1"]
    group.stop_errors = [RayUnavailable("gcs hiccup"), RuntimeError("raw Ray error")]
    group.phase, group.reason = GroupPhase.FAILED, "node_died"
    await fleet.reconcile_once()
    await settle()
    assert group.stops == [30.0]
    assert fleet.counters().stop_errors == 1
    assert [(s.group_id, s.phase) for s in fleet.status()] == [
        ("group-1", GroupPhase.STOPPING),  # kept, its stop retried
        ("group-2", GroupPhase.READY),
        ("group-3", GroupPhase.WAITING),
    ]
    assert fleet.num_stopping == 1
    await fleet.reconcile_once()  # retried: fails again (not a Ray group error this time)
    await settle()
    assert group.stops == [30.0, 30.0] and fleet.counters().stop_errors == 2
    await fleet.reconcile_once()
    await settle()
    assert group.stops == [30.0, 30.0, 30.0]
    assert fleet.counters().stop_errors == 2
    assert fleet.num_stopping == 0
    assert "group-1" not in [s.group_id for s in fleet.status()]


@run_async
async def test_close_retries_a_failed_stop_once(tmp_path: Path) -> None:
    fleet, world, _clock, _path = make(tmp_path, replicas=1)
    await fleet.reconcile_once()
    world.groups["group-1"].stop_errors = [RayUnavailable("gcs hiccup")]
    await fleet.close()
    assert world.groups["group-1"].stops == [30.0, 30.0]
    assert fleet.num_stopping == 0 and fleet.counters().groups_stopped == 1


@run_async
async def test_close_stops_every_group_and_empties_discovery(tmp_path: Path) -> None:
    fleet, world, _clock, path = make(tmp_path, replicas=3)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    fleet.scale(2)
    await fleet.reconcile_once()  # group-3 draining
    await fleet.close()
    assert all(g.stops == [30.0] for g in world.groups.values())
    assert discovery(path) == []
    assert fleet.num_stopping == 0
    assert fleet.counters().groups_stopped == 3


@run_async
async def test_run_does_rounds_until_cancelled(tmp_path: Path) -> None:
    fleet, world, _clock, _path = make(tmp_path, replicas=1)
    task = asyncio.create_task(fleet.run(0.01))
    while fleet.counters().rounds < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(world.groups) == ["group-1"]  # started once, not every round
    await fleet.close()
    assert world.groups["group-1"].stops == [30.0]


@run_async
async def test_group_stopped_from_outside_is_replaced(tmp_path: Path) -> None:
    fleet, world, _clock, path = make(tmp_path, replicas=1)
    await fleet.reconcile_once()
    world.ready_all()
    await fleet.reconcile_once()
    world.groups["group-1"].phase = GroupPhase.STOPPED
    await fleet.reconcile_once()
    await settle()
    assert discovery(path) == []
    assert world.groups["group-2"].started
    assert fleet.counters().groups_replaced == {"stopped": 1}
    assert [s.group_id for s in fleet.status()] == ["group-2"]


@run_async
async def test_groups_placed_again_on_a_sick_gpu_back_off(tmp_path: Path) -> None:
    """Ray does not know the GPU is sick and may place the replacement on it again: each
    unready group lost that way delays the next start (1 s, then 2 s)."""
    feed = Feed()
    fleet, world, clock, _path = make(tmp_path, replicas=1, health=feed)
    feed.sick = frozenset({"node-1/gpu0", "node-2/gpu0"})
    for group_id in ("group-1", "group-2"):
        await fleet.reconcile_once()  # starts it
        assert world.groups[group_id].started
        world.groups[group_id].phase = GroupPhase.STARTING
        await fleet.reconcile_once()  # sees it on a sick GPU: replaced, start held back
        await settle()
        assert world.groups[group_id].stops == [30.0]
        assert fleet.state().pending == 0
        clock.now += 0.9 if group_id == "group-1" else 1.9
        await fleet.reconcile_once()
        assert fleet.state().pending == 0
        clock.now += 0.1
    await fleet.reconcile_once()
    assert world.groups["group-3"].started
    assert fleet.counters().groups_replaced == {"gpu_unhealthy": 2}
