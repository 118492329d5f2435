"""The engine pool: which engines exist, which are healthy, what they serve.

Each engine has four independent verdicts, all of which must pass for it to be a
candidate (``EnginePool.allows``):

* **healthy**: its ``GET /health`` answered 200 within ``health_timeout_s`` at the last
  active check (every ``health_interval_s``); an engine is unhealthy until its first check
  passes, so a router started before its engines sends nothing to them;
* **the circuit breaker** (``CircuitBreaker``, pure, time passed in) allows it: passive
  failures seen by the proxy (connection refused or reset, timeout, 5xx) open it after
  ``breaker_failures`` in a row; after ``breaker_cooldown_s`` one request is let through
  as a probe (half-open), whose success closes it and whose failure opens it again. This
  catches what ``/health`` does not: an engine whose API answers but whose core is wedged;
* **serves the model**: ``/v1/models``, polled every ``models_interval_s``, lists the base
  model and LoRA adapters (an engine not polled yet serves any model, so the router is
  usable the moment an engine is healthy);
* **its GPUs are healthy** (issue 15, ``--gpu-health``): no GPU of ``EngineSpec.gpus`` is
  in the set the health watchers report unhealthy (``router/gpu_health.py`` hands it to
  ``set_unhealthy_gpus``). Such an engine counts as unhealthy everywhere a healthy engine
  is asked for (``allows``, ``is_healthy``, ``num_healthy``, ``model_cards``): no new
  requests, requests in flight finish, and when every engine of a model is on unhealthy
  GPUs its requests get what they get when no engine is healthy (held with dynamic
  discovery or an autoscaler, else 503: ``router/proxy.py``). Each change is logged once
  per engine and told to ``on_health_change`` (a recovery wakes held requests). Engines
  with no known GPUs (dns, k8s) are never taken out this way.

``views`` joins the pool with the ledger's in-flight counts and the scraper's metrics into
one ``EngineView`` per engine; strategies see only those snapshots. Engines come from
discovery (``set_engines``): static ``--engines``, or whatever ``router/discovery.py``
finds; an engine that disappears is dropped with its state.

Rejected: health from passive failures only (a dead idle engine would stay a candidate
until a request failed on it); ejecting an engine on one failure (one reset connection is
common under load and should not halve a two-engine fleet).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import aiohttp

from router.config import RouterSettings
from router.scrape import MetricsScraper
from router.types import EngineSpec, EngineView
from shoal.bodies import read_capped
from shoal.errors import ConfigError

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "EnginePool",
    "EngineSpec",
    "GpuHealthSource",
    "parse_engines",
]

log = logging.getLogger("shoal." + __name__)

MODELS_MAX_BYTES = 4 << 20  # /v1/models: ~100 bytes a card; 4 MiB is ~40,000 adapters


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive failures -> one half-open probe after
    ``cooldown_s`` -> closed on its success, open again (a new cool-down) on its failure.

    ``allows(now)`` asks without changing anything; ``on_attempt(now)`` is called when a
    request is actually sent, and claims the single probe slot of a half-open breaker.
    A probe that never reports (its request was cancelled) frees the slot after another
    cool-down, so a breaker cannot stay stuck half-open.
    """

    __slots__ = ("_failures", "_opened_at", "_probe_at", "_state", "cooldown_s", "failures")

    def __init__(self, failures: int, cooldown_s: float) -> None:
        assert failures >= 1 and cooldown_s > 0, f"bad breaker: {failures}, {cooldown_s}"
        self.failures, self.cooldown_s = failures, cooldown_s
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_at: float | None = None

    def state(self, now: float) -> BreakerState:
        if self._state is BreakerState.OPEN and now - self._opened_at >= self.cooldown_s:
            return BreakerState.HALF_OPEN
        return self._state

    def allows(self, now: float) -> bool:
        state = self.state(now)
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        return self._probe_at is None or now - self._probe_at >= self.cooldown_s

    def on_attempt(self, now: float) -> None:
        if self.state(now) is BreakerState.HALF_OPEN:
            self._state = BreakerState.HALF_OPEN
            self._probe_at = now

    def record_success(self) -> None:
        self._state, self._failures, self._probe_at = BreakerState.CLOSED, 0, None

    def record_failure(self, now: float) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self.failures:
            self._state, self._opened_at, self._probe_at = BreakerState.OPEN, now, None


def parse_engines(text: str) -> list[EngineSpec]:
    """``URL,URL=NODE/gpuI,...`` -> specs; ``ConfigError`` naming a bad item."""
    specs: list[EngineSpec] = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        url, _, stream = item.partition("=")
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--engines item {item!r}: expected http(s)://HOST:PORT[=NODE/gpuI]")
        if stream and "/" not in stream:
            raise ConfigError(f"--engines item {item!r}: the stream must be NODE/gpuI")
        if any(s.url == url for s in specs):
            raise ConfigError(f"--engines names {url} twice")
        specs.append(EngineSpec(url, stream.strip()))
    return specs


class GpuHealthSource(Protocol):
    """What the pool starts and stops with itself (``router.gpu_health.GpuHealthPoller``);
    it reports through ``EnginePool.set_unhealthy_gpus``."""

    def start(self, session: aiohttp.ClientSession) -> None: ...

    async def close(self) -> None: ...


class _Engine:
    """The pool's mutable state of one engine."""

    __slots__ = ("breaker", "cards", "checked", "healthy", "models", "oversized", "sick_gpus",
                 "spec")  # fmt: skip

    def __init__(self, spec: EngineSpec, breaker: CircuitBreaker) -> None:
        self.spec = spec
        self.breaker = breaker
        self.healthy = False
        self.checked = False
        self.models: frozenset[str] = frozenset()
        self.cards: tuple[dict[str, Any], ...] = ()
        self.oversized = False  # its last /v1/models was over the cap (warned once)
        self.sick_gpus: tuple[str, ...] = ()  # its GPUs the watchers report unhealthy

    @property
    def routable(self) -> bool:
        """Its own health check passed and no GPU of it is unhealthy."""
        return self.healthy and not self.sick_gpus


class EnginePool:
    """Engines, their health, breakers and models; background checks while running."""

    def __init__(
        self,
        specs: Iterable[EngineSpec],
        settings: RouterSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        scraper: MetricsScraper | None = None,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self.scraper = scraper or MetricsScraper(
            timeout_s=settings.metrics_timeout_s, stale_s=settings.metrics_stale_s, clock=clock
        )
        self._engines: dict[str, _Engine] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._health_timeout = aiohttp.ClientTimeout(total=settings.health_timeout_s)
        self.on_breaker_change: Callable[[str, BreakerState], None] | None = None
        # told when a health check changes an engine's verdict (the proxy wakes requests
        # held for lack of an engine: router/hold.py)
        self.on_health_change: Callable[[str, bool], None] | None = None
        # --gpu-health: router.gpu_health.GpuHealthPoller, started and closed with the pool;
        # it calls set_unhealthy_gpus after each round
        self.gpu_health: GpuHealthSource | None = None
        self._unhealthy_gpus: frozenset[str] = frozenset()
        self.set_engines(specs)

    # ---- membership -------------------------------------------------------------------

    def set_engines(self, specs: Iterable[EngineSpec]) -> None:
        """Discovery's current list: new engines join (unhealthy until checked), missing
        ones leave with their state."""
        wanted = {spec.url: spec for spec in specs}
        for engine_id in [e for e in self._engines if e not in wanted]:
            log.info("engine %s left the pool", engine_id)
            del self._engines[engine_id]
            self.scraper.forget(engine_id)
        for url, spec in wanted.items():
            current = self._engines.get(url)
            if current is None:
                breaker = CircuitBreaker(
                    self._settings.breaker_failures, self._settings.breaker_cooldown_s
                )
                self._engines[url] = _Engine(spec, breaker)
            else:
                current.spec = spec
            self._judge_gpus(url)

    @property
    def engine_ids(self) -> list[str]:
        return list(self._engines)

    # ---- verdicts ---------------------------------------------------------------------

    def allows(self, engine_id: str) -> bool:
        engine = self._engines.get(engine_id)
        return engine is not None and engine.routable and engine.breaker.allows(self._clock())

    def is_healthy(self, engine_id: str) -> bool:
        """Its health check passed and its GPUs are healthy (the breaker aside)."""
        engine = self._engines.get(engine_id)
        return engine is not None and engine.routable

    def num_healthy(self) -> int:
        return sum(1 for e in self._engines.values() if e.routable)

    # ---- GPU health (issue 15) ---------------------------------------------------------

    def set_unhealthy_gpus(self, names: Iterable[str]) -> None:
        """The ``NODE/gpuI`` names the health watchers now report unhealthy (all of them:
        a name left out is healthy again)."""
        self._unhealthy_gpus = frozenset(names)
        for engine_id in list(self._engines):
            self._judge_gpus(engine_id)

    def _judge_gpus(self, engine_id: str) -> None:
        engine = self._engines[engine_id]
        sick = tuple(g for g in engine.spec.gpus if g in self._unhealthy_gpus)
        if sick == engine.sick_gpus:
            return
        before = engine.routable
        engine.sick_gpus = sick
        if sick:
            log.warning("engine %s: GPU %s unhealthy; no new requests until it recovers",
                        engine_id, ", ".join(sick))  # fmt: skip
        else:
            log.info("engine %s: its GPUs are healthy again", engine_id)
        if engine.routable != before and self.on_health_change is not None:
            self.on_health_change(engine_id, engine.routable)

    def num_gpu_unhealthy(self) -> int:
        """Engines out of service because a GPU of theirs is unhealthy."""
        return sum(1 for e in self._engines.values() if e.sick_gpus)

    def on_attempt(self, engine_id: str) -> None:
        engine = self._engines.get(engine_id)
        if engine is not None:
            engine.breaker.on_attempt(self._clock())

    def record_success(self, engine_id: str) -> None:
        engine = self._engines.get(engine_id)
        if engine is not None:
            before = engine.breaker.state(self._clock())
            engine.breaker.record_success()
            if before is not BreakerState.CLOSED:
                self._breaker_changed(engine_id, BreakerState.CLOSED)

    def record_failure(self, engine_id: str) -> None:
        engine = self._engines.get(engine_id)
        if engine is not None:
            now = self._clock()
            before = engine.breaker.state(now)
            engine.breaker.record_failure(now)
            after = engine.breaker.state(now)
            if after is not before:
                log.warning("engine %s: circuit breaker %s", engine_id, after.value)
                self._breaker_changed(engine_id, after)

    def _breaker_changed(self, engine_id: str, state: BreakerState) -> None:
        if self.on_breaker_change is not None:
            self.on_breaker_change(engine_id, state)

    def breaker_state(self, engine_id: str) -> BreakerState:
        return self._engines[engine_id].breaker.state(self._clock())

    # ---- snapshots --------------------------------------------------------------------

    def views(self, ledger: Mapping[str, tuple[int, int]]) -> list[EngineView]:
        """One ``EngineView`` per engine (all of them; the pipeline filters)."""
        views = []
        for engine_id, engine in self._engines.items():
            in_flight, tokens = ledger.get(engine_id, (0, 0))
            views.append(
                EngineView(
                    engine_id=engine_id,
                    url=engine.spec.url,
                    models=engine.models,
                    in_flight=in_flight,
                    in_flight_tokens=tokens,
                    metrics=self.scraper.metrics(engine_id),
                    node=engine.spec.node,
                    stream=engine.spec.stream,
                    gpu_type=engine.spec.gpu_type,
                )
            )
        return views

    def model_cards(self) -> list[dict[str, Any]]:
        """The union of healthy engines' ``/v1/models`` entries, first card per id."""
        seen: dict[str, dict[str, Any]] = {}
        for engine in self._engines.values():
            if engine.routable:
                for card in engine.cards:
                    seen.setdefault(str(card.get("id")), card)
        return list(seen.values())

    def status(self, ledger: Mapping[str, tuple[int, int]]) -> list[dict[str, Any]]:
        """What ``GET /router/engines`` answers."""
        now = self._clock()
        rows = []
        for engine_id, engine in self._engines.items():
            in_flight, tokens = ledger.get(engine_id, (0, 0))
            age = self.scraper.age_s(engine_id)
            rows.append(
                {
                    "id": engine_id,
                    "url": engine.spec.url,
                    "stream": engine.spec.stream,
                    "gpu_type": engine.spec.gpu_type,
                    "healthy": engine.healthy,  # its own GET /health
                    "gpus": list(engine.spec.gpus),
                    "gpu_healthy": not engine.sick_gpus,
                    "unhealthy_gpus": list(engine.sick_gpus),
                    "breaker": engine.breaker.state(now).value,
                    "in_flight": in_flight,
                    "in_flight_tokens": tokens,
                    "models": sorted(engine.models),
                    "metrics_age_s": None if age is None else round(age, 3),
                    "metrics_fresh": self.scraper.metrics(engine_id) is not None,
                }
            )
        return rows

    # ---- background checks -------------------------------------------------------------

    async def check_health(self, engine_id: str) -> bool:
        engine = self._engines.get(engine_id)
        if engine is None or self._session is None:
            return False
        try:
            async with self._session.get(
                engine.spec.url + "/health", timeout=self._health_timeout
            ) as reply:
                healthy = reply.status == 200
        except (aiohttp.ClientError, TimeoutError):
            healthy = False
        changed = healthy != engine.healthy
        if engine_id in self._engines and (changed or not engine.checked):
            log.info("engine %s is %s", engine_id, "healthy" if healthy else "unhealthy")
        engine.healthy, engine.checked = healthy, True
        if changed and engine_id in self._engines and self.on_health_change is not None:
            self.on_health_change(engine_id, engine.routable)
        return healthy

    async def poll_models(self, engine_id: str) -> None:
        engine = self._engines.get(engine_id)
        if engine is None or self._session is None:
            return
        try:
            async with self._session.get(
                engine.spec.url + "/v1/models", timeout=self._health_timeout
            ) as reply:
                if reply.status != 200:
                    return
                body = await read_capped(reply, MODELS_MAX_BYTES)
            if body is None:  # a warning when it starts, then debug: polled every 0.5 s
                level = logging.DEBUG if engine.oversized else logging.WARNING
                log.log(level, "models of %s: /v1/models is over %d bytes; poll failed",
                        engine_id, MODELS_MAX_BYTES)  # fmt: skip
                engine.oversized = True
                return
            engine.oversized = False
            document = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.debug("models of %s: %r", engine_id, exc)
            return
        data = document.get("data") if isinstance(document, dict) else None
        if isinstance(data, list):
            cards = tuple(c for c in data if isinstance(c, dict) and "id" in c)
            engine.cards = cards
            engine.models = frozenset(str(c["id"]) for c in cards)

    async def check_all(self) -> None:
        """One round of health checks, then a model poll of each engine whose models are
        not known yet (a new engine serves as soon as it is healthy and listed)."""
        ids = list(self._engines)
        await asyncio.gather(*(self.check_health(e) for e in ids))
        await asyncio.gather(
            *(
                self.poll_models(e)
                for e in ids
                if self._engines.get(e) and not self._engines[e].models
            )
        )

    async def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        await asyncio.gather(self.check_all(), self._scrape_once())
        self._tasks = [
            asyncio.create_task(self._loop(self._settings.health_interval_s, self._health_round)),
            asyncio.create_task(self._loop(self._settings.models_interval_s, self._models_round)),
            asyncio.create_task(self._loop(self._settings.metrics_interval_s, self._scrape_once)),
        ]
        if self.gpu_health is not None:
            self.gpu_health.start(session)

    async def _health_round(self) -> None:
        await self.check_all()

    async def _models_round(self) -> None:
        await asyncio.gather(*(self.poll_models(e) for e in list(self._engines)))

    async def _scrape_once(self) -> None:
        if self._session is not None:
            targets = [(e, engine.spec.url) for e, engine in self._engines.items()]
            await self.scraper.scrape(self._session, targets)

    async def _loop(self, interval_s: float, round_: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await round_()
            except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                # each check handles its own engine's errors; this keeps the loop alive
                # through anything they let slip (an engine URL aiohttp rejects, say)
                log.warning("background round %s failed: %r", round_.__name__, exc)

    async def close(self) -> None:
        if self.gpu_health is not None:
            await self.gpu_health.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
