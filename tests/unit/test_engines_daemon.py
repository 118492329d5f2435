"""The engines daemon's logic on virtual time: scale bounds, updates and revisions, the
fleet's JSON, rounds that survive a failing fleet, and the metrics derived from statuses."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.autoscale.types import ReplicaState
from control.ray.config import EnginesSettings, fleet_spec
from control.ray.errors import RayUnavailable
from control.ray.metrics import EnginesMetrics
from control.ray.server import EnginesDaemon, group_json
from control.ray.types import FleetSpec, GroupPhase, GroupSpec, GroupStatus
from shoal.errors import ConfigError


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class ScriptedFleet:
    """The EngineFleet shape; statuses set by the test, calls recorded."""

    def __init__(self, clock: Clock, round_s: float = 0.0) -> None:
        self.clock = clock
        self.round_s = round_s
        self.groups: list[GroupStatus] = []
        self.calls: list[tuple[str, object]] = []
        self.fail_with: Exception | None = None
        self.replaced: dict[str, int] = {}

    async def reconcile_once(self) -> None:
        self.clock.now += self.round_s
        self.calls.append(("reconcile", None))
        if self.fail_with is not None:
            raise self.fail_with

    def scale(self, replicas: int) -> None:
        self.calls.append(("scale", replicas))

    def update(self, template: GroupSpec) -> str:
        self.calls.append(("update", template))
        return template.revision

    def counters(self) -> ScriptedFleet:
        return self

    @property
    def groups_replaced(self) -> dict[str, int]:
        return dict(self.replaced)

    def state(self) -> ReplicaState:
        ready = [g for g in self.groups if g.phase is GroupPhase.READY]
        pending = [g for g in self.groups if g.phase in (GroupPhase.WAITING, GroupPhase.STARTING)]
        return ReplicaState(len(self.groups), len(ready), len(pending),
                            tuple(g.url for g in ready))  # fmt: skip

    def status(self) -> list[GroupStatus]:
        return list(self.groups)

    def discovery(self) -> list[dict[str, object]]:
        return [{"url": g.url, "gpus": list(g.gpus)} for g in self.groups
                if g.phase is GroupPhase.READY]  # fmt: skip

    async def close(self) -> None:
        self.calls.append(("close", None))


def make(replicas: int = 1, round_s: float = 0.0) -> tuple[EnginesDaemon, ScriptedFleet, Clock]:
    clock = Clock()
    fleet = ScriptedFleet(clock, round_s)
    settings = EnginesSettings(model="m", engine_command="sim --port {port}", replicas=replicas,
                               max_replicas=4)  # fmt: skip
    daemon = EnginesDaemon(fleet, fleet_spec(settings), max_replicas=4, clock=clock)
    return daemon, fleet, clock


def sample(metrics: EnginesMetrics, name: str, **labels: str) -> float:
    text = metrics.render().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name} {labels} in\n{text}")


def test_scale_is_bounded_and_changes_the_spec_the_daemon_answers() -> None:
    daemon, fleet, _ = make()
    daemon.scale(4)
    daemon.scale(0)
    with pytest.raises(ConfigError, match="between 0 and 4 \\(--max-replicas\\), got 5"):
        daemon.scale(5)
    with pytest.raises(ConfigError, match="got -1"):
        daemon.scale(-1)
    assert fleet.calls == [("scale", 4), ("scale", 0)]
    assert daemon.fleet_json()["spec"]["replicas"] == 0


def test_an_update_passes_the_new_template_once_and_an_empty_one_changes_nothing() -> None:
    daemon, fleet, _ = make()
    before = daemon.spec.template
    revision, changed = daemon.update({"engine_command": "sim --port {port} --v2"})
    assert changed and revision != before.revision
    assert daemon.spec.template.revision == revision
    assert fleet.calls == [("update", daemon.spec.template)]
    assert daemon.update({"engine_command": "sim --port {port} --v2"}) == (revision, False)
    with pytest.raises(ConfigError, match="unknown key"):
        daemon.update({"replicas": 3})
    assert len(fleet.calls) == 1 and daemon.spec.template.revision == revision


def test_the_fleet_json_has_the_spec_counts_and_every_group() -> None:
    daemon, fleet, clock = make(replicas=2)
    fleet.groups = [
        GroupStatus("g1", GroupPhase.READY, revision="r", created=90.0, url="http://h:1",
                    nodes=("node-a", "node-b"), gpus=("node-a/gpu0", "node-b/gpu1")),
        GroupStatus("g2", GroupPhase.WAITING, revision="r", created=99.5,
                    waiting_for="2 more {GPU: 1} bundles"),
    ]  # fmt: skip
    answer = daemon.fleet_json()
    assert (answer["ready"], answer["pending"], answer["endpoints"]) == (1, 1, ["http://h:1"])
    assert answer["spec"]["replicas"] == 2 and answer["spec"]["max_replicas"] == 4
    assert answer["spec"]["revision"] == daemon.spec.template.revision
    assert answer["groups"] == [
        {"id": "g1", "phase": "ready", "revision": "r", "url": "http://h:1",
         "nodes": ["node-a", "node-b"], "gpus": ["node-a/gpu0", "node-b/gpu1"],
         "waiting_for": "", "reason": "", "detail": "", "age_s": 10.0},
        {"id": "g2", "phase": "waiting", "revision": "r", "url": "", "nodes": [], "gpus": [],
         "waiting_for": "2 more {GPU: 1} bundles", "reason": "", "detail": "", "age_s": 0.5},
    ]  # fmt: skip
    assert group_json(fleet.groups[0], clock.now - 20)["age_s"] == 0.0  # never negative


def test_a_round_that_cannot_reach_ray_is_logged_and_the_loop_goes_on() -> None:
    daemon, fleet, _ = make(round_s=0.25)
    fleet.fail_with = RayUnavailable("no cluster at 10.0.0.1:6379")

    async def two_rounds() -> None:
        stop = asyncio.Event()
        daemon.interval_s = 0.001

        async def stopper() -> None:
            while daemon.rounds < 2:
                await asyncio.sleep(0)
            stop.set()

        await asyncio.gather(daemon.run(stop), stopper())

    asyncio.run(two_rounds())
    assert daemon.rounds == 2 and fleet.calls == [("reconcile", None)] * 2
    assert sample(daemon.metrics, "shoal_engines_reconcile_seconds_count") == 2
    assert sample(daemon.metrics, "shoal_engines_reconcile_seconds_sum") == 0.5


def test_metrics_count_phases_waits_and_the_fleets_replacements() -> None:
    daemon, _, _ = make(replicas=2)
    spec: FleetSpec = daemon.spec
    metrics = daemon.metrics
    waiting = GroupStatus("g1", GroupPhase.WAITING, created=100.0)
    metrics.observe(spec, [waiting], 101.0, {})
    assert sample(metrics, "shoal_engines_groups", phase="waiting") == 1
    assert sample(metrics, "shoal_engines_wait_seconds_count") == 0
    started = dataclasses.replace(waiting, phase=GroupPhase.STARTING)
    metrics.observe(spec, [started], 104.0, {})
    ready = dataclasses.replace(waiting, phase=GroupPhase.READY)
    fresh = GroupStatus("g3", GroupPhase.WAITING, created=105.0)
    metrics.observe(spec, [ready, fresh], 106.0, {"node_died": 1})
    metrics.observe(spec, [ready, fresh], 108.0, {"node_died": 1})  # totals, not new ones
    assert sample(metrics, "shoal_engines_wait_seconds_count") == 1  # placed once: 4 s
    assert sample(metrics, "shoal_engines_wait_seconds_sum") == 4.0
    assert sample(metrics, "shoal_engines_group_failures_total", reason="node_died") == 1
    assert sample(metrics, "shoal_engines_replacements_total") == 1
    metrics.observe(spec, [ready, fresh], 110.0, {"node_died": 3, "gpu_unhealthy": 1})
    assert sample(metrics, "shoal_engines_group_failures_total", reason="node_died") == 3
    assert sample(metrics, "shoal_engines_group_failures_total", reason="gpu_unhealthy") == 1
    assert sample(metrics, "shoal_engines_group_failures_total", reason="start_failed") == 0
    assert sample(metrics, "shoal_engines_replacements_total") == 4
    assert sample(metrics, "shoal_engines_ready") == 1
    assert sample(metrics, "shoal_engines_groups", phase="waiting") == 1
    assert sample(metrics, "shoal_engines_groups", phase="failed") == 0
    assert sample(metrics, "shoal_engines_replicas_desired") == 2
    assert sample(metrics, "shoal_engines_update_revision_info",
                  revision=spec.template.revision) == 1  # fmt: skip


def test_the_health_feed_is_polled_by_its_owner_until_stop() -> None:
    from control.ray.server import _poll_health

    class Feed:
        def __init__(self) -> None:
            self.polls = 0

        async def poll(self) -> None:
            self.polls += 1
            if self.polls == 3:
                stop.set()

    feed = Feed()
    stop = asyncio.Event()
    asyncio.run(asyncio.wait_for(_poll_health(feed, 0.001, stop), 5))
    assert feed.polls == 3
