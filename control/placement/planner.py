"""The live placement loop: the router's request sizes -> solve -> smooth -> a pool per GPU type.

One planning round (every ``interval_s``)::

    sizes    = await source.fetch()          # GET router /v1/request_sizes?model=M&window_s=W
    workload = workload_from(sizes, ticks)   # rebinned onto the profiles' ticks, rate x headroom
    workload = without_cells(workload, unservable_cells(profiles, workload))  # Plan.unserved
    optimum  = solve(profiles, workload, limits, best_effort=True)  # in a thread
    smoothed = smoother.smooth(now, optimum, fit)       # hysteresis, scale-down delay
    targets  = smoothed.targets              # replicas per GPU type
    await sync_pools()                       # Actuator.scale(targets[gpu]) of each type's pool

(the router's answer and the workload made of it: sizes.py) and between rounds, every
``pool_interval_s``, ``sync_pools`` alone: each pool's
``state()``, ``scale(target)`` where the pool's spec differs (an engine that died is
replaced by the actuator itself), and the local pools' ready engines published with their
``gpu_type`` into one discovery file. Pools are synced more often than plans are made
because a new engine gets ready between rounds, and the router should see it then, not up
to ``interval_s`` later.

Invariants:

* the loop never dies of its inputs: a router that cannot be read, a solver error, an
  ``Infeasible`` workload and a pool that fails are each logged, counted
  (``shoal_placement_errors_total{stage}``, ``shoal_placement_solves_total{status}``) and
  the round keeps the last plan and the last targets (never scales down on a failure);
* one cell no GPU type can serve never freezes the fleet: such cells are left out of the
  workload before solving (``Plan.unserved``, ``/status`` ``unserved``,
  ``shoal_placement_unserved_share``), and the rest is planned; when only the
  availability caps are short the solver's best effort is a ``"capped"`` plan (every
  capped type at its cap), so a surge above the caps scales up to them;
* an empty window (no request finished in ``window_s``) plans the minimum replicas of each
  type without solving: scale to zero happens only where ``--min-replicas`` allows it, and
  only after the scale-down delay. From zero, no request can finish, so the window stays
  empty: the way back is ``POST /v1/wake`` (the router's ``--autoscaler-url`` pointed at
  the planner posts it when it holds a request): with nothing ready or starting in any
  pool, the cheapest type that serves the smallest cell goes to ``max(1, its minimum)``
  at once (``Planner.wake``), and stays for the scale-down delay like any adopted mix;
* a (re)started planner seeds smoothing with the replicas the pools already run
  (``Smoother.seed``): its first plan is weighed against that fleet, and shrinks it only
  after the delay, so a restart during an empty router window does not scale a serving
  fleet down at once. Until every pool has been read once, rounds plan nothing and set
  no targets (status ``"unseeded"``): a pool whose read failed is never taken for empty;
* the plan served (``GET /v1/plan``) is the one the targets were made from: when smoothing
  keeps the current mix it serves that mix's assignment, not the optimum the fleet does
  not run;
* time, sleeping, the size source, the solver and the pools are injected, so unit tests
  run rounds on virtual time with a stand-in solver and memory pools.

Rate: the router answers both the rate of finished requests (the shape's source) and
the rate of arrivals (every request received, refused or held ones too); the workload's
rate is ``max(finished, arrivals) x headroom`` with the shape of the finished requests, so
an overloaded fleet (429s, held requests) plans for the demand, not for what it served.

GPU type names are checked as the router's discovery checks ``gpu_type``
(``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``): a profile named "NVIDIA A100 80GB" would publish
engines the router refuses, so the planner refuses it at start.

The discovery file: each local pool's ``LocalActuator`` runs without a file of its own;
the planner writes the union of their ready endpoints, each with ``"gpu_type"``, into
``--discovery-file`` (atomically, only when it changed). A scale-down calls ``state()``
right after ``scale()`` so leaving engines are out of the file before their drain ends.
Rejected: one file per pool merged by the router (the router reads one file), and labels
inside ``LocalActuator`` with a shared file (two writers of one file lose entries).
Kubernetes pools are not written anywhere: the router finds their engines through one
Service per pool, ``--discovery k8s --engines NS/SERVICE@GPU_TYPE,...``.

Headroom: the workload's rate is the window's mean rate times ``headroom`` (1.1 by
default). A profile's throughputs are the highest rates that still meet the SLO, so a plan
for exactly the mean runs every replica at the edge of its SLO, and the mean of a window
is below the peaks within it and behind a rising load; 10% is a margin, not a forecast.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from control.autoscale.actuators.base import Actuator
from control.autoscale.actuators.local import write_discovery_entries
from control.autoscale.errors import ActuatorError
from control.autoscale.types import ReplicaState
from control.placement.config import (
    PlacementSettings,
    PoolSpec,
    parse_counts,
    parse_pools,
    split_list,
)
from control.placement.errors import Infeasible, PlacementError, SizesUnavailable, WrongModel
from control.placement.metrics import SOLVE_STATUSES, PlacementMetrics
from control.placement.problem import unservable_cells, without_cells
from control.placement.sizes import (
    RebinFn,
    RequestSizes,
    RouterSizes,
    SizeSource,
    parse_request_sizes,
    workload_from,
)
from control.placement.smoothing import Smoothed, Smoother, mix_cost
from control.placement.types import GpuProfile, Limits, Plan, Workload
from shoal.config import read_secret
from shoal.errors import ConfigError

__all__ = [
    "Planner",
    "RequestSizes",
    "RouterSizes",
    "SizesUnavailable",
    "build",
    "parse_request_sizes",
    "serve",
    "workload_from",
]

log = logging.getLogger("shoal." + __name__)

SolveFn = Callable[..., Plan]  # solver.solve(profiles, workload, limits, *, time_limit_s, backend)


GPU_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # router/discovery.py's check


class DiscoveryWriter:
    """The local pools' ready engines, each with its ``gpu_type``, in one file the router
    reads (``--discovery-file``); written atomically and only when the list changed."""

    def __init__(self, path: str | Path, gpus: Sequence[str]) -> None:
        self.path = Path(path)
        self.gpus = tuple(gpus)
        self._endpoints: dict[str, tuple[str, ...]] = {gpu: () for gpu in self.gpus}
        self._published: list[dict[str, str]] | None = None
        self.publish({})

    def publish(self, endpoints: Mapping[str, Sequence[str]]) -> None:
        """Update the types in ``endpoints`` (the others keep their last list) and write."""
        for gpu, urls in endpoints.items():
            if gpu in self._endpoints:
                self._endpoints[gpu] = tuple(urls)
        entries = sorted(
            (
                {"url": url, "gpu_type": gpu}
                for gpu, urls in self._endpoints.items()
                for url in urls
            ),
            key=lambda e: e["url"],
        )
        if entries == self._published:
            return
        try:
            write_discovery_entries(self.path, entries)
        except OSError as exc:
            raise ActuatorError(f"cannot write the discovery file {self.path}: {exc}") from None
        self._published = entries


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One planning round as ``/status`` shows it."""

    now_s: float
    status: str  # the solve's status, "infeasible", "error", "no-sizes", "empty", "unseeded"
    reason: str = ""  # smoothing's reason ("" when the round held)
    targets: Mapping[str, int] = field(default_factory=dict)
    optimum: Mapping[str, int] = field(default_factory=dict)
    workload: Mapping[str, float] = field(default_factory=dict)
    error: str = ""


class Planner:
    def __init__(
        self,
        profiles: Sequence[GpuProfile],
        pools: Mapping[str, Actuator],
        source: SizeSource,
        *,
        solve: SolveFn | None = None,
        rebin: RebinFn | None = None,
        limits: Limits | None = None,
        smoother: Smoother | None = None,
        headroom: float = 1.1,
        slice_factor: int = 4,
        time_limit_s: float = 10.0,
        backend: str = "highs",
        interval_s: float = 30.0,
        pool_interval_s: float = 2.0,
        dry_run: bool = False,
        model: str = "",
        discovery: DiscoveryWriter | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        history: int = 20,
    ) -> None:
        if not profiles:
            raise ConfigError("the planner needs at least one GPU profile (--profile)")
        first = profiles[0]
        for p in profiles:
            if (p.out_ticks, p.in_ticks) != (first.out_ticks, first.in_ticks):
                raise ConfigError(
                    f"profile {p.gpu} is on other ticks than {first.gpu}: profile both on the "
                    "same output and input lengths"
                )
        gpus = tuple(p.gpu for p in profiles)
        bad = [gpu for gpu in gpus if not GPU_TYPE.fullmatch(gpu)]
        if bad:
            raise ConfigError(
                f"GPU type names {bad} are not what the router's discovery accepts as "
                "gpu_type ([A-Za-z0-9][A-Za-z0-9._-]{0,63}): rename the profiles' 'gpu' "
                "(e.g. 'A100-80GB')"
            )
        if len(set(gpus)) != len(gpus):
            raise ConfigError(f"two profiles for one GPU type: {gpus}")
        if set(pools) != set(gpus):
            raise ConfigError(
                f"pools ({', '.join(sorted(pools)) or 'none'}) and profiles "
                f"({', '.join(sorted(gpus))}) must name the same GPU types"
            )
        if solve is None or rebin is None:
            from control.placement import formats, solver

            solve = solve or solver.solve
            rebin = rebin or formats.rebin
        self.profiles = tuple(profiles)
        self.gpus = gpus
        self.costs = {p.gpu: p.cost for p in profiles}
        self.pools = dict(pools)
        self.source = source
        self._solve = solve
        self._rebin = rebin
        self.limits = limits or Limits()
        self.smoother = smoother or Smoother(gpus, self.costs)
        self.headroom = headroom
        self.slice_factor = slice_factor
        self.time_limit_s = time_limit_s
        self.backend = backend
        self.interval_s = interval_s
        self.pool_interval_s = min(pool_interval_s, interval_s)
        self.dry_run = dry_run
        self.model = model
        self.discovery = discovery
        self.metrics = PlacementMetrics(gpus)
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self.plan: Plan | None = None
        self.plan_created: float | None = None  # unix time of self.plan
        self.smoothed: Smoothed | None = None
        self.targets: dict[str, int] | None = None  # None: no plan yet, pools untouched
        self.states: dict[str, ReplicaState] = {}
        self.history: deque[RoundRecord] = deque(maxlen=history)
        self.errors: deque[dict[str, Any]] = deque(maxlen=history)
        self.last_workload: dict[str, float] = {}
        self.unserved: tuple[tuple[int, int], ...] = ()  # the last round's, (out, in) ticks
        self.unserved_share = 0.0
        self.wake_gpu = self._wake_type()

    # -- one planning round --------------------------------------------------------------

    async def run_round(self) -> RoundRecord:
        """Fetch, solve, smooth, act; never raises for the router's, solver's or pools'
        failures (the round holds the last plan)."""
        async with self._lock:
            now = self._clock()
            record = None
            if self.smoother.mix is None:
                await self._sync(now)  # no targets yet: reads the pools, scales nothing
                unread = sorted(set(self.pools) - set(self.states))
                if unread:  # never plan against a pool taken for empty
                    error = f"pools not read yet: {', '.join(unread)}; no targets until they are"
                    record = RoundRecord(now, "unseeded", error=error)
                else:
                    self.smoother.seed(now, {g: s.spec for g, s in self.states.items()})
            if record is None:
                record = await self._plan(now)
            await self._sync(now)
        self.history.append(record)
        self._log(record)
        return record

    async def _plan(self, now: float) -> RoundRecord:
        try:
            sizes = await self.source.fetch()
        except SizesUnavailable as exc:
            self._error(now, "fetch", str(exc))
            return RoundRecord(now, "no-sizes", error=str(exc))
        ticks = (self.profiles[0].out_ticks, self.profiles[0].in_ticks)
        try:
            workload = workload_from(
                sizes, *ticks, headroom=self.headroom, slice_factor=self.slice_factor,
                rebin=self._rebin,
            )  # fmt: skip
        except PlacementError as exc:
            self._error(now, "fetch", f"request sizes do not fit the profiles: {exc}")
            return RoundRecord(now, "no-sizes", error=str(exc))
        cells = unservable_cells(self.profiles, workload)
        workload, share = without_cells(workload, cells)
        self.unserved = tuple((ticks[0][i], ticks[1][j]) for i, j in cells)
        self.unserved_share = share
        summary = {"count": sizes.count, "window_rate": sizes.rate, "span_s": sizes.span_s,
                   "arrival_rate": sizes.arrival_rate or 0.0, "rate": workload.rate,
                   "unserved_share": share}  # fmt: skip
        self.last_workload = summary
        self.metrics.workload_rate.set(workload.rate)
        self.metrics.window_requests.set(sizes.count)
        self.metrics.unserved_share.set(share)
        status, optimum, error = await asyncio.to_thread(self._optimum, workload)
        self.metrics.solves.labels(status=status).inc()
        if optimum is None:
            self._error(now, "solve", error)
            return RoundRecord(now, status, workload=summary, error=error)
        smoothed = await asyncio.to_thread(
            self.smoother.smooth, now, optimum, lambda mix: self._fit(workload, mix)
        )
        if cells or optimum.unserved:  # the held mix's plan is fit's: say what is left out
            smoothed = replace(
                smoothed,
                plan=replace(
                    smoothed.plan,
                    unserved=self.unserved + tuple(optimum.unserved),
                    unserved_share=share + (1 - share) * optimum.unserved_share,
                ),
            )
        self.smoothed = smoothed
        if smoothed.plan != self.plan:
            self.plan, self.plan_created = smoothed.plan, self._wall_clock()
        self.metrics.observe_plan(smoothed.plan)
        caps = self.limits.available  # a seeded fleet may run more than a lowered cap
        self.targets = {g: min(n, caps.get(g, n)) for g, n in smoothed.targets.items()}
        return RoundRecord(
            now, status, smoothed.reason, dict(self.targets), dict(optimum.gpus), summary
        )

    def _optimum(self, workload: Workload) -> tuple[str, Plan | None, str]:
        """(status, plan or None, error); runs in a thread."""
        if workload.rate == 0:
            gpus = {gpu: self._floor(gpu) for gpu in self.gpus}
            return "empty", Plan(gpus, mix_cost(gpus, self.costs), "empty", 0.0), ""
        started = time.perf_counter()
        try:
            plan = self._solve(
                self.profiles, workload, self.limits,
                time_limit_s=self.time_limit_s, backend=self.backend, best_effort=True,
            )  # fmt: skip
        except Infeasible as exc:
            cells = f" (cells no type serves: {list(exc.buckets)})" if exc.buckets else ""
            return "infeasible", None, f"infeasible: {exc}{cells}"
        except PlacementError as exc:
            return "error", None, f"solver: {type(exc).__name__}: {exc}"
        except Exception as exc:  # a solver bug must not end the loop (the invariant)
            log.exception("the solver failed; keeping the last plan")
            return "error", None, f"solver: {type(exc).__name__}: {exc}"
        self.metrics.solve_seconds.observe(plan.solve_s or time.perf_counter() - started)
        status = plan.status if plan.status in SOLVE_STATUSES else "optimal"
        return status, plan, ""

    def _wake_type(self) -> str | None:
        """The cheapest type (first in profile order on a tie) that serves the smallest
        cell, else any cell, within a cap above 0; None when none can."""
        caps = self.limits.available
        able = [p for p in self.profiles if caps.get(p.gpu) != 0]
        for serves in (
            lambda p: p.tputs[0][0] > 0,
            lambda p: any(t > 0 for row in p.tputs for t in row),
        ):
            fitting = [p for p in able if serves(p)]
            if fitting:
                return min(fitting, key=lambda p: p.cost).gpu
        return None

    async def wake(self, model: str = "") -> dict[str, int]:
        """Scale from zero at once: with no replica ready or starting in any pool, the
        wake type to ``max(1, its minimum)``; the target (or spec) of every type.
        ``WrongModel`` for another model (with ``--model``); ``ActuatorError`` when a
        pool cannot be read or scaled."""
        if self.model and model and model != self.model:
            self.metrics.wakes.labels(result="wrong-model").inc()
            raise WrongModel(f"this planner plans model {self.model}, not {model}")
        async with self._lock:
            now = self._clock()
            states: dict[str, ReplicaState] = {}
            for gpu, pool in self.pools.items():
                try:
                    states[gpu] = await pool.state()
                except ActuatorError as exc:
                    self._error(now, "state", f"pool {gpu}: {exc}")
                    self.metrics.wakes.labels(result="failed").inc()
                    raise ActuatorError(f"wake: pool {gpu}: {exc}") from exc
            self.states.update(states)
            current = {g: s.spec for g, s in states.items()}
            waking = self.wake_gpu
            busy = any(s.ready + s.pending > 0 for s in states.values())
            if busy or waking is None or current[waking] >= self._wake_floor(waking):
                self.metrics.wakes.labels(result="already").inc()
                return {**current, **(self.targets or {})}
            gpu, want = waking, self._wake_floor(waking)
            if self.smoother.mix is None:
                self.smoother.seed(now, current)
            self.smoother.wake(now, gpu, want)
            self.targets = {**(self.targets or {}), gpu: want}
            log.info("wake for %s: %s from zero to %d", model or "the model", gpu, want)
            await self._sync(now)
            self.metrics.wakes.labels(result="scaled").inc()
            return {**current, **self.targets}

    def _wake_floor(self, gpu: str) -> int:
        n = max(1, self.limits.min_replicas.get(gpu, 0))
        cap = self.limits.available.get(gpu)
        return n if cap is None else min(n, cap)

    def _floor(self, gpu: str) -> int:
        low = self.limits.min_replicas.get(gpu, 0)
        high = self.limits.available.get(gpu)
        return low if high is None else min(low, high)

    def _fit(self, workload: Workload, mix: Mapping[str, int]) -> Plan | None:
        """The plan serving ``workload`` within ``mix`` (its counts as caps); ``None`` when
        it cannot (or the solver cannot tell: then the optimum is adopted)."""
        if workload.rate == 0:
            return Plan(dict(mix), mix_cost(mix, self.costs), "empty", 0.0)
        caps = Limits(
            available={gpu: int(mix.get(gpu, 0)) for gpu in self.gpus},
            min_replicas={
                g: min(n, int(mix.get(g, 0))) for g, n in self.limits.min_replicas.items()
            },
        )
        try:
            return self._solve(
                self.profiles, workload, caps, time_limit_s=self.time_limit_s, backend=self.backend
            )
        except PlacementError:
            return None
        except Exception:  # a solver bug must not end the loop: the optimum is adopted
            log.exception("the solver failed on the mix in force; adopting the optimum")
            return None

    # -- the pools -----------------------------------------------------------------------

    async def sync_pools(self) -> None:
        """Each pool's state; scale where its spec is not the target; publish."""
        async with self._lock:
            await self._sync(self._clock())

    async def _sync(self, now: float) -> None:
        gpus = list(self.pools)
        results = await asyncio.gather(*(self._sync_pool(now, gpu) for gpu in gpus))
        endpoints = {}
        for gpu, state in zip(gpus, results, strict=True):
            if state is None:
                continue
            self.states[gpu] = state
            self.metrics.ready.labels(gpu_type=gpu).set(state.ready)
            endpoints[gpu] = [url for url in state.endpoints if url.startswith("http")]
        for gpu, n in (self.targets or {}).items():
            self.metrics.target.labels(gpu_type=gpu).set(n)
        if self.discovery is not None:
            try:
                self.discovery.publish(endpoints)
            except ActuatorError as exc:
                self._error(now, "state", str(exc))

    async def _sync_pool(self, now: float, gpu: str) -> ReplicaState | None:
        actuator = self.pools[gpu]
        try:
            state = await actuator.state()
        except ActuatorError as exc:
            self._error(now, "state", f"pool {gpu}: {exc}")
            return None
        want = None if self.targets is None else self.targets.get(gpu)
        if want is None or self.dry_run or want == state.spec:
            return state
        log.info("pool %s: %d -> %d replicas", gpu, state.spec, want)
        try:
            await actuator.scale(want)
            return await actuator.state()  # leaving local engines out of the file now
        except ActuatorError as exc:
            self._error(now, "scale", f"pool {gpu}: scale to {want}: {exc}")
            return state

    # -- reporting -----------------------------------------------------------------------

    def _error(self, now: float, stage: str, message: str) -> None:
        self.metrics.errors.labels(stage=stage).inc()
        self.errors.append({"now_s": round(now, 3), "stage": stage, "error": message})
        log.warning("%s: %s", stage, message)

    def _log(self, record: RoundRecord) -> None:
        if record.error:  # _error warned already
            log.debug("round held (%s): %s", record.status, record.error)
            return
        quiet = record.reason == "unchanged"  # every 30 s by default: changes are news
        (log.debug if quiet else log.info)(
            "plan %s (%s): optimum %s targets %s; workload %s",
            record.status, record.reason, dict(record.optimum), dict(record.targets),
            dict(record.workload), extra={"plan": asdict(record)},
        )  # fmt: skip

    def plan_json(self) -> dict[str, Any] | None:
        """``GET /v1/plan``: ``formats.plan_to_json`` plus model and created; ``None``
        before the first plan."""
        if self.plan is None:
            return None
        from control.placement.formats import plan_to_json

        first = self.profiles[0]
        out = plan_to_json(self.plan, first.out_ticks, first.in_ticks)
        return {**out, "model": self.model or None, "created": self.plan_created}

    def status(self) -> dict[str, Any]:
        smoothed = self.smoothed
        return {
            "model": self.model or None,
            "dry_run": self.dry_run,
            "interval_s": self.interval_s,
            "plan": None if self.plan is None else self.plan.to_json(),
            "plan_created": self.plan_created,
            "mix": None if smoothed is None else dict(smoothed.mix),
            "reason": None if smoothed is None else smoothed.reason,
            "delayed": [] if smoothed is None else list(smoothed.delayed),
            "workload": self.last_workload,
            "unserved": {
                "cells": [list(cell) for cell in self.unserved],
                "share": self.unserved_share,
            },
            "wake_gpu": self.wake_gpu,
            "pools": {
                gpu: {
                    "target": None if self.targets is None else self.targets.get(gpu),
                    **(
                        {"spec": s.spec, "ready": s.ready, "pending": s.pending}
                        if (s := self.states.get(gpu)) is not None
                        else {"spec": None, "ready": None, "pending": None}
                    ),
                }
                for gpu in self.gpus
            },
            "rounds": [asdict(r) for r in self.history],
            "errors": list(self.errors),
        }

    async def run(self, stop: asyncio.Event) -> None:
        """A planning round every ``interval_s``, pool syncs every ``pool_interval_s``
        between them, until ``stop`` is set."""
        next_plan = self._clock()
        while not stop.is_set():
            started = self._clock()
            if started >= next_plan:
                await self.run_round()
                next_plan = started + self.interval_s
            else:
                await self.sync_pools()
            delay = max(0.0, min(next_plan, self._clock() + self.pool_interval_s) - self._clock())
            sleeper = asyncio.ensure_future(self._sleep(delay))
            stopper = asyncio.ensure_future(stop.wait())
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sleeper, stopper):
                task.cancel()

    async def close(self) -> None:
        """Unpublish the local engines, then close the source and every pool."""
        if self.discovery is not None:
            try:
                self.discovery.publish({gpu: () for gpu in self.discovery.gpus})
            except ActuatorError as exc:
                log.warning("%s", exc)
        await self.source.close()
        await asyncio.gather(*(pool.close() for pool in self.pools.values()))


# -- wiring ------------------------------------------------------------------------------


def _make_pool(settings: PlacementSettings, pool: PoolSpec) -> Actuator:
    if pool.kind == "memory":
        from control.autoscale.actuators.memory import MemoryActuator

        return MemoryActuator(0)
    if pool.kind == "local":
        from control.autoscale.actuators.local import LocalActuator

        return LocalActuator(
            pool.engine_command,
            ready_timeout_s=settings.engine_ready_timeout_s,
            drain_s=settings.drain_s,
            kill_grace_s=settings.engine_stop_grace_s,
        )
    if pool.kind == "ray":
        from control.autoscale.actuators.ray import RayFleetActuator

        token = (
            read_secret(settings.ray_token_file, "--ray-token-file")
            if settings.ray_token_file
            else None
        )
        return RayFleetActuator(pool.name, token)
    from control.autoscale.actuators.kubernetes import KubernetesActuator

    return KubernetesActuator(
        pool.workload_kind, pool.name, namespace=pool.namespace, engine_port=settings.engine_port
    )


def build(settings: PlacementSettings) -> Planner:
    """The planner the settings describe; ``ConfigError`` naming the fix when they do not
    fit (profiles unreadable, pools and profiles naming different GPU types)."""
    from control.placement.formats import load_profile

    paths = split_list(settings.profile)
    if not paths:
        raise ConfigError("give one --profile FILE per GPU type")
    profiles = [load_profile(path) for path in paths]
    specs = {p.gpu: p for p in parse_pools(settings)}
    if not specs and settings.dry_run:  # a dry run with no pools: numbers only
        specs = {p.gpu: PoolSpec(p.gpu, "memory") for p in profiles}
    limits_gpus = {p.gpu for p in profiles}
    min_replicas = parse_counts(settings.min_replicas, "--min-replicas")
    available = parse_counts(settings.max_replicas, "--max-replicas")
    unknown = (set(min_replicas) | set(available)) - limits_gpus
    if unknown:
        raise ConfigError(f"--min-replicas/--max-replicas name types without a profile: {unknown}")
    local = [gpu for gpu, spec in specs.items() if spec.kind == "local"]
    if local and not settings.discovery_file:
        raise ConfigError("local pools need --discovery-file (the router's engine list)")
    pools = {gpu: _make_pool(settings, spec) for gpu, spec in specs.items()}
    token = (
        read_secret(settings.router_token_file, "--router-token-file")
        if settings.router_token_file
        else None
    )
    source = RouterSizes(
        settings.router_url, model=settings.model, window_s=settings.window_s, token=token,
        timeout_s=settings.fetch_timeout_s,
    )  # fmt: skip
    gpus = tuple(p.gpu for p in profiles)
    return Planner(
        profiles,
        pools,
        source,
        limits=Limits(available=available, min_replicas=min_replicas),
        smoother=Smoother(
            gpus,
            {p.gpu: p.cost for p in profiles},
            scale_down_delay_s=settings.scale_down_delay_s,
            min_saving=settings.min_saving,
        ),
        headroom=settings.headroom,
        slice_factor=settings.slice_factor,
        time_limit_s=settings.time_limit_s,
        backend=settings.backend,
        interval_s=settings.interval_s,
        pool_interval_s=settings.pool_interval_s,
        dry_run=settings.dry_run,
        model=settings.model,
        discovery=DiscoveryWriter(settings.discovery_file, local) if local else None,
    )


async def _serve(settings: PlacementSettings) -> int:
    from control.placement.server import start_server

    planner = build(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        if settings.port:
            token = (
                read_secret(settings.auth_token_file, "--auth-token-file")
                if settings.auth_token_file
                else None
            )
            runner = await start_server(planner, settings.host, settings.port, token)
        log.info(
            "placement planner running: %s, every %.1f s%s",
            ", ".join(f"{gpu}={type(a).__name__}" for gpu, a in planner.pools.items()),
            settings.interval_s, " (dry run)" if settings.dry_run else "",
        )  # fmt: skip
        await planner.run(stop)
    finally:
        log.info("placement planner stopping")
        if runner is not None:
            await runner.cleanup()
        await planner.close()
    return 0


def serve(settings: PlacementSettings) -> int:
    """Run the planner until SIGTERM/SIGINT; the exit code (0 on a clean stop)."""
    return asyncio.run(_serve(settings))
