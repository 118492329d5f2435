"""The LoRA manager's loop on virtual time, against in-memory engines (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

import pytest

from control.lora.engines import MemoryEngineApi
from control.lora.errors import AdapterNotFound, NoEngine
from control.lora.manager import LoraManager
from control.lora.registry import Registry
from control.lora.types import Move
from router.discovery import StaticDiscovery
from router.types import EngineSpec
from tests.unit.lora_factories import write_adapter

A, B = "http://a:8000", "http://b:8000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Rates:
    """Router traffic as a test sets it: ``now`` = requests/s per adapter."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}

    async def rates(self) -> dict[str, float]:
        return dict(self.now)

    async def close(self) -> None:
        pass


class Fleet:
    """A manager over in-memory engines with a virtual clock."""

    def __init__(self, tmp_path: Path, urls: Iterable[str] = (A, B), budget: int = 2,
                 adapters: Iterable[str] = ("x", "y", "z"), **options: float) -> None:  # fmt: skip
        self.clock = Clock()
        self.api = MemoryEngineApi({url: ("llama", set()) for url in urls})
        self.traffic = Rates()
        self.registry = Registry(tmp_path / "dir", tmp_path / "state.json")
        for name in adapters:
            folder = write_adapter(tmp_path / "src" / name)
            self.registry.add(self.registry.prepare(name, "llama", str(folder)))
        self.discovery = StaticDiscovery([EngineSpec(url) for url in urls])
        self.manager = LoraManager(
            self.registry, self.discovery, self.api, self.traffic, budget=budget,
            clock=self.clock, interval_s=5.0, idle_unload_s=60.0, **options,  # type: ignore[arg-type]
        )  # fmt: skip

    def loaded(self) -> dict[str, set[str]]:
        return {url: set(loaded) for url, (_, loaded) in self.api.engines.items()}

    def round(self, advance: float = 5.0) -> list[Move]:
        self.clock.now += advance
        record = asyncio.run(self.manager.run_round())
        return [*record.unloads, *record.loads]


def test_traffic_places_adapters_and_idle_ones_go(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.traffic.now = {"x": 3.0, "y": 1.0}
    assert fleet.round() == [Move(A, "x", "place"), Move(B, "y", "place")]
    fleet.traffic.now = {"x": 3.0}
    assert fleet.round() == []  # y: last used 5 s ago, idle after 60 s
    assert fleet.round(60.0) == [Move(B, "y", "idle")]
    assert fleet.loaded() == {A: {"x"}, B: set()}
    assert fleet.manager.metrics.unloads.labels(reason="idle")._value.get() == 1


def test_restarted_engine_gets_its_adapters_back(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.traffic.now = {"x": 3.0, "y": 1.0}
    fleet.round()
    fleet.api.engines[B] = ("llama", set())  # B restarted with nothing loaded
    assert fleet.round() == [Move(B, "y", "restore")]
    assert fleet.loaded() == {A: {"x"}, B: {"y"}}


def test_new_engine_gets_a_copy_of_the_hot_adapter(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), replica_rate=10.0)
    fleet.traffic.now = {"x": 15.0}
    assert fleet.round() == [Move(A, "x", "place")]
    fleet.api.engines[B] = ("llama", set())
    fleet.manager.discovery = StaticDiscovery([EngineSpec(A), EngineSpec(B)])
    assert fleet.round() == [Move(B, "x", "replicate")]


def test_failed_load_is_retried_with_backoff(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), retry_base_s=10.0, retry_max_s=40.0)
    fleet.api.fail_loads[A] = 3
    fleet.traffic.now = {"x": 1.0}
    record_moves = fleet.round()
    assert record_moves == []
    assert fleet.manager.failures[(A, "x")] == (1, fleet.clock.now + 10.0)
    fleet.round(5.0)  # in backoff: no call
    assert [c for c in fleet.api.calls if c[0] == "load"] == [("load", A, "x")]
    fleet.round(5.0)  # 10 s later: retried, fails again, next wait 20 s
    assert fleet.manager.failures[(A, "x")] == (2, fleet.clock.now + 20.0)
    fleet.round(20.0)
    assert fleet.manager.failures[(A, "x")] == (3, fleet.clock.now + 40.0)
    assert fleet.round(40.0) == [Move(A, "x", "restore")]
    assert fleet.manager.failures == {}
    assert fleet.manager.metrics.load_failures._value.get() == 3
    assert fleet.loaded() == {A: {"x"}}


def test_unreachable_engine_is_skipped_and_the_round_goes_on(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.api.down.add(A)
    fleet.traffic.now = {"x": 1.0}
    assert fleet.round() == [Move(B, "x", "place")]
    assert fleet.manager.history[-1].unreachable == (A,)


def test_wake_loads_now_and_unknown_is_not_found(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.round()
    assert asyncio.run(fleet.manager.wake("z")) == [A]
    assert fleet.loaded() == {A: {"z"}, B: set()}
    assert asyncio.run(fleet.manager.wake("z")) == [A]  # already there: no second load
    assert [c for c in fleet.api.calls if c[0] == "load"] == [("load", A, "z")]
    with pytest.raises(AdapterNotFound):
        asyncio.run(fleet.manager.wake("nope"))
    # the wake counts as use: the next round keeps it
    assert fleet.round() == []


def test_wake_evicts_the_least_recently_used_when_full(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), budget=2)
    fleet.traffic.now = {"x": 1.0}
    fleet.round()
    fleet.traffic.now = {"y": 1.0}
    fleet.round()
    fleet.traffic.now = {}
    fleet.clock.now += 1
    assert asyncio.run(fleet.manager.wake("z")) == [A]
    assert fleet.loaded() == {A: {"y", "z"}}  # x, used longest ago, made room
    assert fleet.manager.metrics.evictions._value.get() == 1


def test_manual_load_pins_until_unload(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.round()
    assert asyncio.run(fleet.manager.load("x", B)) == [B]
    assert fleet.registry.pins == {(B, "x")}
    assert fleet.round(600.0) == []  # long idle, but pinned
    assert asyncio.run(fleet.manager.unload("x")) == [B]
    assert fleet.loaded() == {A: set(), B: set()}
    assert fleet.registry.pins == set()
    with pytest.raises(NoEngine):
        asyncio.run(fleet.manager.load("x", "http://unknown:1"))


def test_restarted_manager_keeps_registry_and_loaded_adapters(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.traffic.now = {"x": 1.0}
    fleet.round()
    again = LoraManager(
        Registry(tmp_path / "dir", tmp_path / "state.json"), fleet.discovery, fleet.api,
        Rates(), budget=2, clock=fleet.clock, idle_unload_s=60.0,
    )  # fmt: skip
    assert sorted(again.registry.adapters) == ["x", "y", "z"]
    fleet.clock.now += 5
    record = asyncio.run(again.run_round())
    assert record.unloads == record.loads == ()  # x counts as used when first seen
    fleet.clock.now += 60
    record = asyncio.run(again.run_round())
    assert record.unloads == (Move(A, "x", "idle"),)


def test_remove_unloads_everywhere_and_forgets(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.traffic.now = {"x": 25.0}
    fleet.round()
    assert fleet.loaded() == {A: {"x"}, B: {"x"}}
    assert asyncio.run(fleet.manager.remove("x")) == [A, B]
    assert fleet.loaded() == {A: set(), B: set()}
    assert "x" not in Registry(tmp_path / "dir", tmp_path / "state.json").adapters


def test_a_round_that_raises_does_not_end_the_loop(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    calls = []

    async def broken() -> dict[str, float]:
        calls.append(fleet.clock.now)
        if len(calls) == 1:
            raise RuntimeError("a bug in the traffic source")
        return {"x": 1.0}

    fleet.traffic.rates = broken  # type: ignore[method-assign]
    stop = asyncio.Event()

    async def sleep(seconds: float) -> None:
        fleet.clock.now += seconds
        if len(calls) >= 2:
            stop.set()

    fleet.manager._sleep = sleep
    asyncio.run(fleet.manager.run(stop))
    assert len(calls) == 2
    assert fleet.manager.metrics.round_errors._value.get() == 1
    assert fleet.loaded() == {A: {"x"}, B: set()}


def test_concurrent_wakes_share_one_load(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    fleet.round()

    async def both() -> list[list[str]]:
        return list(await asyncio.gather(fleet.manager.wake("x"), fleet.manager.wake("x")))

    assert asyncio.run(both()) == [[A], [A]]
    assert [c for c in fleet.api.calls if c[0] == "load"] == [("load", A, "x")]
    assert fleet.manager.metrics.wakes.labels(result="loaded")._value.get() == 2


def test_wakes_count_as_traffic_averaged_over_the_rate_window(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), rate_window_s=20.0)
    fleet.round()  # t = 1005: the first round (wakes counted from one interval before)
    for _ in range(4):
        asyncio.run(fleet.manager.wake("x"))
    fleet.round()  # t = 1010: 4 wakes over the window so far, 1000 .. 1010
    assert fleet.manager.rates == {"x": 0.4}
    fleet.round()
    fleet.round()  # t = 1020: the window is 1000 .. 1020
    assert fleet.manager.rates == {"x": 0.2}
    fleet.round()  # t = 1025: 1005 .. 1025, the wakes still inside
    assert fleet.manager.rates == {"x": 0.2}
    fleet.round()  # t = 1030: 1010 .. 1030, they left: no traffic
    assert fleet.manager.rates == {}
