"""The manager's moves against each other: removes, rounds, wakes and registrations that
overlap (in-memory engines; gates stand for slow engines and fetches). Virtual time for
the manager's clock; asyncio only interleaves the calls."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

from control.lora.engines import MemoryEngineApi
from control.lora.errors import AdapterConflict, AdapterNotFound, UnloadFailed
from control.lora.manager import LoraManager
from control.lora.registry import Registry
from router.discovery import StaticDiscovery
from router.types import EngineSpec
from tests.unit.lora_factories import write_adapter
from tests.unit.test_lora_manager import A, B, Fleet

T = TypeVar("T")


def run(scenario: Awaitable[T]) -> T:
    """Run ``scenario``; a hang (a call waiting on another's slow I/O) fails in 5 s."""

    async def bounded() -> T:
        return await asyncio.wait_for(scenario, 5.0)

    return asyncio.run(bounded())


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def gate_unloads(fleet: Fleet) -> asyncio.Event:
    gate = asyncio.Event()
    unload = fleet.api.unload

    async def slow(url: str, name: str) -> bool:
        await gate.wait()
        return await unload(url, name)

    fleet.api.unload = slow  # type: ignore[method-assign]
    return gate


def test_a_round_during_a_remove_does_not_load_the_adapter_back(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), adapters=("x",))
    fleet.traffic.now = {"x": 5.0}  # traffic would place x again
    fleet.round()

    async def scenario() -> list[str]:
        gate = gate_unloads(fleet)
        fleet.clock.now += 5
        removing = asyncio.ensure_future(fleet.manager.remove("x"))
        await settle()  # the remove is unloading x
        record = await fleet.manager.run_round()  # does not wait for the remove
        assert (record.loads, record.unloads) == ((), ())
        gate.set()
        return await removing

    assert run(scenario()) == [A]
    assert "x" not in fleet.registry.adapters
    assert fleet.loaded() == {A: set()}
    assert fleet.round() == []
    assert fleet.loaded() == {A: set()}


def test_remove_keeps_the_adapter_while_an_engine_cannot_unload_it(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, adapters=("x",))
    fleet.traffic.now = {"x": 25.0}
    fleet.round()
    assert fleet.loaded() == {A: {"x"}, B: {"x"}}
    fleet.api.down.add(A)
    fleet.clock.now += 5  # the remove reads the engines again: A does not answer
    with pytest.raises(UnloadFailed, match=f"failed on {A} .*stays registered"):
        asyncio.run(fleet.manager.remove("x"))
    assert "x" in Registry(tmp_path / "dir", tmp_path / "state.json").adapters
    assert fleet.loaded() == {A: {"x"}, B: set()}
    fleet.api.down.clear()
    fleet.clock.now += 5
    assert asyncio.run(fleet.manager.remove("x")) == [A]
    assert fleet.loaded() == {A: set(), B: set()}
    assert "x" not in fleet.registry.adapters


def test_a_wake_during_a_remove_is_not_found(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), adapters=("x",))
    fleet.traffic.now = {"x": 5.0}
    fleet.round()

    async def scenario() -> list[object]:
        gate = gate_unloads(fleet)
        removing = asyncio.ensure_future(fleet.manager.remove("x"))
        await settle()
        waking = asyncio.ensure_future(fleet.manager.wake("x"))
        await settle()
        gate.set()
        return list(await asyncio.gather(removing, waking, return_exceptions=True))

    removed, woken = run(scenario())
    assert removed == [A]
    assert isinstance(woken, AdapterNotFound), woken
    assert fleet.manager.metrics.wakes.labels(result="unknown")._value.get() == 1
    assert fleet.loaded() == {A: set()}


def test_a_slow_engine_stalls_neither_other_wakes_nor_rounds(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, adapters=("x", "y"), wake_wait_s=0.05)
    fleet.round()
    gate = asyncio.Event()
    load = fleet.api.load

    async def hung_on_a(url: str, name: str, path: str) -> bool:
        if url == A:
            await gate.wait()
        return await load(url, name, path)

    fleet.api.load = hung_on_a  # type: ignore[method-assign]
    manager = fleet.manager

    async def scenario() -> None:
        assert await manager.wake("x") == [A]  # answered while A still loads it
        assert await manager.wake("y") == [B]  # B is free: not behind x's load
        assert fleet.loaded() == {A: set(), B: {"y"}}
        fleet.clock.now += 5
        record = await manager.run_round()  # neither waits for A nor moves x meanwhile
        assert (record.loads, record.unloads) == ((), ())
        assert await manager.wake("x") == [A]  # shares the load in flight
        gate.set()
        assert await manager._waking["x"].task == [A]

    run(scenario())
    assert fleet.loaded() == {A: {"x"}, B: {"y"}}
    assert [c for c in fleet.api.calls if c[0] == "load"] == [("load", B, "y"), ("load", A, "x")]
    wakes = manager.metrics.wakes
    assert wakes.labels(result="started")._value.get() == 2
    assert wakes.labels(result="loaded")._value.get() == 1


class SlowFetches:
    """A registry's fetch that takes a while and records how many ran at once."""

    def __init__(self, tmp_path: Path) -> None:
        self.sources = {
            s: write_adapter(tmp_path / "src" / s[-1]) for s in ("s3://b/1", "s3://b/2")
        }
        self.running = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, source: str, adapter_dir: Path, name: str) -> Path:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(0.05)
        dest = adapter_dir / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.sources[source], dest)
        with self.lock:
            self.running -= 1
        return dest


def test_concurrent_registrations_of_a_name_conflict_and_never_fetch_at_once(
    tmp_path: Path,
) -> None:
    fetches = SlowFetches(tmp_path)
    registry = Registry(tmp_path / "dir", tmp_path / "state.json", fetch=fetches)
    manager = LoraManager(registry, StaticDiscovery([]), MemoryEngineApi({}))

    async def scenario() -> list[object]:
        return list(await asyncio.gather(
            manager.register("x", "llama", "s3://b/1"),
            manager.register("x", "llama", "s3://b/2"),
            manager.register("x", "llama", "s3://b/1"),
            return_exceptions=True,
        ))  # fmt: skip

    first, second, third = run(scenario())
    assert getattr(first, "source", None) == "s3://b/1"
    assert isinstance(second, AdapterConflict), second
    assert getattr(third, "source", None) == "s3://b/1"  # the same again: its copy refreshed
    assert fetches.most == 1
    assert Registry(tmp_path / "dir", tmp_path / "state.json").adapters["x"].source == "s3://b/1"


def test_an_unknown_budget_is_warned_once_per_engine(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = Fleet(tmp_path, budget=0)
    caplog.set_level(logging.WARNING, logger="shoal.control.lora.manager")
    fleet.round()
    fleet.round()
    warned = [r.getMessage() for r in caplog.records if "max_lora" in r.getMessage()]
    assert len(warned) == 2 and warned[0].startswith(A) and warned[1].startswith(B)
    assert fleet.manager.budget_of(A) == 1


def test_close_cancels_a_wake_still_loading_and_ends_its_claim(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), adapters=("x",), wake_wait_s=0.01)
    fleet.round()
    hung = asyncio.Event()

    async def never(url: str, name: str, path: str) -> bool:
        await hung.wait()
        return True

    fleet.api.load = never  # type: ignore[method-assign]

    async def scenario() -> None:
        assert await fleet.manager.wake("x") == [A]
        task = fleet.manager._waking["x"].task
        await fleet.manager.close()
        assert task.cancelled()
        assert fleet.manager._moves.pairs() == []

    run(scenario())


def test_a_pin_on_an_engine_gone_from_discovery_does_not_block_a_removal(
    tmp_path: Path,
) -> None:
    fleet = Fleet(tmp_path, adapters=("x",))
    fleet.round()
    assert asyncio.run(fleet.manager.load("x", B)) == [B]
    del fleet.api.engines[B]  # scaled in: gone from discovery, unreachable
    fleet.manager.discovery = StaticDiscovery([EngineSpec(A)])
    fleet.clock.now += 5
    assert asyncio.run(fleet.manager.remove("x")) == []
    assert "x" not in fleet.registry.adapters and fleet.registry.pins == set()


def test_wakes_of_many_adapters_share_one_read_of_the_engines(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, budget=3)
    fleet.round()
    polls: list[str] = []
    models = fleet.api.models

    async def counted(url: str, *, with_budget: bool = False) -> object:
        polls.append(url)
        await asyncio.sleep(0)
        return await models(url, with_budget=with_budget)

    fleet.api.models = counted  # type: ignore[assignment]
    fleet.clock.now += 5  # the views are one interval old: wakes read the engines again

    async def scenario() -> list[list[str]]:
        wakes = (fleet.manager.wake(n) for n in ("x", "y", "z"))
        return list(await asyncio.gather(*wakes))

    assert run(scenario()) == [[A], [B], [A]]
    assert sorted(polls) == [A, B]
