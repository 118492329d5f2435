"""The watcher's loop on a scripted backend: rounds, NVML missing and lost, the XID thread,
clears, and the metrics that follow the GPUs present (no sockets; virtual clocks)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from control.health.errors import BackendError, NvmlUnavailable
from control.health.metrics import HealthMetrics
from control.health.types import (
    GpuHealth,
    GpuSnapshot,
    NodeHealth,
    Problem,
    Remedy,
    Severity,
    XidEvent,
)
from control.health.watch import Watcher, XidPump


class ScriptedBackend:
    """GPUs from a dict; XIDs from a queue ``wait_xid`` blocks on; ``lost`` = NVML gone."""

    def __init__(self, gpus: dict[int, GpuSnapshot]) -> None:
        self.gpus = gpus
        self.xids: queue.Queue[XidEvent] = queue.Queue()
        self.lost = False
        self.closed = False
        self.waits = 0

    def device_count(self) -> int:
        if self.lost:
            raise BackendError("NVML lost: GPU_IS_LOST")
        return len(self.gpus)

    def driver_version(self) -> str:
        return "550.54"

    def snapshot(self, index: int) -> GpuSnapshot:
        return self.gpus[index]

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        self.waits += 1
        try:
            return [self.xids.get(timeout=timeout_s)]
        except queue.Empty:
            return []

    def close(self) -> None:
        self.closed = True


class ScriptedLedger:
    """The XidLedger's shape: critical XIDs per GPU, cleared per GPU; records the calls."""

    def __init__(self) -> None:
        self.events: dict[int, list[int]] = {}
        self.calls: list[tuple[str, int]] = []

    def record(self, event: XidEvent) -> None:
        self.calls.append(("record", event.xid))
        self.events.setdefault(event.index, []).append(event.xid)

    def clear(self, index: int) -> None:
        self.calls.append(("clear", index))
        self.events.pop(index, None)

    def problems(self, index: int) -> list[Problem]:
        return [
            Problem("xid", Severity.CRITICAL, f"XID {x}", Remedy.DRAIN_NODE)
            for x in self.events.get(index, [])
        ]


def scripted_collect(
    backend: Any, *, node: str, ledger: ScriptedLedger, expect_gpus: int | None, now: float
) -> NodeHealth:
    """report.collect's contract, minimally: one GpuHealth per GPU, hot GPUs critical."""
    gpus = []
    for i in range(backend.device_count()):
        snap = backend.snapshot(i)
        problems = list(ledger.problems(i))
        if snap.temperature_c is not None and snap.temperature_c >= 90:
            problems.append(Problem("temperature", Severity.CRITICAL, "hot", Remedy.RESET_GPU))
        gpus.append(GpuHealth(i, snap.uuid, tuple(problems)))
    return NodeHealth(node, now, tuple(gpus))


def reporting_collect(
    backend: Any, *, node: str, ledger: ScriptedLedger, expect_gpus: int | None, now: float
) -> NodeHealth:
    """report.collect's way of saying NVML is lost: a node-level problem, no GPUs."""
    try:
        return scripted_collect(backend, node=node, ledger=ledger, expect_gpus=expect_gpus, now=now)
    except BackendError as exc:
        problem = Problem("nvml", Severity.CRITICAL, f"cannot count: {exc}", Remedy.DRAIN_NODE)
        return NodeHealth(node, now, (), (problem,))


def two_gpus() -> dict[int, GpuSnapshot]:
    return {
        i: GpuSnapshot(
            index=i,
            uuid=f"GPU-{i}",
            temperature_c=40 + i,
            ecc_volatile_dbe=0,
            link_width_current=16,
            link_width_max=16,
        )
        for i in range(2)
    }


class Clock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make_watcher(
    opener: Callable[[], Any],
    *,
    expect_gpus: int | None = None,
    ledger: ScriptedLedger | None = None,
    collect: Callable[..., NodeHealth] = scripted_collect,
) -> tuple[Watcher, ScriptedLedger, Clock]:
    ledger = ledger or ScriptedLedger()
    clock = Clock(1000.0)
    watcher = Watcher(
        opener,
        node="node-a",
        expect_gpus=expect_gpus,
        interval_s=3600.0,
        xid_wait_s=0.05,
        metrics=HealthMetrics(),
        collect=collect,
        ledger=ledger,
        clock=clock,
        monotonic=clock,
    )
    return watcher, ledger, clock


def sample(watcher: Watcher, name: str, **labels: str) -> float | None:
    return watcher.metrics.registry.get_sample_value(name, labels)


def test_a_round_reports_every_gpu_and_exports_its_readings() -> None:
    backend = ScriptedBackend(two_gpus())
    watcher, _, _ = make_watcher(lambda: backend)

    async def body() -> NodeHealth:
        try:
            return await watcher.check_once()
        finally:
            await watcher.close()

    health = asyncio.run(body())
    assert health == NodeHealth("node-a", 1000.0, (GpuHealth(0, "GPU-0"), GpuHealth(1, "GPU-1")))
    assert watcher.latest == health
    gpu1 = {"node": "node-a", "gpu": "1", "uuid": "GPU-1"}
    assert sample(watcher, "shoal_gpu_healthy", **gpu1) == 1.0
    assert sample(watcher, "shoal_gpu_temperature_celsius", **gpu1) == 41.0
    assert sample(watcher, "shoal_gpu_ecc_errors", **gpu1, scope="volatile", bit="dbe") == 0.0
    assert sample(watcher, "shoal_gpu_ecc_errors", **gpu1, scope="aggregate", bit="dbe") is None
    assert sample(watcher, "shoal_gpu_pcie_link_width", **gpu1, which="max") == 16.0
    assert sample(watcher, "shoal_gpu_check_seconds_count") == 1.0
    assert backend.closed


def test_nvml_missing_at_start_is_a_node_problem_over_the_expected_gpus_then_retried() -> None:
    backend = ScriptedBackend(two_gpus())
    attempts: list[int] = []

    def opener() -> ScriptedBackend:
        attempts.append(1)
        if len(attempts) == 1:
            raise NvmlUnavailable("NVML Shared Library Not Found", code=12)
        return backend

    watcher, _, clock = make_watcher(opener, expect_gpus=2)

    async def body() -> tuple[NodeHealth, NodeHealth]:
        try:
            first = await watcher.check_once()
            clock.now += 5
            return first, await watcher.check_once()
        finally:
            await watcher.close()

    first, second = asyncio.run(body())
    assert first.problems == (
        Problem(
            "nvml",
            Severity.CRITICAL,
            "NVML unavailable: NVML Shared Library Not Found",
            Remedy.DRAIN_NODE,
        ),
    )
    unread = (Problem("nvml", Severity.CRITICAL, "not read: NVML unavailable"),)
    assert first.gpus == (GpuHealth(0, "", unread), GpuHealth(1, "", unread))
    assert first.unhealthy_gpus() == {"node-a/gpu0", "node-a/gpu1"}
    assert second.healthy and second.time == 1005.0 and len(attempts) == 2
    assert sample(watcher, "shoal_gpu_check_errors_total") == 1.0
    assert sample(watcher, "shoal_gpu_node_problems", node="node-a", check="nvml", severity="critical") is None  # fmt: skip


@pytest.mark.parametrize(
    ("collect", "detail"),
    [
        (scripted_collect, "NVML lost: NVML lost: GPU_IS_LOST"),  # collect raises
        (reporting_collect, "cannot count: NVML lost: GPU_IS_LOST"),  # collect reports it
    ],
)
def test_nvml_lost_keeps_the_last_gpus_unhealthy_closes_the_backend_and_reopens(
    collect: Callable[..., NodeHealth], detail: str
) -> None:
    backends = [ScriptedBackend(two_gpus()), ScriptedBackend(two_gpus())]
    opened: list[ScriptedBackend] = []

    def opener() -> ScriptedBackend:
        opened.append(backends[len(opened)])
        return opened[-1]

    watcher, _, _ = make_watcher(opener, collect=collect)

    async def body() -> list[NodeHealth]:
        try:
            first = await watcher.check_once()
            backends[0].lost = True
            lost = await watcher.check_once()
            return [first, lost, await watcher.check_once()]
        finally:
            await watcher.close()

    first, lost, again = asyncio.run(body())
    assert first.healthy
    assert lost.problems == (Problem("nvml", Severity.CRITICAL, detail, Remedy.DRAIN_NODE),)
    unread = (Problem("nvml", Severity.CRITICAL, "not read: NVML unavailable"),)
    assert lost.gpus == (GpuHealth(0, "GPU-0", unread), GpuHealth(1, "GPU-1", unread))
    assert [g.remedy for g in lost.gpus] == [Remedy.NONE, Remedy.NONE]  # no cordon for it
    assert lost.unhealthy_gpus() == {"node-a/gpu0", "node-a/gpu1"}
    assert backends[0].closed and opened == backends
    assert again.healthy
    node = {"node": "node-a", "check": "nvml", "severity": "critical"}
    assert sample(watcher, "shoal_gpu_node_problems", **node) is None  # gone once healthy


def test_a_gpu_that_disappears_is_listed_missing_and_its_readings_removed() -> None:
    backend = ScriptedBackend(two_gpus())
    watcher, _, _ = make_watcher(lambda: backend)
    gpu1 = {"node": "node-a", "gpu": "1", "uuid": "GPU-1"}

    async def body() -> None:
        try:
            await watcher.check_once()
            assert sample(watcher, "shoal_gpu_temperature_celsius", **gpu1) == 41.0
            del backend.gpus[1]
            await watcher.check_once()
        finally:
            await watcher.close()

    asyncio.run(body())
    assert sample(watcher, "shoal_gpu_healthy", **gpu1) == 0.0  # listed: critical "missing"
    assert sample(watcher, "shoal_gpu_temperature_celsius", **gpu1) is None  # no stale reading
    assert watcher.latest is not None
    assert watcher.latest.unhealthy_gpus() == {"node-a/gpu0", "node-a/gpu1"}
    # the node-level critical gpu_count puts every GPU of the node out
    assert sample(watcher, "shoal_gpu_healthy", node="node-a", gpu="0", uuid="GPU-0") == 0.0


def test_a_hot_gpu_is_unhealthy_with_its_problem_counted() -> None:
    gpus = two_gpus()
    gpus[0] = replace(gpus[0], temperature_c=95)
    watcher, _, _ = make_watcher(lambda: ScriptedBackend(gpus))

    async def body() -> NodeHealth:
        try:
            return await watcher.check_once()
        finally:
            await watcher.close()

    health = asyncio.run(body())
    assert health.unhealthy_gpus() == {"node-a/gpu0"}
    gpu0 = {"node": "node-a", "gpu": "0", "uuid": "GPU-0"}
    assert sample(watcher, "shoal_gpu_healthy", **gpu0) == 0.0
    assert sample(watcher, "shoal_gpu_problems", **gpu0, check="temperature", severity="critical") == 1.0  # fmt: skip


def test_an_xid_checks_at_once_and_a_clear_forgets_it_before_the_next_collect() -> None:
    backend = ScriptedBackend(two_gpus())
    watcher, ledger, _ = make_watcher(lambda: backend)  # interval 3600 s: only wakes check

    async def until(predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not predicate():
                await asyncio.sleep(0.01)

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        try:
            await until(lambda: watcher.latest is not None)
            backend.xids.put(XidEvent(1, 79, 1000.5, "GPU-1"))
            await until(lambda: watcher.latest is not None and not watcher.latest.healthy)
            assert watcher.latest is not None
            assert watcher.latest.unhealthy_gpus() == {"node-a/gpu1"}
            watcher.request_clear(1)
            await until(lambda: watcher.latest is not None and watcher.latest.healthy)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
            await watcher.close()

    asyncio.run(body())
    assert ledger.calls == [("record", 79), ("clear", 1)]
    labels = {"node": "node-a", "gpu": "1", "uuid": "GPU-1", "xid": "79"}
    assert sample(watcher, "shoal_gpu_xid_events_total", **labels) == 1.0
    assert backend.closed


def test_the_xid_thread_stops_within_one_wait_and_reports_a_backend_failure() -> None:
    backend = ScriptedBackend(two_gpus())
    notified: list[int] = []
    pump = XidPump(backend, wait_s=0.05, notify=lambda: notified.append(1))
    pump.start()
    backend.xids.put(XidEvent(0, 48, 1.0))
    assert pump.stop()
    assert not pump.alive
    assert [e.xid for e in pump.take_events()] == [48]
    assert notified == [1]

    class Failing(ScriptedBackend):
        def wait_xid(self, timeout_s: float) -> list[XidEvent]:
            raise BackendError("event set lost")

    failing = XidPump(Failing({}), wait_s=0.05, notify=lambda: notified.append(2))
    failing.start()
    assert failing.stop()  # it had ended on its own
    assert failing.failure == "event set lost" and notified == [1]  # no wake: no spin


@pytest.mark.parametrize("lost", [False, True])
def test_close_stops_the_xid_thread_and_closes_the_backend(lost: bool) -> None:
    backend = ScriptedBackend(two_gpus())
    watcher, _, _ = make_watcher(lambda: backend)

    pumps: list[XidPump | None] = []

    async def body() -> None:
        await watcher.check_once()
        pumps.append(watcher._pump)
        backend.lost = lost
        if lost:
            await watcher.check_once()  # closes the backend itself
            pumps.append(watcher._pump)
        await watcher.close()

    asyncio.run(body())
    assert backend.closed
    first = pumps[0]
    assert first is not None and not first.alive and backend.waits >= 1
    assert pumps[1:] == ([None] if lost else [])


def test_a_failed_xid_watch_is_counted_and_restarted_at_the_next_round() -> None:
    class FlakyEvents(ScriptedBackend):
        fail_once = threading.Event()

        def wait_xid(self, timeout_s: float) -> list[XidEvent]:
            if self.fail_once.is_set():
                self.fail_once.clear()
                raise BackendError("nvmlEventSetWait: Unknown Error")
            return super().wait_xid(timeout_s)

    backend = FlakyEvents(two_gpus())
    watcher, _, _ = make_watcher(lambda: backend)

    async def body() -> None:
        try:
            await watcher.check_once()
            first = watcher._pump
            assert first is not None
            backend.fail_once.set()
            async with asyncio.timeout(10):
                while first.alive:
                    await asyncio.sleep(0.01)
            assert first.failure == "nvmlEventSetWait: Unknown Error"
            health = await watcher.check_once()
            assert health.healthy  # an XID watch failure is not a GPU fault
            assert watcher._pump is not first and watcher._pump is not None
            assert watcher._pump.alive
        finally:
            await watcher.close()

    asyncio.run(body())
    assert sample(watcher, "shoal_gpu_check_errors_total") == 1.0


class NoEventsBackend(ScriptedBackend):
    """XID events not supported (some vGPU/MIG setups): ``wait_xid`` fails at once."""

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        self.waits += 1
        raise BackendError("nvmlEventSetCreate: Not Supported")


def test_xid_events_not_supported_are_retried_once_then_left_off_until_a_reopen(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="shoal.control.health.watch")
    backends = [NoEventsBackend(two_gpus()), NoEventsBackend(two_gpus())]
    opened: list[NoEventsBackend] = []

    def opener() -> NoEventsBackend:
        opened.append(backends[len(opened)])
        return opened[-1]

    watcher, _, _ = make_watcher(opener, collect=reporting_collect)

    async def settle(backend: NoEventsBackend, waits: int) -> None:
        async with asyncio.timeout(5):  # the XID thread fails on its own thread
            while backend.waits < waits or (watcher._pump is not None and watcher._pump.alive):
                await asyncio.sleep(0.01)

    async def body() -> None:
        try:
            await watcher.check_once()
            await settle(backends[0], 1)
            await watcher.check_once()  # failed once: restarted
            await settle(backends[0], 2)
            for _ in range(5):  # failed again: left off, no thread per round
                await watcher.check_once()
            assert backends[0].waits == 2
            assert sample(watcher, "shoal_gpu_check_errors_total") == 2.0
            messages = [(r.levelno, r.getMessage()) for r in caplog.records]
            assert sum("restarting it" in m for _, m in messages) == 1
            assert [lvl for lvl, m in messages if "XID events are off" in m] == [logging.INFO]
            backends[0].lost = True  # NVML lost: reopened, the XID thread is tried again
            await watcher.check_once()
            await watcher.check_once()
            await settle(backends[1], 1)
            assert backends[1].waits >= 1
        finally:
            await watcher.close()

    asyncio.run(body())
