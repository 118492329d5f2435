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
* no network call or fetch holds up another operation (issue 14 review, finding 4: one
  lock held over a hung engine's 30 s load stalled every wake, round and unload). Each
  operation *decides* in a synchronous section (no ``await``: atomic on the event loop,
  so no lock is needed), *claims* its moves there (``inflight.InFlight``: one move per (engine,
  adapter) at a time), does the I/O outside, and *records* each result in another
  synchronous section. A move in flight counts as loaded and pinned in every decision
  (it holds its slot, nothing moves it until it ends), so budgets hold across
  concurrent rounds, wakes and API calls. Rounds only are serialised among themselves
  (``_rounds``); fetches, registrations and removals of one name are (``InFlight.exclusive``),
  other names go on;
* a wake for an adapter already being loaded shares that load (``_waking``, or a
  round's load in flight) and answers once it is done or after ``wake_wait_s``
  (default 1 s, under the router's 2 s wake timeout), with the engine it goes to: the
  router holds the requests and re-polls /v1/models until the engine lists it;
* a removal is all or nothing: the adapter is marked ``_removing`` first (placement
  sees it as foreign, wakes and the API as unknown), moves in flight end, then it is
  unloaded from every engine that lists it, holds it by the manager's word or by a pin;
  only when every unload succeeded is it forgotten. Otherwise it stays registered and
  the caller gets ``UnloadFailed`` naming the engines (an unreachable engine may still
  hold it: it is not silently left loaded and unmanaged);
* an engine whose budget is unknown (``--budget 0`` and no ``max_lora`` in its
  /metrics: vLLM exports ``vllm:lora_requests_info`` only once it served a LoRA
  request) has a budget of 1 until it says; this is warned once per engine.

Rates are smoothed over ``rate_window_s`` (default 60 s, a sliding window of counter
samples, ``traffic.RateWindow``): the router's arrivals inside ``RouterTraffic``, the
manager's own wakes here (a cumulative count per adapter, sampled each round). An adapter
counts as used in every round whose window saw its traffic, so ``idle_unload_s`` starts
once its last request has left the window.

A wake (``POST /v1/wake``, the router holding requests for an adapter no engine lists)
loads it now on ``placement.choose_wake``'s engine (evicting the coldest adapter when
every budget is full), from a view of the engines at most one interval old (read again
when older: a restarted engine is not taken at its old word); it counts as traffic
for the next round. A read of an engine that raced a move recorded there keeps what
the manager knows of that engine until the next read (``_moved``). An operator's load
(``POST /v1/adapters/NAME/load``) does the same, waits for the load, and pins the
adapter there until an unload.

Time and sleeping are injected (``clock``, ``sleep``): unit tests drive rounds on virtual
time with ``engines.MemoryEngineApi``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from asyncio import Future
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from control.lora.engines import EngineApi, EngineModels
from control.lora.errors import (
    AdapterConflict,
    AdapterNotFound,
    EngineError,
    LoraError,
    NoEngine,
    UnloadFailed,
)
from control.lora.inflight import InFlight
from control.lora.metrics import LoraMetrics
from control.lora.placement import choose_wake, place, priority
from control.lora.registry import Registry
from control.lora.sources import is_remote
from control.lora.traffic import RateWindow
from control.lora.types import (
    AdapterSpec,
    EngineState,
    Move,
    MoveReason,
    PlacementInput,
    RoundRecord,
    Usage,
)
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
class _Pending:
    """A load begun now: where it goes, and the task that does it."""

    engines: tuple[str, ...]
    task: Future[list[str]]


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
        wake_wait_s: float = 1.0,
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
        self.wake_wait_s = wake_wait_s  # below the router's 2 s wake timeout
        self._rounds = asyncio.Lock()  # rounds only: one at a time (wakes never wait on it)
        self._moves = InFlight()  # moves in flight, per-name exclusion
        self._removing: set[str] = set()
        self._moved: dict[str, int] = {}  # per engine: moves recorded (observe's staleness)
        self._budget_warned: set[str] = set()
        self._observing: Future[None] | None = None  # a read of the engines in progress
        self.views: dict[str, EngineView] = {}
        self.budgets: dict[str, int] = {}  # max_loras read from engines (budget 0)
        self.assigned: dict[str, set[str]] = {}
        self.last_used: dict[str, float] = {}
        self.rates: dict[str, float] = {}
        self.failures: dict[tuple[str, str], tuple[int, float]] = {}  # (count, retry at)
        self._wakes: dict[str, int] = {}  # per adapter, cumulative (sampled each round)
        self._wake_window = RateWindow(rate_window_s)
        self._waking: dict[str, _Pending] = {}
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
        elif want_budget and url not in self._budget_warned:
            self._budget_warned.add(url)
            log.warning("%s does not export vllm:lora_requests_info{max_lora} (idle vLLM "
                        "exports none): its budget is 1 adapter until it does; set --budget "
                        "to its --max-loras (or --max-cpu-loras)", url)  # fmt: skip
        return EngineView(url, True, models.base_model, set(models.adapters))

    async def observe(self) -> None:
        """Discovery, then every engine's ``/v1/models``; ``views`` holds the answers."""
        urls = [spec.url for spec in await self.discovery.engines()]
        moved = dict(self._moved)
        views = await asyncio.gather(*(self._poll(url) for url in urls))
        for view in views:  # a move recorded while its engine was read: keep what we know
            before = self.views.get(view.url)
            if (view.healthy and before is not None and before.healthy
                    and self._moved.get(view.url) != moved.get(view.url)):  # fmt: skip
                view.loaded = set(before.loaded)
        for gone in set(self.views) - set(urls):
            self.assigned.pop(gone, None)
            self.budgets.pop(gone, None)
            self._moved.pop(gone, None)
            self._budget_warned.discard(gone)
            with contextlib.suppress(KeyError):  # never labelled if never healthy
                self.metrics.loaded.remove(gone)
        for view in views:
            before = self.views.get(view.url)
            if not view.healthy:
                self.budgets.pop(view.url, None)  # re-read when it is back
            elif before is not None and before.healthy:
                lost = self.assigned.get(view.url, set()) - view.loaded - self._moves.on(view.url)
                if lost:
                    log.warning("engine %s lost adapters %s (restarted?); reloading",
                                view.url, sorted(lost))  # fmt: skip
        self.views = {view.url: view for view in views}
        now = self._seen_at = self._clock()
        for view in views:
            if view.healthy:
                self.metrics.loaded.labels(engine=view.url).set(len(view.loaded))
                for name in view.loaded:
                    if name in self.registry.adapters and name not in self._removing:
                        self.last_used.setdefault(name, now)
        healthy = sum(1 for v in views if v.healthy)
        self.metrics.engines.labels(state="healthy").set(healthy)
        self.metrics.engines.labels(state="unreachable").set(len(views) - healthy)

    async def _refresh(self) -> None:
        """``observe`` for wakes and the API: callers at once share one read."""
        if self._observing is None or self._observing.done():
            self._observing = asyncio.ensure_future(self.observe())
        await asyncio.shield(self._observing)

    def _placement_input(self, now: float) -> PlacementInput:
        """What placement sees: adapters being removed are foreign (left alone, their
        slots taken), and a move in flight holds its slot like a pin (never moved again
        until it ends)."""
        adapters = self._managed()
        pins: dict[str, set[str]] = {}
        for url, name in self.registry.pins:
            pins.setdefault(url, set()).add(name)
        moving: dict[str, set[str]] = {}
        for url, name in self._moves.pairs():
            moving.setdefault(url, set()).add(name)
        engines = tuple(
            EngineState(
                url=v.url,
                base_model=v.base_model,
                budget=self.budget_of(v.url),
                loaded=frozenset(v.loaded | moving.get(v.url, set())),
                assigned=frozenset(self.assigned.get(v.url, set())),
                pinned=frozenset(
                    (pins.get(v.url, set()) | moving.get(v.url, set())) & set(adapters)
                ),
                healthy=v.healthy,
            )
            for v in sorted(self.views.values(), key=lambda v: v.url)
        )
        usage = {
            name: Usage(self.rates.get(name, 0.0), self.last_used.get(name)) for name in adapters
        }
        return PlacementInput(
            engines=engines,
            adapters={n: s.base_model for n, s in adapters.items()},
            usage=usage,
            now_s=now,
            idle_unload_s=self.idle_unload_s,
            replica_rate=self.replica_rate,
            hysteresis=self.hysteresis,
            balance=self.balance,
            rate_resolution=1.0 / self.rate_window_s,
        )

    # -- moves --------------------------------------------------------------------

    def _record(self, url: str, name: str, loaded: bool) -> None:
        view = self.views.get(url)
        if view is not None:
            (view.loaded.add if loaded else view.loaded.discard)(name)
            self.metrics.loaded.labels(engine=url).set(len(view.loaded))
        self._moved[url] = self._moved.get(url, 0) + 1

    async def _do_load(self, move: Move) -> None:
        """Fetch (per name, outside any shared lock) and load; recorded when done. Raises
        what failed; the claim on (engine, adapter) is released either way."""
        url, name = move.engine, move.adapter
        error: BaseException | None = None
        try:
            spec = self.registry.adapters[name]  # remove() waits for moves in flight
            started = self._clock()
            async with self._moves.exclusive(name):
                await self._ensure_local(spec)
            changed = await self.api.load(url, name, spec.path)
            self.failures.pop((url, name), None)
            self.metrics.load_seconds.observe(max(0.0, self._clock() - started))
            if changed:
                self.metrics.loads.labels(reason=move.reason).inc()
            self._record(url, name, loaded=True)
            log.info("loaded %s on %s (%s)", name, url, move.reason)
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._moves.release(url, name, error)

    async def _do_unload(self, move: Move, *, claimed: bool = True) -> None:
        url, name = move.engine, move.adapter
        error: BaseException | None = None
        try:
            changed = await self.api.unload(url, name)
            if changed:
                self.metrics.unloads.labels(reason=move.reason).inc()
                if move.reason == "evict":
                    self.metrics.evictions.inc()
            self._record(url, name, loaded=False)
            log.info("unloaded %s from %s (%s)", name, url, move.reason)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if claimed:
                self._moves.release(url, name, error)

    # -- one round ------------------------------------------------------------------

    async def run_round(self) -> RoundRecord:
        async with self._rounds:
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
        # decide (no await from here to the claims: atomic on the loop)
        adapters = self._managed()
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
        waits = tuple(m for m in plan.loads if self._in_backoff(m.engine, m.adapter))
        loads_now = tuple(m for m in plan.loads if m not in waits)
        for url, names in plan.desired.items():
            self.assigned[url] = set(names) - self._moves.on(url, "unload")
        claims = [(m, self._moves.claim(m.engine, m.adapter, "unload")) for m in plan.unloads]
        claims += [(m, self._moves.claim(m.engine, m.adapter, "load")) for m in loads_now]
        # I/O: per engine, every unload before any load (a budget is never exceeded)
        try:
            unloads = await self._apply(plan.unloads, self._unload)
            loads = await self._apply(loads_now, self._load)
        except BaseException as exc:  # cancelled: the moves never started end too
            for m, token in claims:
                self._moves.release(m.engine, m.adapter, exc, token)
            raise
        done_loads = tuple(m for m, ok in zip(loads_now, loads, strict=True) if ok)
        done_unloads = tuple(m for m, ok in zip(plan.unloads, unloads, strict=True) if ok)
        failed = tuple(f"{m.engine} {m.adapter}" for m in plan.loads
                       if m in waits or m not in done_loads)  # fmt: skip
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
        """A round's load (claimed); False (counted, backed off) when it failed."""
        try:
            await self._do_load(move)
        except EngineError as exc:
            self._failed(move.engine, move.adapter, str(exc))
            return False
        except Exception as exc:  # a fetch error or a bug: counted and retried, the loop lives
            log.exception("loading %s on %s failed", move.adapter, move.engine)
            self._failed(move.engine, move.adapter, f"{type(exc).__name__}: {exc}")
            return False
        return True

    def _failed(self, url: str, name: str, error: str) -> None:
        count = self.failures.get((url, name), (0, 0.0))[0] + 1
        delay = min(self.retry_max_s, self.retry_base_s * 2 ** (count - 1))
        self.failures[(url, name)] = (count, self._clock() + delay)
        self.metrics.load_failures.inc()
        log.warning("loading %s on %s failed (%d in a row; retry in %.0f s): %s",
                    name, url, count, delay, error)  # fmt: skip

    async def _unload(self, move: Move) -> bool:
        """A round's (or an operator's) unload (claimed); False when it failed (logged)."""
        try:
            await self._do_unload(move)
        except EngineError as exc:
            log.warning("unloading %s from %s failed: %s", move.adapter, move.engine, exc)
            return False
        return True

    async def _ensure_local(self, spec: AdapterSpec) -> None:
        if is_remote(spec.source) and not Path(spec.path).is_dir():
            await asyncio.to_thread(self.registry.ensure_local, spec)

    # -- on demand ------------------------------------------------------------------

    def _fresh(self) -> bool:
        """Whether the engines were read less than one interval ago."""
        return self._seen_at is not None and self._clock() - self._seen_at < self.interval_s

    def holders(self, name: str) -> list[str]:
        """Healthy engines listing ``name`` (and not unloading it now)."""
        leaving = self._moves.of(name, "unload")
        return sorted(u for u, v in self.views.items()
                      if v.healthy and name in v.loaded and u not in leaving)  # fmt: skip

    async def wake(self, name: str) -> list[str]:
        """Engines that hold ``name``, or the one it is being loaded on now: the answer
        comes once the load is done or after ``wake_wait_s``, whichever is first (the
        router re-polls /v1/models while it holds requests; a slow engine stalls nobody).
        ``AdapterNotFound`` when it is not registered (or is being removed), ``NoEngine``
        / ``EngineError`` when it cannot be loaded."""
        try:
            self._known(name)
        except AdapterNotFound:
            self.metrics.wakes.labels(result="unknown").inc()
            raise
        self.last_used[name] = self._clock()
        self._wakes[name] = self._wakes.get(name, 0) + 1
        engines = self.holders(name)
        if engines and self._fresh():
            self.metrics.wakes.labels(result="already").inc()
            return engines
        pending = self._waking.get(name)
        if pending is None or pending.task.done():
            if not self._fresh():
                await self._refresh()
            pending = self._waking.get(name)  # another wake may have begun meanwhile
            if pending is None or pending.task.done():
                try:
                    self._known(name)
                    engines = self.holders(name)
                    if engines:  # listed there already once read again (the view was old)
                        self.metrics.wakes.labels(result="already").inc()
                        return engines
                    pending = self._begin(name, "wake", pin=False)
                except AdapterNotFound:
                    self.metrics.wakes.labels(result="unknown").inc()
                    raise
                except NoEngine:
                    self.metrics.wakes.labels(result="failed").inc()
                    raise
                self._waking[name] = pending
        done, _ = await asyncio.wait({pending.task}, timeout=self.wake_wait_s)
        if not done:
            self.metrics.wakes.labels(result="started").inc()
            return list(pending.engines)
        try:
            found = pending.task.result()
        except LoraError:
            self.metrics.wakes.labels(result="failed").inc()
            raise
        self.metrics.wakes.labels(result="loaded").inc()
        return found

    def _begin(self, name: str, reason: MoveReason, *, pin: bool,
               engine: str | None = None) -> _Pending:  # fmt: skip
        """Decide where ``name`` loads now and claim the moves (no await: atomic on the
        loop); the I/O runs in the task. Joins a load of ``name`` already in flight."""
        spec = self._known(name)
        loading = self._moves.of(name, "load")
        if engine is not None:
            loading = {u: f for u, f in loading.items() if u == engine}
        if loading:
            return _Pending(tuple(sorted(loading)),
                            asyncio.ensure_future(self._join(name, loading, pin)))  # fmt: skip
        victim: str | None
        if engine is not None:
            view = self.views.get(engine)
            if view is None or not view.healthy or view.base_model != spec.base_model:
                raise NoEngine(f"{engine} is not a healthy engine serving "
                               f"{spec.base_model} (known: {sorted(self.views)})")  # fmt: skip
            if self._moves.busy(engine, name):
                raise NoEngine(f"{name} is being unloaded from {engine}; ask again")
            url, victim = engine, None
            if name in view.loaded:
                if pin:
                    self.registry.pin(engine, name)
                done: Future[list[str]] = asyncio.get_running_loop().create_future()
                done.set_result([engine])
                return _Pending((engine,), done)
            held = view.loaded | self._moves.on(engine)
            if len(held) >= self.budget_of(engine):
                usage = self._placement_input(self._clock()).usage
                candidates = [n for n in view.loaded if n in usage and n != name
                              and (engine, n) not in self.registry.pins
                              and not self._moves.busy(engine, n)]  # fmt: skip
                if not candidates:
                    raise NoEngine(f"{engine} is full ({self.budget_of(engine)}) of pinned, "
                                   "foreign or moving adapters")  # fmt: skip
                victim = max(candidates, key=lambda n: priority(n, usage))
        else:
            choice = choose_wake(self._placement_input(self._clock()), name)
            if choice is None:
                raise NoEngine(f"no healthy engine serving {spec.base_model} has room for "
                               f"{name} (budgets full of pinned or foreign adapters?)")  # fmt: skip
            url, victim = choice
        if victim is not None:
            self._moves.claim(url, victim, "unload")
            self.assigned.get(url, set()).discard(victim)
        token = self._moves.claim(url, name, "load")
        self.assigned.setdefault(url, set()).add(name)
        self.failures.pop((url, name), None)  # an explicit ask retries at once
        task = asyncio.ensure_future(self._carry(url, name, victim, reason, pin, token))
        return _Pending((url,), task)

    async def _join(self, name: str, loading: dict[str, Future[BaseException | None]],
                    pin: bool) -> list[str]:  # fmt: skip
        await asyncio.wait(list(loading.values()))
        errors = [f.result() for f in loading.values() if f.result() is not None]
        done = sorted(u for u, f in loading.items() if f.result() is None)
        if not done:
            error = errors[0]
            if isinstance(error, LoraError):
                raise error
            raise NoEngine(f"loading {name} on {sorted(loading)} failed: {error!r}")
        if pin:
            for url in done:
                self.registry.pin(url, name)
        return done

    async def _carry(self, url: str, name: str, victim: str | None, reason: MoveReason,
                     pin: bool, token: Future[BaseException | None]) -> list[str]:  # fmt: skip
        """A load decided by ``_begin`` (claimed, ``token``): evict the victim, fetch,
        load, record."""
        try:
            if victim is not None:
                try:
                    await self._do_unload(Move(url, victim, "evict"))
                except EngineError as exc:
                    self.assigned.get(url, set()).discard(name)
                    self.assigned.setdefault(url, set()).add(victim)
                    raise NoEngine(f"{url} is full and unloading {victim} failed: {exc}") from None
        except BaseException as exc:  # the load never started: its claim ends here
            self._moves.release(url, name, exc, token)
            raise
        try:
            await self._do_load(Move(url, name, reason))
        except LoraError as exc:
            self._failed(url, name, str(exc))
            raise
        self.last_used[name] = self._clock()  # a wake counted already; a load now
        if pin:
            self.registry.pin(url, name)
        return [url]

    # -- the adapter API ------------------------------------------------------------

    def _managed(self) -> dict[str, AdapterSpec]:
        """Registered adapters not being removed: what placement and wakes see."""
        return {n: s for n, s in self.registry.adapters.items() if n not in self._removing}

    def _known(self, name: str) -> AdapterSpec:
        spec = self.registry.adapters.get(name)
        if spec is None:
            raise AdapterNotFound(f"no adapter {name!r} is registered with this manager")
        if name in self._removing:
            raise AdapterNotFound(f"adapter {name!r} is being removed")
        return spec

    async def register(self, name: str, base_model: str, source: str) -> AdapterSpec:
        self.registry.check_new(name, base_model, source)  # bad input answers at once
        async with self._moves.exclusive(name):  # one registration, fetch or removal of a name
            if name in self._removing:
                raise AdapterConflict(f"adapter {name} is being removed; register it once "
                                      "the removal has answered")  # fmt: skip
            existing = self.registry.check_new(name, base_model, source)  # again, serialised
            if existing is not None and not is_remote(source):
                return existing
            spec = await asyncio.to_thread(self.registry.prepare, name, base_model, source)
            self.registry.add(spec)
        self.metrics.registered.set(len(self.registry.adapters))
        log.info("registered %s (base %s) from %s at %s", name, base_model, source, spec.path)
        return spec

    async def load(self, name: str, engine: str | None = None) -> list[str]:
        self._known(name)
        if not self._fresh():
            await self._refresh()
        if engine is None:
            engines = self.holders(name)
            if engines:
                for url in engines:
                    self.registry.pin(url, name)
                return engines
        return await self._begin(name, "manual", pin=True, engine=engine).task

    async def unload(self, name: str, engine: str | None = None) -> list[str]:
        """Unload ``name`` from ``engine`` (every engine holding it when None) and drop
        its pins there; the engines it was unloaded from. Traffic may bring it back."""
        self._known(name)
        await self._moves.quiet(name)  # a load in flight ends first, then goes
        if not self._fresh():
            await self._refresh()
        self._known(name)
        targets = [engine] if engine is not None else self.holders(name)
        targets = [u for u in targets if not self._moves.busy(u, name)]
        for url in targets:
            self.registry.unpin(url, name)
            self.assigned.get(url, set()).discard(name)
            self._moves.claim(url, name, "unload")
        done = await self._apply(tuple(Move(u, name, "manual") for u in targets), self._unload)
        self.last_used.pop(name, None)
        return [u for u, ok in zip(targets, done, strict=True) if ok]

    async def remove(self, name: str) -> list[str]:
        """Unload ``name`` everywhere it may be, then forget it: rounds and wakes skip it
        from the start (``_removing``), so nothing loads it back meanwhile. If an engine
        fails to unload it, it stays registered and ``UnloadFailed`` names the engines."""
        self._known(name)
        self._removing.add(name)
        try:
            self._waking.pop(name, None)
            await self._moves.quiet(name)
            async with self._moves.exclusive(name):
                if not self._fresh():
                    await self._refresh()
                targets = sorted(
                    {u for u, v in self.views.items() if name in v.loaded}
                    | {u for u, names in self.assigned.items() if name in names}
                    | {u for u, n in self.registry.pins if n == name and u in self.views}
                )  # an engine gone from discovery holds nothing we can reach: not asked
                listed = [u for u in targets if name in self.views.get(u, EngineView(u)).loaded]
                results = await asyncio.gather(
                    *(self._do_unload(Move(u, name, "removed"), claimed=False) for u in targets),
                    return_exceptions=True,
                )
                failed = {u: r for u, r in zip(targets, results, strict=True)
                          if isinstance(r, BaseException)}  # fmt: skip
                for error in failed.values():
                    if not isinstance(error, EngineError):
                        raise error
                if failed:
                    raise UnloadFailed(
                        f"removing {name}: unloading it failed on {', '.join(failed)} "
                        f"({'; '.join(str(e) for e in failed.values())}); it stays "
                        "registered: remove it again once they answer (or are gone)"
                    )
                spec = self.registry.remove(name)
                for names in self.assigned.values():
                    names.discard(name)
                for key in [k for k in self.failures if k[1] == name]:
                    del self.failures[key]
                self.last_used.pop(name, None)
                self.rates.pop(name, None)
                self._wakes.pop(name, None)
                if is_remote(spec.source):
                    await asyncio.to_thread(shutil.rmtree, spec.path, ignore_errors=True)
        finally:
            self._removing.discard(name)
        self.metrics.registered.set(len(self.registry.adapters))
        return listed

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
            await asyncio.gather(sleeper, stopper, return_exceptions=True)

    async def close(self) -> None:
        """Wakes still loading are cancelled and awaited, then the clients closed."""
        tasks: list[Future[Any]] = [p.task for p in self._waking.values() if not p.task.done()]
        if self._observing is not None and not self._observing.done():
            tasks.append(self._observing)
        self._waking.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.traffic.close()
        await self.api.close()
        await self.discovery.close()
