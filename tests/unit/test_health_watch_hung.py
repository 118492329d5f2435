"""A check that hangs (NVML blocked on a GPU falling off the bus): the watcher reports
``check_hung`` after its deadline instead of serving the last healthy report, never
closes the backend under the hung thread, and still stops at once (no sockets)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import pytest

from control.health.metrics import HealthMetrics
from control.health.types import GpuSnapshot, NodeHealth, Remedy, Severity
from control.health.watch import HUNG_MIN_S, Watcher
from tests.unit.test_health_watch import Clock, ScriptedBackend, ScriptedLedger, two_gpus


class HangingBackend(ScriptedBackend):
    """``snapshot(1)`` blocks while ``hang`` is set, until ``release`` is."""

    def __init__(self) -> None:
        super().__init__(two_gpus())
        self.hang = False
        self.release = threading.Event()
        self.snapshots = 0
        self.opened = False

    def snapshot(self, index: int) -> GpuSnapshot:
        self.snapshots += 1
        if self.hang and index == 1:
            self.release.wait(30)
        return super().snapshot(index)


def watcher_on(backends: list[HangingBackend], deadline_s: float = 0.2) -> Watcher:
    clock = Clock(1000.0)
    return Watcher(
        lambda: _next(backends),
        node="n",
        interval_s=3600.0,
        xid_wait_s=0.05,
        metrics=HealthMetrics(),
        ledger=ScriptedLedger(),
        clock=clock,
        check_deadline_s=deadline_s,
    )


def is_closed(backend: HangingBackend) -> bool:
    return backend.closed


def _next(backends: list[HangingBackend]) -> HangingBackend:
    opened = [b for b in backends if b.opened]
    backend = backends[len(opened)]
    backend.opened = True
    return backend


def test_the_deadline_defaults_to_three_intervals_or_30_s() -> None:
    assert Watcher(lambda: ScriptedBackend({}), node="n", interval_s=5).check_deadline_s == 30.0
    assert Watcher(lambda: ScriptedBackend({}), node="n", interval_s=20).check_deadline_s == 60.0
    assert HUNG_MIN_S == 30.0


def test_a_hung_check_is_reported_until_it_returns_then_the_backend_is_reopened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = HangingBackend(), HangingBackend()
    watcher = watcher_on([first, second])

    async def body() -> tuple[NodeHealth, NodeHealth, float, NodeHealth, NodeHealth]:
        try:
            healthy = await watcher.check_once()
            first.hang = True
            started = time.monotonic()
            hung = await watcher.check_once()
            took = time.monotonic() - started
            reads = first.snapshots
            again = await watcher.check_once()  # still hung: no second collect on it
            assert first.snapshots == reads and not is_closed(first)
            first.release.set()
            async with asyncio.timeout(5):
                while not is_closed(first):  # the thread returns; the next round retires it
                    back = await watcher.check_once()
                    await asyncio.sleep(0.01)
            return healthy, hung, took, again, back
        finally:
            first.release.set()
            await watcher.close()

    healthy, hung, took, again, back = asyncio.run(body())
    assert healthy.healthy
    assert 0.2 <= took < 5.0
    for report in (hung, again):
        assert [(p.check, p.severity, p.remedy) for p in report.problems] == [
            ("check_hung", Severity.CRITICAL, Remedy.DRAIN_NODE)
        ]
        assert report.unhealthy_gpus() == {"n/gpu0", "n/gpu1"}
    assert watcher.latest is not None and watcher.latest.healthy  # reopened on `second`
    assert first.closed and second.snapshots > 0
    assert back.healthy
    assert any("returned after" in r.getMessage() for r in caplog.records)


def test_stop_during_a_hung_check_returns_at_once_and_leaves_the_backend_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="shoal.control.health.watch")
    backend = HangingBackend()
    backend.hang = True
    watcher = watcher_on([backend], deadline_s=60.0)

    async def body() -> float:
        stop = asyncio.Event()
        run = asyncio.create_task(watcher.run(stop))
        async with asyncio.timeout(5):
            while backend.snapshots < 2:  # inside snapshot(1), blocked
                await asyncio.sleep(0.01)
        started = time.monotonic()
        stop.set()
        async with asyncio.timeout(5):
            await run
            await watcher.close()
        return time.monotonic() - started

    try:
        took = asyncio.run(body())
    finally:
        backend.release.set()
    assert took < 3.0
    assert not backend.closed  # never closed under the running check
    assert any("leaving the GPU backend open" in r.getMessage() for r in caplog.records)
