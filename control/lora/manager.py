"""The manager: observe engines and traffic, place adapters, load and unload them.

One round, every ``interval_s``::

    specs   = await discovery.engines()             # the router's discovery (same flags)
    models  = await api.models(url) for each        # concurrently; a failure = unreachable
    rates   = await traffic.rates() + wakes         # req/s per model over rate_window_s
    plan    = placement.place(PlacementInput(...))  # pure
    unloads first, then loads, <= max_concurrency in flight; the engines' lists updated

Invariants:

* the loop never dies: an unreachable engine is skipped this round (left
  out of placement, its adapters untouched), and a failed load or unload is logged,
  counted (``shoal_lora_load_failures_total``) and retried after a backoff that doubles
  per failure of that (engine, adapter), from ``retry_base_s`` to ``retry_max_s``; any
  other exception out of a round (a bug) is logged with its traceback, counted
  (``shoal_lora_round_errors_total``) and the next round runs as usual;
* an engine that restarted (it lists fewer adapters than the manager placed there) gets
  them back (``restore``, placement's invariant 5); a new engine from discovery gets
  copies of hot adapters as their traffic asks (``replicate``);
* per engine, unloads happen before loads in a round, so a budget is never exceeded in
  between, even for a moment;
* an adapter seen loaded for the first time (a restarted manager, an operator) counts as
  used then: it stays at least ``idle_unload_s`` without traffic before it is unloaded;
* rounds, wakes and the adapter API take one lock, so their moves never interleave; a
  wake for an adapter already being woken shares that wake's answer.

Rates are smoothed over ``rate_window_s`` (default 60 s, a sliding window of counter
samples, ``traffic.RateWindow``): the router's arrivals inside ``RouterTraffic``, the
manager's own wakes here (a cumulative count per adapter, sampled each round). An adapter
counts as used in every round whose window saw its traffic, so ``idle_unload_s`` starts
once its last request has left the window.

A wake (``POST /v1/wake``, the router holding requests for an adapter no engine lists)
loads it now on ``placement.choose_wake``'s engine (evicting the coldest adapter when
every budget is full), from a view of the engines at most one interval old (read again
when older: a restarted engine is not taken at its old word); it counts as traffic
for the next round. An operator's load (``POST /v1/adapters/NAME/load``) does the same
and pins the adapter there until an unload.

Time and sleeping are injected (``clock``, ``sleep``): unit tests drive rounds on virtual
time with ``engines.MemoryEngineApi``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from control.lora.engines import EngineApi, EngineModels
from control.lora.errors import AdapterNotFound, EngineError, NoEngine
from control.lora.metrics import LoraMetrics
from control.lora.placement import choose_wake, place, priority
from control.lora.registry import Registry
from control.lora.sources import is_remote
from control.lora.traffic import RateWindow
from control.lora.types import AdapterSpec, EngineState, Move, PlacementInput, Usage
from router.discovery import Discovery

__all__ = ["EngineView", "LoraManager", "RoundRecord", "Traffic"]

log = logging.getLogger("shoal." + __name__)


class Traffic(Protocol):
    async def rates(self) -> dict[str, float]: ...

    async def close(self) -> None: ...


class NoTraffic:
    """No router configured: adapters' traffic is wakes and loads only."""

    async def rates(self) -> dict[str, float]:
        return {}

    async def close(self) -> None:
        pass


@dataclass(slots=True)
class EngineView:
    url: str
    healthy: bool = False
    base_model: str = ""
    loaded: set[str] = field(default_factory=set)
    error: str = ""


@dataclass(frozen=True, slots=True)
class RoundRecord:
    now_s: float
    engines: int
    unreachable: tuple[str, ...] = ()
    loads: tuple[Move, ...] = ()
    unloads: tuple[Move, ...] = ()
    failed: tuple[str, ...] = ()
    unplaced: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        def moves(ms: tuple[Move, ...]) -> list[dict[str, str]]:
            return [{"engine": m.engine, "adapter": m.adapter, "reason": m.reason} for m in ms]

        return {
            "now_s": round(self.now_s, 3),
            "engines": self.engines,
            "unreachable": list(self.unreachable),
            "loads": moves(self.loads),
            "unloads": moves(self.unloads),
            "failed": list(self.failed),
            "unplaced": list(self.unplaced),
        }


class LoraManager:
    def __init__(
        self,
        registry: Registry,
        discovery: Discovery,
        api: EngineApi,
        traffic: Traffic | None = None,
        *,
        interval_s: float = 5.0,
        idle_unload_s: float = 600.0,
        budget: int = 0,
        replica_rate: float = 10.0,
        hysteresis: float = 0.2,
        balance: float = 0.5,
        rate_window_s: float = 60.0,
        max_concurrency: int = 8,
        retry_base_s: float = 2.0,
        retry_max_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        history: int = 20,
    ) -> None:
        self.registry = registry
        self.discovery = discovery
        self.api = api
        self.traffic: Traffic = traffic or NoTraffic()
        self.interval_s = interval_s
        self.idle_unload_s = idle_unload_s
        self.budget = budget
        self.replica_rate = replica_rate
        self.hysteresis = hysteresis
        self.rate_window_s = rate_window_s
        self.balance = balance
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.metrics = LoraMetrics()
        self._clock = clock
        self._sleep = sleep
        self._limit = asyncio.Semaphore(max_concurrency)
        self._lock = asyncio.Lock()
        self.views: dict[str, EngineView] = {}
        self.budgets: dict[str, int] = {}  # max_loras read from engines (budget 0)
        self.assigned: dict[str, set[str]] = {}
        self.last_used: dict[str, float] = {}
        self.rates: dict[str, float] = {}
        self.failures: dict[tuple[str, str], tuple[int, float]] = {}  # (count, retry at)
        self._wakes: dict[str, int] = {}  # per adapter, cumulative (sampled each round)
        self._wake_window = RateWindow(rate_window_s)
        self._waking: dict[str, asyncio.Task[list[str]]] = {}
        self._round_at: float | None = None  # when the last round started
        self._seen_at: float | None = None  # when the engines were last read
        self.history: deque[RoundRecord] = deque(maxlen=history)
        self.metrics.registered.set(len(registry.adapters))

    # -- observing ------------------------------------------------------------------

    def budget_of(self, url: str) -> int:
        return self.budget or self.budgets.get(url, 1)

    async def _poll(self, url: str) -> EngineView:
        want_budget = self.budget == 0 and url not in self.budgets
        try:
            models: EngineModels = await self.api.models(url, with_budget=want_budget)
        except EngineError as exc:
            return EngineView(url, healthy=False, error=str(exc))
        if want_budget and models.max_loras:
            self.budgets[url] = models.max_loras
        return EngineView(url, True, models.base_model, set(models.adapters))

    async def observe(self) -> None:
        """Discovery, then every engine's ``/v1/models``; ``views`` holds the answers."""
        urls = [spec.url for spec in await self.discovery.engines()]
        views = await asyncio.gather(*(self._poll(url) for url in urls))
        for gone in set(self.views) - set(urls):
            self.assigned.pop(gone, None)
            self.budgets.pop(gone, None)
            with contextlib.suppress(KeyError):  # never labelled if never healthy
                self.metrics.loaded.remove(gone)
        for view in views:
            before = self.views.get(view.url)
            if not view.healthy:
                self.budgets.pop(view.url, None)  # re-read when it is back
            elif before is not None and before.healthy:
                lost = self.assigned.get(view.url, set()) - view.loaded
                if lost:
                    log.warning("engine %s lost adapters %s (restarted?); reloading",
                                view.url, sorted(lost))  # fmt: skip
        self.views = {view.url: view for view in views}
        now = self._seen_at = self._clock()
        for view in views:
            if view.healthy:
                self.metrics.loaded.labels(engine=view.url).set(len(view.loaded))
                for name in view.loaded:
                    if name in self.registry.adapters:
                        self.last_used.setdefault(name, now)
        healthy = sum(1 for v in views if v.healthy)
        self.metrics.engines.labels(state="healthy").set(healthy)
        self.metrics.engines.labels(state="unreachable").set(len(views) - healthy)

    def _placement_input(self, now: float) -> PlacementInput:
        pins: dict[str, set[str]] = {}
        for url, name in self.registry.pins:
            pins.setdefault(url, set()).add(name)
        engines = tuple(
            EngineState(
                url=v.url,
                base_model=v.base_model,
                budget=self.budget_of(v.url),
                loaded=frozenset(v.loaded),
                assigned=frozenset(self.assigned.get(v.url, set())),
                pinned=frozenset(pins.get(v.url, set()) & set(self.registry.adapters)),
                healthy=v.healthy,
            )
            for v in sorted(self.views.values(), key=lambda v: v.url)
        )
        usage = {
            name: Usage(self.rates.get(name, 0.0), self.last_used.get(name))
            for name in self.registry.adapters
        }
        return PlacementInput(
            engines=engines,
            adapters={n: s.base_model for n, s in self.registry.adapters.items()},
            usage=usage,
            now_s=now,
            idle_unload_s=self.idle_unload_s,
            replica_rate=self.replica_rate,
            hysteresis=self.hysteresis,
            balance=self.balance,
            rate_resolution=1.0 / self.rate_window_s,
        )

    # -- one round ------------------------------------------------------------------

    async def run_round(self) -> RoundRecord:
        async with self._lock:
            started = self._clock()
            record = await self._round(started)
            self.metrics.round_seconds.observe(max(0.0, self._clock() - started))
        self.history.append(record)
        if record.loads or record.unloads or record.failed:
            log.info(
                "round: %d load(s), %d unload(s), %d failed, unplaced %s",
                len(record.loads), len(record.unloads), len(record.failed),
                list(record.unplaced), extra={"lora_round": record.as_json()},
            )  # fmt: skip
        return record

    async def _round(self, now: float) -> RoundRecord:
        await self.observe()
        router = await self.traffic.rates()
        adapters = self.registry.adapters
        if self._round_at is None:  # the first round: wakes since one interval ago
            self._wake_window.add(now - self.interval_s, dict.fromkeys(adapters, 0.0))
        self._round_at = now
        self._wake_window.add(now, {n: float(self._wakes.get(n, 0)) for n in adapters})
        wakes = self._wake_window.rates()
        self.rates = {}
        for name in adapters:
            rate = router.get(name, 0.0) + wakes.get(name, 0.0)
            if rate > 0:
                self.rates[name] = rate
                self.last_used[name] = now
        plan = place(self._placement_input(now))
        self.metrics.unplaced.set(len(plan.unplaced))
        unloads = await self._apply(plan.unloads, self._unload)
        loads = await self._apply(plan.loads, self._load)
        for url, names in plan.desired.items():
            self.assigned[url] = set(names)
        done_loads = tuple(m for m, ok in zip(plan.loads, loads, strict=True) if ok)
        done_unloads = tuple(m for m, ok in zip(plan.unloads, unloads, strict=True) if ok)
        failed = tuple(f"{m.engine} {m.adapter}" for m, ok in zip(plan.loads, loads, strict=True)
                       if not ok)  # fmt: skip
        unreachable = tuple(sorted(v.url for v in self.views.values() if not v.healthy))
        return RoundRecord(now, len(self.views), unreachable, done_loads, done_unloads, failed,
                           plan.unplaced)  # fmt: skip

    async def _apply(
        self, moves: tuple[Move, ...], do: Callable[[Move], Awaitable[bool]]
    ) -> list[bool]:
        async def bounded(move: Move) -> bool:
            async with self._limit:
                return await do(move)

        return list(await asyncio.gather(*(bounded(m) for m in moves)))

    def _in_backoff(self, url: str, name: str) -> bool:
        failure = self.failures.get((url, name))
        return failure is not None and self._clock() < failure[1]

    async def _load(self, move: Move) -> bool:
        """Load one adapter; False (counted, backed off) when it failed or waits a retry."""
        url, name = move.engine, move.adapter
        if self._in_backoff(url, name):
            return False
        spec = self.registry.adapters[name]
        started = self._clock()
        try:
            await self._ensure_local(spec)
            changed = await self.api.load(url, name, spec.path)
        except EngineError as exc:
            self._failed(url, name, str(exc))
            return False
        except Exception as exc:  # a fetch error or a bug: counted and retried, the loop lives
            log.exception("loading %s on %s failed", name, url)
            self._failed(url, name, f"{type(exc).__name__}: {exc}")
            return False
        self.failures.pop((url, name), None)
        self.metrics.load_seconds.observe(max(0.0, self._clock() - started))
        if changed:
            self.metrics.loads.labels(reason=move.reason).inc()
        view = self.views.get(url)
        if view is not None:
            view.loaded.add(name)
            self.metrics.loaded.labels(engine=url).set(len(view.loaded))
        log.info("loaded %s on %s (%s)", name, url, move.reason)
        return True

    def _failed(self, url: str, name: str, error: str) -> None:
        count = self.failures.get((url, name), (0, 0.0))[0] + 1
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** (count - 1))
        self.failures[(url, name)] = (count, self._clock() + delay)
        self.metrics.load_failures.inc()
        log.warning("loading %s on %s failed (%d in a row; retry in %.0f s): %s",
                    name, url, count, delay, error)  # fmt: skip

    async def _unload(self, move: Move) -> bool:
        url, name = move.engine, move.adapter
        try:
            changed = await self.api.unload(url, name)
        except EngineError as exc:
            log.warning("unloading %s from %s failed: %s", name, url, exc)
            return False
        if changed:
            self.metrics.unloads.labels(reason=move.reason).inc()
            if move.reason == "evict":
                self.metrics.evictions.inc()
        view = self.views.get(url)
        if view is not None:
            view.loaded.discard(name)
            self.metrics.loaded.labels(engine=url).set(len(view.loaded))
        log.info("unloaded %s from %s (%s)", name, url, move.reason)
        return True

    async def _ensure_local(self, spec: AdapterSpec) -> None:
        if is_remote(spec.source) and not Path(spec.path).is_dir():
            await asyncio.to_thread(self.registry.ensure_local, spec)

    # -- on demand ------------------------------------------------------------------

    def _fresh(self) -> bool:
        """Whether the engines were read less than one interval ago."""
        return self._seen_at is not None and self._clock() - self._seen_at < self.interval_s

    def holders(self, name: str) -> list[str]:
        return sorted(u for u, v in self.views.items() if v.healthy and name in v.loaded)

    async def wake(self, name: str) -> list[str]:
        """Engines that hold ``name`` once this returns (loading it now when none does);
        ``AdapterNotFound`` when it is not registered, ``NoEngine`` / ``EngineError`` when
        it cannot be loaded."""
        if name not in self.registry.adapters:
            self.metrics.wakes.labels(result="unknown").inc()
            raise AdapterNotFound(f"no adapter {name!r} is registered with this manager")
        self.last_used[name] = self._clock()
        self._wakes[name] = self._wakes.get(name, 0) + 1
        engines = self.holders(name)
        if engines and self._fresh():
            self.metrics.wakes.labels(result="already").inc()
            return engines
        task = self._waking.get(name)
        if task is None or task.done():
            task = asyncio.ensure_future(self._place_now(name, "wake", pin=False))
            self._waking[name] = task
        try:
            found = await asyncio.shield(task)
        except (EngineError, NoEngine):
            self.metrics.wakes.labels(result="failed").inc()
            raise
        # listed there already when read again (the view was only old), or loaded now
        result = "already" if engines and set(found) <= set(engines) else "loaded"
        self.metrics.wakes.labels(result=result).inc()
        return found

    async def _place_now(self, name: str, reason: str, *, pin: bool,
                         engine: str | None = None) -> list[str]:  # fmt: skip
        async with self._lock:
            if not self._fresh():
                await self.observe()
            now = self._clock()
            engines = self.holders(name) if engine is None else []
            if engine is not None:
                view = self.views.get(engine)
                spec = self.registry.adapters[name]
                if view is None or not view.healthy or view.base_model != spec.base_model:
                    raise NoEngine(f"{engine} is not a healthy engine serving "
                                   f"{spec.base_model} (known: {sorted(self.views)})")  # fmt: skip
                if name in view.loaded:
                    engines = [engine]
                else:
                    engines = await self._load_on(engine, name, reason, now)
            elif not engines:
                choice = choose_wake(self._placement_input(now), name)
                if choice is None:
                    base = self.registry.adapters[name].base_model
                    raise NoEngine(
                        f"no healthy engine serving {base} has room for {name} (budgets "
                        "full of pinned or foreign adapters?)"
                    )
                url, victim = choice
                if victim is not None:
                    await self._evict(url, victim)
                engines = await self._load_on(url, name, reason, now, evicted=True)
            self.last_used[name] = self._clock()  # a wake counted already; a load now
            if pin:
                for url in engines:
                    self.registry.pin(url, name)
            return engines

    async def _evict(self, url: str, victim: str) -> None:
        if await self._unload(Move(url, victim, "evict")):
            self.assigned.get(url, set()).discard(victim)
        else:
            raise NoEngine(f"{url} is full and unloading {victim} failed")

    async def _load_on(self, url: str, name: str, reason: str, now: float,
                       evicted: bool = False) -> list[str]:  # fmt: skip
        view = self.views[url]
        if not evicted and len(view.loaded) >= self.budget_of(url):
            placement_in = self._placement_input(now)
            candidates = [n for n in view.loaded if n in self.registry.adapters
                          and (url, n) not in self.registry.pins and n != name]  # fmt: skip
            if not candidates:
                raise NoEngine(f"{url} is full ({self.budget_of(url)}) of pinned or foreign "
                               "adapters")  # fmt: skip
            victim = max(candidates, key=lambda n: priority(n, placement_in.usage))
            await self._evict(url, victim)
        self.failures.pop((url, name), None)  # an explicit ask retries at once
        spec = self.registry.adapters[name]
        started = self._clock()
        try:
            await self._ensure_local(spec)
            changed = await self.api.load(url, name, spec.path)
        except EngineError as exc:
            self._failed(url, name, str(exc))
            raise
        self.metrics.load_seconds.observe(max(0.0, self._clock() - started))
        if changed:
            self.metrics.loads.labels(reason=reason).inc()
        view.loaded.add(name)
        self.assigned.setdefault(url, set()).add(name)
        self.metrics.loaded.labels(engine=url).set(len(view.loaded))
        log.info("loaded %s on %s (%s)", name, url, reason)
        return [url]

    # -- the adapter API ------------------------------------------------------------

    async def register(self, name: str, base_model: str, source: str) -> AdapterSpec:
        existing = self.registry.check_new(name, base_model, source)
        if existing is not None and not is_remote(source):
            return existing
        spec = await asyncio.to_thread(self.registry.prepare, name, base_model, source)
        async with self._lock:
            self.registry.add(spec)
        self.metrics.registered.set(len(self.registry.adapters))
        log.info("registered %s (base %s) from %s at %s", name, base_model, source, spec.path)
        return spec

    async def load(self, name: str, engine: str | None = None) -> list[str]:
        self.registry.get(name)
        return await self._place_now(name, "manual", pin=True, engine=engine)

    async def unload(self, name: str, engine: str | None = None, *,
                     reason: str = "manual") -> list[str]:  # fmt: skip
        """Unload ``name`` from ``engine`` (every engine holding it when None) and drop
        its pins there; the engines it was unloaded from. Traffic may bring it back."""
        self.registry.get(name)
        async with self._lock:
            if not self._fresh():
                await self.observe()
            targets = [engine] if engine is not None else self.holders(name)
            done = []
            for url in targets:
                self.registry.unpin(url, name)
                self.assigned.get(url, set()).discard(name)
                if await self._unload(Move(url, name, reason)):  # type: ignore[arg-type]
                    done.append(url)
            self.last_used.pop(name, None)
            return done

    async def remove(self, name: str) -> list[str]:
        engines = await self.unload(name, reason="removed")
        async with self._lock:
            spec = self.registry.remove(name)
            self.last_used.pop(name, None)
            self.rates.pop(name, None)
        if is_remote(spec.source):
            shutil.rmtree(spec.path, ignore_errors=True)
        self.metrics.registered.set(len(self.registry.adapters))
        return engines

    # -- reporting ------------------------------------------------------------------

    def adapters_json(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        for name in sorted(self.registry.adapters):
            spec = self.registry.adapters[name]
            last = self.last_used.get(name)
            out.append({
                **spec.to_json(),
                "engines": self.holders(name),
                "pinned": sorted(u for u, n in self.registry.pins if n == name),
                "rate": round(self.rates.get(name, 0.0), 4),
                "idle_s": None if last is None else round(now - last, 3),
            })  # fmt: skip
        return out

    def status(self) -> dict[str, Any]:
        now = self._clock()
        return {
            "interval_s": self.interval_s,
            "idle_unload_s": self.idle_unload_s,
            "engines": [
                {
                    "url": v.url,
                    "healthy": v.healthy,
                    "base_model": v.base_model,
                    "budget": self.budget_of(v.url),
                    "loaded": sorted(v.loaded),
                    "assigned": sorted(self.assigned.get(v.url, set())),
                    "error": v.error,
                }
                for v in sorted(self.views.values(), key=lambda v: v.url)
            ],
            "adapters": self.adapters_json(),
            "failures": [
                {
                    "engine": url,
                    "adapter": name,
                    "count": count,
                    "retry_in_s": round(max(0.0, at - now), 3),
                }
                for (url, name), (count, at) in sorted(self.failures.items())
            ],
            "rounds": [r.as_json() for r in self.history],
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every ``interval_s`` until ``stop`` is set."""
        while not stop.is_set():
            started = self._clock()
            try:
                await self.run_round()
            except Exception:  # a bug in one round must not end the manager (invariant 1)
                self.metrics.round_errors.inc()
                log.exception("LoRA round failed; the next one in %.1f s", self.interval_s)
            delay = max(0.0, self.interval_s - (self._clock() - started))
            sleeper = asyncio.ensure_future(self._sleep(delay))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sleeper, stopper):
                task.cancel()

    async def close(self) -> None:
        await self.traffic.close()
        await self.api.close()
        await self.discovery.close()
