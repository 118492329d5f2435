"""The watcher over health-core's real pieces: FakeBackend (a TOML file), report.collect
and XidLedger, in-process on a virtual wall clock (files, no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

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
    assert unreadable.gpus[0].remedy is Remedy.DRAIN_NODE
    assert [g.index for g in short.gpus] == [0]
    assert [(p.check, p.severity) for p in short.problems] == [("gpu_count", Severity.CRITICAL)]
    get = watcher.metrics.registry.get_sample_value
    gone = {"node": "node-a", "gpu": "1", "uuid": "GPU-00000000-0000-4000-8000-000000000001"}
    assert get("shoal_gpu_healthy", gone) is None  # the card left: its series too
    gpu0 = {"node": "node-a", "gpu": "0", "uuid": "GPU-00000000-0000-4000-8000-000000000000"}
    assert get("shoal_gpu_temperature_celsius", gpu0) == 35.0
    assert get("shoal_gpu_xid_events_total", {**gone, "xid": "79"}) is None
