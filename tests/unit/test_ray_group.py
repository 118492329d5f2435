"""RayEngineGroup's concurrency and teardown rules with Ray's calls replaced (no cluster,
no sockets): the lock is held until a thread ends, a failure is recorded by the thread
and torn down in the background, start() cannot leak its placement group, teardown steps
are each guarded, stops and polls use separate thread pools, READY engines are
health-checked. The same group on a real cluster: tests/integration/test_ray_group.py.
"""

from __future__ import annotations

import asyncio
import functools
import http.client
import threading
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import ray
from ray.exceptions import RaySystemError

import control.ray.group as group_module
from control.ray.errors import RayUnavailable
from control.ray.group import STOP_THREADS, RayEngineGroup, _Failure
from control.ray.types import GroupPhase, GroupSpec

SPEC = GroupSpec(model="m", engine_command="sim --port {port}")


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


class FakeId:
    def hex(self) -> str:
        return "ab12"


class FakePG:
    id = FakeId()


class Remote:
    def __init__(self, calls: list[str], name: str) -> None:
        self.calls, self.name = calls, name

    def remote(self, *args: Any) -> str:
        self.calls.append(self.name)
        return self.name + "-ref"


class FakeActor:
    def __init__(self, calls: list[str]) -> None:
        self.stop_engine = Remote(calls, "stop_engine")


class FakeRay:
    """The module's Ray calls, recorded; ``fail`` names the calls that raise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[str] = []
        self.fail: set[str] = set()
        self.removed: list[Any] = []
        monkeypatch.setattr(ray, "get", self.get)
        monkeypatch.setattr(ray, "kill", self.kill)
        monkeypatch.setattr(group_module, "placement_group_table", self.table)
        monkeypatch.setattr(group_module, "remove_placement_group", self.remove)

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise RaySystemError(f"{name} failed")  # type: ignore[no-untyped-call]

    def get(self, ref: Any, timeout: float | None = None) -> Any:
        self._call(f"get {ref}")

    def kill(self, actor: Any, no_restart: bool = True) -> None:
        self._call("kill")

    def table(self, pg: Any) -> dict[str, Any]:
        self._call("table")
        return {"state": "REMOVED" if self.removed else "CREATED"}

    def remove(self, pg: Any) -> None:
        self._call("remove")
        self.removed.append(pg)


@pytest.fixture
def fake_ray(monkeypatch: pytest.MonkeyPatch) -> FakeRay:
    return FakeRay(monkeypatch)


@pytest.fixture
def gates() -> Iterator[list[threading.Event]]:
    """Events a test's threads wait on; all set at the end so no thread is left blocked."""
    events: list[threading.Event] = []
    yield events
    for event in events:
        event.set()


def gate(gates: list[threading.Event]) -> threading.Event:
    event = threading.Event()
    gates.append(event)
    return event


def ready_group(fake_ray: FakeRay, gid: str = "g-1") -> RayEngineGroup:
    group = RayEngineGroup(SPEC, gid)
    group._pg, group._phase, group._url = FakePG(), GroupPhase.READY, "http://10.0.0.1:8000"  # type: ignore[assignment]
    group._pg_hex = "ab12"
    group._node_ids, group._nodes = ("n0",), ("node-a",)
    group._driver, group._workers = FakeActor(fake_ray.calls), [object()]
    group._actor_nodes = {-1: "n0", 0: "n0"}
    return group


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.005)


@run_async
async def test_a_poll_timeout_keeps_the_lock_until_the_thread_ends_and_the_thread_fails_it(
    fake_ray: FakeRay, gates: list[threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    group = ready_group(fake_ray)
    release, torn_down = gate(gates), gate(gates)

    def advance() -> None:
        release.wait(10)
        raise _Failure("driver_died", "driver hung")

    monkeypatch.setattr(group, "_advance", advance)
    teardown = group._teardown

    def recorded_teardown(grace_s: float) -> None:
        teardown(grace_s)
        torn_down.set()

    monkeypatch.setattr(group, "_teardown", recorded_teardown)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the fleet's poll timeout
            await group.poll()
    assert group._lock.locked()  # the thread still runs: no second operation beside it
    assert group.status().phase is GroupPhase.READY
    release.set()
    await until(lambda: group.status().phase is GroupPhase.FAILED)  # nobody polled
    assert group.status().reason == "driver_died"
    await until(torn_down.is_set)  # in the background
    assert fake_ray.removed == [group._pg]
    assert fake_ray.calls[:2] == ["stop_engine", "get stop_engine-ref"]
    await group.stop()
    assert group.status().phase is GroupPhase.FAILED


@run_async
async def test_a_failing_poll_returns_failed_before_the_teardown_ends(
    fake_ray: FakeRay, gates: list[threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    group = ready_group(fake_ray)
    release = gate(gates)

    def advance() -> None:
        raise _Failure("engine_exited", "exit 1")

    def slow_teardown(grace_s: float) -> None:
        release.wait(10)

    monkeypatch.setattr(group, "_advance", advance)
    monkeypatch.setattr(group, "_teardown", slow_teardown)
    async with asyncio.timeout(2.0):
        status = await group.poll()
    assert status.phase is GroupPhase.FAILED and status.reason == "engine_exited"
    await until(group._lock.locked)  # the teardown holds it
    stop = asyncio.create_task(group.stop())
    await asyncio.sleep(0.05)
    assert not stop.done()  # a stop waits for the teardown's thread
    release.set()
    async with asyncio.timeout(5.0):
        await stop
    assert group.status().phase is GroupPhase.FAILED


@run_async
async def test_a_cancelled_start_cannot_leak_its_placement_group(
    fake_ray: FakeRay, gates: list[threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    release = gate(gates)
    pg = FakePG()

    def slow_placement_group(bundles: Any, strategy: str, name: str) -> FakePG:
        release.wait(10)
        return pg

    monkeypatch.setattr(group_module, "placement_group", slow_placement_group)
    group = RayEngineGroup(SPEC, "g-1")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the fleet's start timeout
            await group.start()
    stop = asyncio.create_task(group.stop())  # the fleet stops what the start made
    await asyncio.sleep(0.05)
    release.set()
    async with asyncio.timeout(5.0):
        await stop
    assert fake_ray.removed == [pg]
    assert group.status().phase is GroupPhase.STOPPED


@run_async
async def test_each_teardown_step_runs_when_an_earlier_one_fails(fake_ray: FakeRay) -> None:
    group = ready_group(fake_ray)
    fake_ray.fail = {"get stop_engine-ref", "kill"}
    await group.stop()
    assert fake_ray.calls == [
        "stop_engine",
        "get stop_engine-ref",
        "kill",
        "kill",
        "table",
        "remove",
    ]
    assert group.status().phase is GroupPhase.STOPPED


@run_async
async def test_a_placement_group_not_removed_is_a_group_error_and_stop_is_retried(
    fake_ray: FakeRay,
) -> None:
    group = ready_group(fake_ray)
    fake_ray.fail = {"remove"}
    with pytest.raises(RayUnavailable, match="placement group ab12 not removed"):
        await group.stop()
    assert group.status().phase is GroupPhase.STOPPING
    fake_ray.fail = set()
    await group.stop()
    assert fake_ray.removed == [group._pg]
    assert group.status().phase is GroupPhase.STOPPED


@run_async
async def test_teardown_does_not_ask_a_driver_on_a_dead_node(fake_ray: FakeRay) -> None:
    """The node died before the driver answered: its node is bundle 0's, not unknown."""
    group = ready_group(fake_ray)
    group._actor_nodes, group._lost_node = {}, "n0"
    await group.stop()
    assert fake_ray.calls == ["kill", "kill", "table", "remove"]


@run_async
async def test_stops_cannot_starve_polls(
    fake_ray: FakeRay, gates: list[threading.Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    """More stops stuck in their grace than either pool (or asyncio's default one, at
    most 32 threads) has threads; another group's poll still answers."""
    release = gate(gates)
    stopping, entered = [], []

    def stuck_teardown(grace_s: float) -> None:
        entered.append(grace_s)
        release.wait(10)

    for i in range(max(STOP_THREADS, 32) + 2):
        group = ready_group(fake_ray, f"s-{i}")
        monkeypatch.setattr(group, "_teardown", stuck_teardown)
        stopping.append(asyncio.create_task(group.stop()))
    await until(lambda: len(entered) >= STOP_THREADS)  # every stop thread is taken
    await asyncio.sleep(0.05)  # (a shared pool would now have handed out all of its)
    polled = ready_group(fake_ray, "p-1")
    monkeypatch.setattr(polled, "_advance", lambda: None)
    async with asyncio.timeout(2.0):
        assert (await polled.poll()).phase is GroupPhase.READY
    release.set()
    async with asyncio.timeout(5.0):
        await asyncio.gather(*stopping)


@run_async
async def test_a_ready_engine_failing_health_three_polls_in_a_row_fails(
    fake_ray: FakeRay, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = ready_group(fake_ray)
    answers = iter([False, False, True, False, False, False])
    monkeypatch.setattr(group, "_check_alive", lambda pg: None)
    monkeypatch.setattr(group, "_healthy", lambda: next(answers))
    phases = [(await group.poll()).phase for _ in range(6)]
    assert phases == [GroupPhase.READY] * 5 + [GroupPhase.FAILED]
    assert group.status().reason == "engine_unhealthy"
    assert "failed 3 polls in a row" in group.status().detail
    await group.stop()  # after the background teardown (no thread outlives the test)
    assert fake_ray.removed == [group._pg]


def test_pools_grow_to_the_fleets_most_groups_and_never_shrink() -> None:
    group_module.size_pools(80)
    group_module.size_pools(8)
    assert group_module._sizes == {"poll": 80, "stop": 80}
    assert group_module._pool("stop")._max_workers == 80


@pytest.mark.parametrize(
    "error",
    [
        http.client.BadStatusLine("SSH-2.0-x"),  # a port that answers, not HTTP
        ConnectionRefusedError(111, "refused"),
        TimeoutError("timed out"),
    ],
)
def test_health_is_false_for_any_transport_failure(
    monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    def urlopen(url: str, timeout: float) -> Any:
        raise error

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    group = RayEngineGroup(SPEC, "g-1")
    group._url = "http://10.0.0.1:8000"
    assert group._healthy() is False
