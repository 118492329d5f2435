"""The watcher over health-core's real pieces: FakeBackend (a TOML file), report.collect
and XidLedger, in-process on a virtual wall clock (files, no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from control.health.fake import FakeBackend
from control.health.mockfile import Injection, inject
from control.health.types import NodeHealth, Problem, Remedy, Severity
from control.health.watch import Watcher

XID_79 = Problem("xid", Severity.CRITICAL, "XID 79: GPU has fallen off the bus", Remedy.DRAIN_NODE)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def test_a_fault_file_read_through_collect_and_the_ledger(tmp_path: Path) -> None:
    mock = tmp_path / "node.toml"
    inject(mock, Injection("card_count", None, 2))
    clock = Clock()
    watcher = Watcher(
        lambda: FakeBackend(mock), node="node-a", expect_gpus=2, xid_wait_s=0.05, clock=clock
    )

    async def until(predicate: Callable[[NodeHealth], bool]) -> NodeHealth:
        async with asyncio.timeout(10):
            while not predicate(health := await watcher.check_once()):
                await asyncio.sleep(0.02)
        return health

    async def body() -> list[NodeHealth]:
        try:
            first = await watcher.check_once()
            inject(mock, Injection("xid", 1, 79))  # the XID thread delivers it
            xid = await until(lambda h: not h.healthy)
            watcher.request_clear(1)
            cleared = await watcher.check_once()
            inject(mock, Injection("fail_read", 0))
            clock.now += 10
            unreadable = await watcher.check_once()
            get = watcher.metrics.registry.get_sample_value
            labels = {"node": "node-a", "gpu": "0", "uuid": ""}  # unread: no UUID either
            assert get("shoal_gpu_healthy", labels) == 0.0
            assert get("shoal_gpu_temperature_celsius", labels) is None  # no stale reading
            inject(mock, Injection("card_count", None, 1))
            inject(mock, Injection("clear", None))
            short = await watcher.check_once()
            return [first, xid, cleared, unreadable, short]
        finally:
            await watcher.close()

    first, xid, cleared, unreadable, short = asyncio.run(body())
    assert first.healthy and [g.index for g in first.gpus] == [0, 1] and first.time == 5000.0
    assert xid.gpus[1].problems == (XID_79,) and xid.unhealthy_gpus() == {"node-a/gpu1"}
    assert cleared.healthy
    assert unreadable.time == 5010.0
    assert [p.check for p in unreadable.gpus[0].problems] == ["unreadable"]
    assert unreadable.gpus[0].remedy is Remedy.RESET_GPU  # the cordoner waits for it to persist
    # the GPU that went away is listed, critical "missing": its engines go out by name
    assert [g.index for g in short.gpus] == [0, 1]
    assert [(p.check, p.remedy) for p in short.gpus[1].problems] == [("missing", Remedy.DRAIN_NODE)]
    assert short.unhealthy_gpus() == {"node-a/gpu0", "node-a/gpu1"}
    assert [(p.check, p.severity) for p in short.problems] == [("gpu_count", Severity.CRITICAL)]
    get = watcher.metrics.registry.get_sample_value
    gone = {"node": "node-a", "gpu": "1", "uuid": "GPU-00000000-0000-4000-8000-000000000001"}
    assert get("shoal_gpu_healthy", gone) is None  # the card left: its series too
    assert get("shoal_gpu_healthy", {**gone, "uuid": ""}) == 0.0  # listed, unread
    gpu0 = {"node": "node-a", "gpu": "0", "uuid": "GPU-00000000-0000-4000-8000-000000000000"}
    assert get("shoal_gpu_temperature_celsius", gpu0) == 35.0
    assert get("shoal_gpu_xid_events_total", {**gone, "xid": "79"}) is None


def check(watcher: Watcher) -> NodeHealth:
    async def body() -> NodeHealth:
        try:
            return await watcher.check_once()
        finally:
            await watcher.close()

    return asyncio.run(body())


@pytest.mark.parametrize(
    ("visible", "remedy"), [(7, Remedy.DRAIN_NODE), (0, Remedy.NONE)], ids=["7-of-8", "0-of-8"]
)
def test_fewer_gpus_than_expected_lists_the_missing_ones_unhealthy(
    tmp_path: Path, visible: int, remedy: Remedy
) -> None:
    mock = tmp_path / "node.toml"
    inject(mock, Injection("card_count", None, visible))
    watcher = Watcher(lambda: FakeBackend(mock), node="n", expect_gpus=8, clock=Clock())
    health = check(watcher)
    assert [g.index for g in health.gpus] == list(range(8))
    missing = [g for g in health.gpus if g.index >= visible]
    assert all([(p.check, p.remedy) for p in g.problems] == [("missing", remedy)] for g in missing)
    assert all(not g.healthy for g in missing) and len(missing) == 8 - visible
    assert health.unhealthy_gpus() == {f"n/gpu{i}" for i in range(8)}


def test_without_expect_gpus_a_gpu_seen_earlier_and_gone_is_missing(tmp_path: Path) -> None:
    mock = tmp_path / "node.toml"
    inject(mock, Injection("card_count", None, 3))
    watcher = Watcher(lambda: FakeBackend(mock), node="n", clock=Clock())

    async def body() -> list[NodeHealth]:
        try:
            first = await watcher.check_once()
            inject(mock, Injection("card_count", None, 2))
            second = await watcher.check_once()
            inject(mock, Injection("card_count", None, 3))
            back = await watcher.check_once()
            return [first, second, back]
        finally:
            await watcher.close()

    first, second, back = asyncio.run(body())
    assert first.healthy and first.unhealthy_gpus() == frozenset()
    assert [g.index for g in second.gpus] == [0, 1, 2]
    assert [p.check for p in second.gpus[2].problems] == ["missing"]
    assert second.gpus[2].uuid == first.gpus[2].uuid  # the one seen earlier
    assert [(p.check, p.severity) for p in second.problems] == [("gpu_count", Severity.CRITICAL)]
    assert second.unhealthy_gpus() == {"n/gpu0", "n/gpu1", "n/gpu2"}
    assert back.healthy


def test_a_state_file_keeps_critical_xids_over_a_watcher_restart_until_cleared(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mock, state = tmp_path / "node.toml", tmp_path / "xids.json"
    inject(mock, Injection("card_count", None, 2))

    def watcher() -> Watcher:
        return Watcher(
            lambda: FakeBackend(mock), node="n", xid_wait_s=0.05, clock=Clock(), state_file=state
        )

    async def first_life() -> NodeHealth:
        w = watcher()
        try:
            inject(mock, Injection("xid", 1, 79))
            async with asyncio.timeout(10):
                while (health := await w.check_once()).healthy:
                    await asyncio.sleep(0.02)
            await w.check_once()  # the check after the XID was recorded writes the file
            return health
        finally:
            await w.close()

    async def later_life(clear: bool) -> NodeHealth:
        w = watcher()
        try:
            health = await w.check_once()
            if clear:
                w.request_clear(1)
                health = await w.check_once()
            return health
        finally:
            await w.close()

    assert first_life_unhealthy(asyncio.run(first_life()))
    inject(mock, Injection("clear", None))  # the fake would deliver it again otherwise
    inject(mock, Injection("card_count", None, 2))
    restarted = asyncio.run(later_life(clear=False))
    assert restarted.unhealthy_gpus() == {"n/gpu1"}  # remembered, not re-delivered
    assert restarted.gpus[1].problems == (XID_79,)
    assert asyncio.run(later_life(clear=True)).healthy  # POST /v1/clear's path
    assert asyncio.run(later_life(clear=False)).healthy  # and the clear was saved
    state.write_text("{not json")
    assert asyncio.run(later_life(clear=False)).healthy
    assert any("starting empty" in r.getMessage() for r in caplog.records)


def first_life_unhealthy(health: NodeHealth) -> bool:
    return health.unhealthy_gpus() == {"n/gpu1"}
