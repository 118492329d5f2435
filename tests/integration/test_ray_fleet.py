"""EngineFleet of real RayEngineGroups on a real one-machine Ray cluster (one per module).

Engines are simulated engines (``shoal sim engine``) started by each group's driver
actor; stand-in workers hold fake GPUs. Covered: scale 1 -> 2 -> 1 with the discovery
file; a node killed under a group (replaced on another node, its URL out of the file at
once, a real router reading that file keeps answering); a rolling update with
max_unavailable=0 keeping ``ready >= replicas`` every round; a GPU reported unhealthy by a
stand-in health feed (its group replaced). Groups are kept apart by accelerator type so
each test owns its nodes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from control.autoscale.actuators.local import free_port
from control.ray.fleet import EngineFleet
from control.ray.group import RayEngineGroup
from control.ray.types import FleetSpec, GroupPhase, GroupSpec
from router.server import running_router
from tests.integration.ray_cluster import FAST_NODE_DEATH, RayTestCluster, ray_test_cluster

pytestmark = pytest.mark.integration

ENGINE = f"{sys.executable} -m shoal sim engine --host {{host}} --port {{port}} --model {{model}}"
ROUND_S = 0.3


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayTestCluster]:
    with ray_test_cluster(system_config=FAST_NODE_DEATH) as c:
        yield c


def template(accelerator: str, **fields: Any) -> GroupSpec:
    return GroupSpec(
        model="sim-7b",
        engine_command=ENGINE,
        accelerator_type=accelerator,
        gpu_type=accelerator,
        ready_timeout_s=60.0,
        **fields,
    )


def make_fleet(spec: FleetSpec, discovery: Path, prefix: str, **kwargs: Any) -> EngineFleet:
    return EngineFleet(
        spec,
        group_factory=RayEngineGroup,
        discovery_file=discovery,
        id_prefix=prefix,
        poll_timeout_s=10.0,
        stop_grace_s=5.0,
        **kwargs,
    )


async def rounds_until(
    fleet: EngineFleet,
    done: Callable[[], bool],
    what: str,
    timeout_s: float = 40.0,
    each: Callable[[], None] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        await fleet.reconcile_once()
        if each is not None:
            each()
        if done():
            return
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s: {fleet.status()}"
        await asyncio.sleep(ROUND_S)


def listed(path: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = json.loads(path.read_text())
    return entries


def refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def ready_urls(fleet: EngineFleet) -> set[str]:
    return set(fleet.state().endpoints)


def test_scale_one_two_one_publishes_ready_groups(cluster: RayTestCluster, tmp_path: Path) -> None:
    for name in ("scale-a", "scale-b"):
        cluster.add_node(name, gpus=1, **{"accelerator_type:S1": 1})
    discovery = tmp_path / "engines.json"
    fleet = make_fleet(FleetSpec(template("S1"), replicas=1), discovery, "scale", drain_s=0.5)

    async def scenario() -> None:
        try:
            await rounds_until(fleet, lambda: fleet.state().ready == 1, "one group ready")
            [first] = listed(discovery)
            assert first["gpu_type"] == "S1"
            assert len(first["gpus"]) == 1 and first["gpus"][0].startswith("scale-")
            fleet.scale(2)
            await rounds_until(fleet, lambda: fleet.state().ready == 2, "two groups ready")
            entries = listed(discovery)
            assert {e["url"] for e in entries} == ready_urls(fleet)
            nodes = {e["gpus"][0].split("/")[0] for e in entries}
            assert nodes == {"scale-a", "scale-b"}  # one 1-GPU node each
            newest = max(fleet.status(), key=lambda s: s.created)
            fleet.scale(1)
            await fleet.reconcile_once()
            # the newest leaves the file in the scale-down round, before it is stopped
            assert [e["url"] for e in listed(discovery)] == [first["url"]]
            assert not refuses(newest.url)
            await rounds_until(
                fleet, lambda: fleet.num_stopping == 0 and refuses(newest.url), "drained, stopped"
            )
            state = fleet.state()
            assert (state.spec, state.ready, state.pending) == (1, 1, 0)
            assert fleet.counters().groups_retired == {"scale_down": 1}
        finally:
            await fleet.close()
        assert listed(discovery) == []
        assert refuses(first["url"])

    run(scenario)


def test_node_killed_under_a_group_is_replaced_and_the_router_stops_using_it(
    cluster: RayTestCluster, tmp_path: Path
) -> None:
    for name in ("kill-a", "kill-b", "kill-c"):
        cluster.add_node(name, gpus=1, **{"accelerator_type:K1": 1})
    discovery = tmp_path / "engines.json"
    fleet = make_fleet(FleetSpec(template("K1"), replicas=2), discovery, "kill", drain_s=0.5)
    outcomes: list[tuple[float, float, int]] = []  # (sent, answered, status)
    stop_load = threading.Event()

    with running_router(
        free_port(set()),
        wait_healthy=False,
        discovery="file",
        discovery_file=discovery,
        discovery_interval_s=0.2,
        health_interval_s=0.5,
    ) as router:

        def load() -> None:
            body = {"model": "sim-7b", "prompt": "fleet under a node kill", "max_tokens": 4}
            while not stop_load.is_set():
                sent = time.monotonic()
                try:
                    status = router.request("POST", "/v1/completions", body, timeout=10)[0]
                except OSError:
                    status = 0
                outcomes.append((sent, time.monotonic(), status))
                time.sleep(0.02)

        async def scenario() -> None:
            try:
                await rounds_until(fleet, lambda: fleet.state().ready == 2, "two groups ready")
                before = {s.group_id: s for s in fleet.status()}
                # the router reads the file (entries carry "gpus": a router that refuses
                # them, one from before the GPU-health work, says so in its log)
                deadline = time.monotonic() + 10.0
                while router.request("GET", "/health", timeout=2)[0] != 200:
                    assert time.monotonic() < deadline, router.log()[-2000:]
                    await asyncio.sleep(0.2)
                loader = threading.Thread(target=load, daemon=True)
                loader.start()
                await asyncio.sleep(1.0)
                victim = next(iter(before.values()))
                cluster.kill_node(victim.nodes[0])
                killed = time.monotonic()
                dropped = 0.0

                def watch_file() -> None:
                    nonlocal dropped
                    if not dropped and victim.url not in {e["url"] for e in listed(discovery)}:
                        dropped = time.monotonic()

                await rounds_until(
                    fleet,
                    lambda: fleet.state().ready == 2 and victim.group_id not in ready_ids(fleet),
                    "replaced",
                    timeout_s=60.0,
                    each=watch_file,
                )
                replaced = time.monotonic()
                await asyncio.sleep(1.5)  # load on the replacement too
                stop_load.set()
                await asyncio.to_thread(loader.join, 15)
                print(
                    f"\nnode death -> out of discovery {dropped - killed:.1f} s, "
                    f"-> replacement ready {replaced - killed:.1f} s; requests: "
                    f"{sum(1 for o in outcomes if o[2] == 200)} ok, "
                    f"{sum(1 for o in outcomes if o[2] != 200)} failed"
                )
                now = {s.group_id: s for s in fleet.status()}
                new = [s for gid, s in now.items() if gid not in before]
                free = {"kill-a", "kill-b", "kill-c"} - {s.nodes[0] for s in before.values()}
                assert [s.nodes for s in new] == [tuple(free)]  # on the one free node
                replaced_by = fleet.counters().groups_replaced
                assert sum(replaced_by.values()) == 1, replaced_by
                assert set(replaced_by) <= {"node_died", "driver_died", "engine_exited"}
                assert victim.url not in {e["url"] for e in listed(discovery)}
                # requests sent once the router re-read the file all succeeded
                settled = dropped + 1.0
                late = [status for sent, _, status in outcomes if sent > settled]
                timeline = [(round(s - killed, 2), round(a - s, 2), st) for s, a, st in outcomes]
                assert late and all(status == 200 for status in late), (
                    dropped - killed,
                    timeline,
                    router.log()[-4000:],
                    listed(discovery),
                )
                # before: only requests in flight at the kill or sent before the router
                # re-read the file may fail
                failed = [(s, a) for s, a, status in outcomes if status != 200]
                assert all(s < settled for s, _ in failed), failed
                assert sum(1 for _, _, status in outcomes if status == 200) > len(failed)
            finally:
                stop_load.set()
                await fleet.close()

        run(scenario)


def ready_ids(fleet: EngineFleet) -> set[str]:
    return {s.group_id for s in fleet.status() if s.phase is GroupPhase.READY}


def test_rolling_update_with_max_unavailable_zero_keeps_capacity(
    cluster: RayTestCluster, tmp_path: Path
) -> None:
    for name in ("roll-a", "roll-b"):
        cluster.add_node(name, gpus=2, **{"accelerator_type:R1": 2})
    discovery = tmp_path / "engines.json"
    spec = FleetSpec(template("R1"), replicas=2, max_surge=1, max_unavailable=0)
    fleet = make_fleet(spec, discovery, "roll", drain_s=0.3)
    ready_per_round: list[int] = []
    listed_per_round: list[int] = []

    async def scenario() -> None:
        try:
            await rounds_until(fleet, lambda: fleet.state().ready == 2, "two groups ready")
            revision = fleet.update(replace(fleet.spec.template, env={"SHOAL_REVISION": "2"}))
            assert revision == "2"

            def record() -> None:
                ready_per_round.append(fleet.state().ready)
                listed_per_round.append(len(listed(discovery)))

            def rolled() -> bool:
                statuses = fleet.status()
                return (
                    len(statuses) == 2
                    and all(s.revision == "2" and s.phase is GroupPhase.READY for s in statuses)
                    and fleet.num_stopping == 0
                )

            await rounds_until(fleet, rolled, "rolled to revision 2", timeout_s=60, each=record)
            print(f"\nready per round during the update: {ready_per_round}")
            assert min(ready_per_round) >= 2
            assert min(listed_per_round) >= 2
            assert fleet.counters().groups_retired == {"outdated": 2}
        finally:
            await fleet.close()

    run(scenario)


class StandInFeed:
    """The HealthFeed's one read the fleet makes."""

    def __init__(self) -> None:
        self.sick: frozenset[str] = frozenset()

    def unhealthy_gpus(self) -> frozenset[str]:
        return self.sick


def test_group_on_an_unhealthy_gpu_is_replaced(cluster: RayTestCluster, tmp_path: Path) -> None:
    for name in ("sick-a", "sick-b"):
        cluster.add_node(name, gpus=1, **{"accelerator_type:H1": 1})
    discovery = tmp_path / "engines.json"
    feed = StandInFeed()
    fleet = make_fleet(FleetSpec(template("H1"), replicas=1), discovery, "sick", health=feed)

    async def scenario() -> None:
        try:
            await rounds_until(fleet, lambda: fleet.state().ready == 1, "one group ready")
            [sick] = fleet.status()
            feed.sick = frozenset(sick.gpus)
            await fleet.reconcile_once()
            assert listed(discovery) == []  # out of the router in the round that saw it
            assert fleet.counters().groups_replaced == {"gpu_unhealthy": 1}

            def healthy_ready() -> bool:
                groups = [s for s in fleet.status() if s.phase is GroupPhase.READY]
                return len(groups) == 1 and not feed.sick.intersection(groups[0].gpus)

            await rounds_until(fleet, healthy_ready, "replaced on a healthy GPU")
            assert sick.group_id not in {s.group_id for s in fleet.status()}
            assert [e["gpus"] for e in listed(discovery)] != [list(sick.gpus)]
            assert refuses(sick.url)
        finally:
            await fleet.close()

    run(scenario)
