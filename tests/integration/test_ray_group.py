"""RayEngineGroup on a real Ray cluster (one per module): placement per strategy, the
elastic wait and its deadline, a node killed under a ready group, and stop() leaving
nothing. The engine is a real simulated engine (``shoal sim engine``) started by the
group's driver actor; stand-in workers hold the fake GPUs."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import ray

from control.ray.group import RayEngineGroup
from control.ray.types import GroupPhase, GroupSpec, GroupStatus
from tests.integration.ray_cluster import FAST_NODE_DEATH, RayTestCluster, ray_test_cluster

pytestmark = pytest.mark.integration

ENGINE = f"{sys.executable} -m shoal sim engine --host {{host}} --port {{port}} --model {{model}}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayTestCluster]:
    with ray_test_cluster(system_config=FAST_NODE_DEATH) as c:
        c.add_node("node-a", gpus=2, **{"accelerator_type:A100": 1})
        c.add_node("node-b", gpus=2, **{"accelerator_type:T4": 1})
        yield c


def spec(**fields: Any) -> GroupSpec:
    return GroupSpec(model="sim-7b", engine_command=ENGINE, **fields)


async def waiting_with(group: RayEngineGroup, text: str, timeout_s: float = 15.0) -> GroupStatus:
    """The first WAITING status whose message has ``text`` (freed resources reach the
    node table a moment after the group that held them is gone)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await group.poll()
        assert status.phase is GroupPhase.WAITING, status
        if text in status.waiting_for:
            return status
        assert time.monotonic() < deadline, f"no {text!r} in {status.waiting_for!r}"
        await asyncio.sleep(0.2)


async def until(group: RayEngineGroup, *phases: GroupPhase, timeout_s: float = 30.0) -> GroupStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        status = await group.poll()
        if status.phase in phases:
            return status
        assert time.monotonic() < deadline, f"still {status} after {timeout_s} s"
        await asyncio.sleep(0.2)


def eventually(check: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.1)


def alive_actors() -> list[str]:
    return [a for a, info in ray._private.state.actors().items() if info["State"] == "ALIVE"]


def pg_state(name: str) -> str:
    states = [pg["state"] for pg in ray.util.placement_group_table().values() if pg["name"] == name]
    assert states, f"no placement group named {name}"
    return str(states[-1])


def refuses(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def health(url: str) -> int:
    with urllib.request.urlopen(url + "/health", timeout=5) as reply:
        return int(reply.status)


def assert_left_nothing(group_id: str, url: str) -> None:
    assert pg_state(group_id) == "REMOVED"
    eventually(lambda: not alive_actors(), "every actor dead")
    if url:
        assert refuses(url), f"engine at {url} still accepts connections"


def test_accelerator_type_and_pack_and_stop_leaves_nothing(cluster: RayTestCluster) -> None:
    """A T4 group lands on node-b (the only T4 node); a PACK tp=2 group started beside it
    puts both workers on node-a (the one node with 2 free GPUs) rather than splitting."""

    async def run() -> None:
        t4 = RayEngineGroup(spec(accelerator_type="T4"), "t4")
        pack = RayEngineGroup(spec(tensor_parallel=2), "pack")
        await t4.start()
        try:
            await until(t4, GroupPhase.STARTING, GroupPhase.READY, GroupPhase.FAILED)
            await pack.start()
            t4_ready = await until(t4, GroupPhase.READY, GroupPhase.FAILED)
            packed = await until(pack, GroupPhase.READY, GroupPhase.FAILED)
            assert t4_ready.phase is GroupPhase.READY, t4_ready
            assert t4_ready.nodes == ("node-b",)
            assert len(t4_ready.gpus) == 1 and t4_ready.gpus[0].startswith("node-b/gpu")
            assert packed.phase is GroupPhase.READY, packed
            assert packed.nodes == ("node-a", "node-a")
            assert sorted(packed.gpus) == ["node-a/gpu0", "node-a/gpu1"]
            assert health(packed.url) == 200 and health(t4_ready.url) == 200
        finally:
            await asyncio.gather(pack.stop(grace_s=5), t4.stop(grace_s=5))
        assert pack.status().phase is GroupPhase.STOPPED
        assert_left_nothing("pack", packed.url)
        assert_left_nothing("t4", t4_ready.url)
        await pack.stop()  # idempotent
        assert pack.status().phase is GroupPhase.STOPPED

    asyncio.run(run())


def test_strict_spread_puts_each_worker_on_its_own_node(cluster: RayTestCluster) -> None:
    async def run() -> None:
        group = RayEngineGroup(spec(tensor_parallel=2, strategy="STRICT_SPREAD"), "spread")
        await group.start()
        try:
            status = await until(group, GroupPhase.READY, GroupPhase.FAILED)
            assert status.phase is GroupPhase.READY, status
            assert sorted(status.nodes) == ["node-a", "node-b"]
            assert [g.split("/")[0] for g in status.gpus] == list(status.nodes)
            assert health(status.url) == 200
        finally:
            await group.stop(grace_s=5)
        assert_left_nothing("spread", status.url)

    asyncio.run(run())


def test_deadline_fails_with_capacity_timeout_and_starts_nothing(
    cluster: RayTestCluster,
) -> None:
    now = [1000.0]

    async def run() -> None:
        group = RayEngineGroup(
            spec(tensor_parallel=8, wait_deadline_s=60.0), "too-big", clock=lambda: now[0]
        )
        await group.start()
        try:
            waiting = await waiting_with(group, "4 GPUs free on 2 nodes")
            assert waiting.waiting_for.startswith("8 bundles of {GPU: 1} (the first with 1 CPU):")
            assert "PACK needs 8 free GPU slots, 4 free" in waiting.waiting_for
            now[0] += 59.0
            assert (await group.poll()).phase is GroupPhase.WAITING
            now[0] += 1.0
            failed = await group.poll()
        finally:
            await group.stop()
        assert failed.phase is GroupPhase.FAILED
        assert failed.reason == "capacity_timeout"
        assert failed.detail.startswith("not placed in 60 s: 8 bundles of {GPU: 1}")
        assert failed.url == "" and failed.gpus == ()
        assert pg_state("too-big") == "REMOVED"
        assert alive_actors() == []
        assert group.status().phase is GroupPhase.FAILED  # stop() keeps the verdict

    asyncio.run(run())


def test_group_waits_for_a_node_then_becomes_ready(cluster: RayTestCluster) -> None:
    async def run() -> None:
        group = RayEngineGroup(spec(tensor_parallel=3, strategy="STRICT_SPREAD"), "elastic")
        await group.start()
        try:
            waiting = await waiting_with(group, "4 GPUs free on 2 nodes")
            assert waiting.waiting_for.endswith(
                "STRICT_SPREAD needs 3 nodes with a free GPU, 2 have one"
            )
            cluster.add_node("node-c", gpus=1)
            status = await until(group, GroupPhase.READY, GroupPhase.FAILED)
            assert status.phase is GroupPhase.READY, status
            assert sorted(status.nodes) == ["node-a", "node-b", "node-c"]
            assert status.waiting_for == ""
        finally:
            await group.stop(grace_s=5)
        assert_left_nothing("elastic", status.url)

    asyncio.run(run())


def test_node_killed_under_a_ready_group_fails_it_and_stops_its_engine(
    cluster: RayTestCluster,
) -> None:
    """The worker's node dies, the driver's survives: the group says node_died and its
    engine (still running on the surviving node) is stopped."""

    async def run() -> None:
        for name in ("node-d", "node-e"):
            cluster.add_node(name, gpus=1, **{"accelerator_type:L4": 1})
        group = RayEngineGroup(
            spec(tensor_parallel=2, strategy="STRICT_SPREAD", accelerator_type="L4"), "doomed"
        )
        await group.start()
        try:
            ready = await until(group, GroupPhase.READY, GroupPhase.FAILED)
            assert ready.phase is GroupPhase.READY, ready
            assert sorted(ready.nodes) == ["node-d", "node-e"]
            victim = ready.nodes[1]  # a worker's node, not the driver's
            cluster.kill_node(victim)
            killed = time.monotonic()
            failed = await until(group, GroupPhase.FAILED, timeout_s=30)
            print(f"node death -> detected in {time.monotonic() - killed:.1f} s")
        finally:
            await group.stop(grace_s=5)
        assert failed.reason == "node_died", failed
        assert victim in failed.detail
        eventually(lambda: refuses(ready.url), "engine port closed")
        assert_left_nothing("doomed", ready.url)

    asyncio.run(run())


def test_engine_exit_fails_the_group_with_its_code_and_log(cluster: RayTestCluster) -> None:
    command = f"{sys.executable} -c \"print('no weights for {{model}}'); raise SystemExit(3)\""

    async def run() -> None:
        group = RayEngineGroup(
            GroupSpec(model="sim-7b", engine_command=command, ready_timeout_s=30), "exits"
        )
        await group.start()
        try:
            failed = await until(group, GroupPhase.FAILED, GroupPhase.READY)
        finally:
            await group.stop()
        assert failed.reason == "engine_exited", failed
        assert failed.detail.startswith("engine exited with 3; log tail:\n")
        assert "no weights for sim-7b" in failed.detail
        assert_left_nothing("exits", "")

    asyncio.run(run())


def test_a_killed_driver_fails_the_group_as_driver_died(cluster: RayTestCluster) -> None:
    async def run() -> None:
        group = RayEngineGroup(spec(), "driverless")
        await group.start()
        try:
            ready = await until(group, GroupPhase.READY, GroupPhase.FAILED)
            assert ready.phase is GroupPhase.READY, ready
            ray.kill(group._driver)  # the actor itself, as an OOM kill would
            failed = await until(group, GroupPhase.FAILED)
        finally:
            await group.stop()
        assert failed.reason == "driver_died", failed
        eventually(lambda: refuses(ready.url), "engine port closed")  # PDEATHSIG
        assert_left_nothing("driverless", ready.url)

    asyncio.run(run())


def test_vllm_workers_mode_starts_no_standins_and_hands_the_engine_its_group(
    cluster: RayTestCluster,
) -> None:
    """workers="vllm": the bundles' GPUs stay free for vLLM's own workers (no stand-in
    actors), the group still reports them (a probe task per bundle), and the engine
    command gets ``{placement_group}`` and ``RAY_ADDRESS`` (here echoed as the served
    model names)."""
    command = (
        f"sh -c 'exec {sys.executable} -m shoal sim engine --host {{host}} --port {{port}} "
        '--model {placement_group} --served-model-name "$RAY_ADDRESS"\''
    )

    async def run() -> None:
        group = RayEngineGroup(
            GroupSpec(model="m", engine_command=command, tensor_parallel=2, workers="vllm"),
            "vllm-mode",
        )
        await group.start()
        try:
            ready = await until(group, GroupPhase.READY, GroupPhase.FAILED)
            assert ready.phase is GroupPhase.READY, ready
            node = ready.nodes[0]
            assert sorted(ready.gpus) == [f"{node}/gpu0", f"{node}/gpu1"]
            alive = [
                info["ActorClassName"]
                for info in ray._private.state.actors().values()
                if info["State"] == "ALIVE"
            ]
            assert alive == ["EngineDriver"]
            with urllib.request.urlopen(ready.url + "/v1/models", timeout=5) as reply:
                models = json.loads(reply.read())["data"]
            table = ray.util.placement_group_table()
            pg_hex = next(k for k, v in table.items() if v["name"] == "vllm-mode")
            assert [m["root"] for m in models] == [pg_hex]
            assert [m["id"] for m in models] == [cluster.address]
        finally:
            await group.stop(grace_s=5)
        assert_left_nothing("vllm-mode", ready.url)

    asyncio.run(run())


def test_an_engine_never_healthy_fails_as_start_timeout(cluster: RayTestCluster) -> None:
    now = [0.0]

    async def run() -> None:
        group = RayEngineGroup(
            GroupSpec(model="m", engine_command="sleep 300", ready_timeout_s=120.0),
            "mute",
            clock=lambda: now[0],
        )
        await group.start()
        try:
            starting = await until(group, GroupPhase.STARTING)
            deadline = time.monotonic() + 30
            while not starting.url:  # the engine is started (its url known), never healthy
                assert time.monotonic() < deadline, starting
                await asyncio.sleep(0.2)
                starting = await group.poll()
            assert starting.phase is GroupPhase.STARTING
            now[0] += 119.0
            assert (await group.poll()).phase is GroupPhase.STARTING
            now[0] += 1.0
            failed = await group.poll()
        finally:
            await group.stop()
        assert failed.reason == "start_timeout", failed
        assert failed.detail == f"engine not healthy 120 s after placement at {starting.url}"
        assert_left_nothing("mute", "")

    asyncio.run(run())
