"""``shoal health watch``: check the node's GPUs every interval and serve the result.

::

    main thread (asyncio)                         XID thread (one per open backend)
      every --interval-s, or at once on an XID:     loop: backend.wait_xid(xid_wait_s)
        open the backend if it is not open            events -> SimpleQueue, wake the loop
        drain XID events -> ledger, metrics
        apply pending clears -> ledger
        collect(backend, ledger) on a thread -> NodeHealth
        metrics, cordon (optional)
      HTTP: GET /v1/gpus   latest NodeHealth.to_json() (503 before the first check)
            GET /metrics   shoal_gpu_* (Prometheus text)
            GET /healthz   200 "ok" (the watcher lives; its GPUs may not be healthy)
            POST /v1/clear {"gpu": I} -> 202: forget GPU I's XIDs at the next check
                           (at once: it wakes the loop), after an operator reset; the
                           only way a critical XID clears (a restart forgets them all) it

Invariant: the ledger is only touched on the event-loop thread, between checks (never
while ``collect`` reads it on its worker thread): XID events and clears are queued and
applied at the start of a check. Rejected: a lock shared by the XID thread, the HTTP
handler and ``collect`` (the ledger is pure and not thread-safe; a queue keeps it so).

NVML unavailable at start or lost later (``NvmlUnavailable``/``BackendError`` from the
backend as a whole, or ``collect``'s own node-level ``nvml`` problem with no GPU listed)
never stops the watcher: it keeps serving, reports a node-level critical problem ``nvml``
(remedy ``drain_node``, as ``shoal health check`` does; node-level problems never
cordon), closes the backend and tries to open it again each round. The report then
lists the GPUs last seen (or ``0..expect_gpus-1`` before any), each with a critical
``nvml`` problem "not read" (remedy ``none``), so consumers mark exactly those unhealthy:
a report with no GPUs would let the router think none was sick.

A hung check (NVML calls block for minutes on a GPU falling off the bus): ``collect``
runs on its own daemon thread with a deadline, ``check_deadline_s`` = max(3 intervals,
30 s) by default (shorter than the consumers' stale limit of 3 intervals + 30 s of clock
skew, so they see the hung report before they would drop the old one). Past it, every
round serves a node-level critical ``check_hung`` (remedy ``drain_node``; node-level, so
it never cordons) over the GPUs last seen, each critical "not read", instead of the last
(healthy) report; no new check starts on that backend. When the thread returns at last,
its backend is closed and a fresh one opened. A backend is never closed while a thread of
ours may be inside it (the hung check, an XID wait that did not stop): it is leaked with a
log line instead (closing NVML under a running call is a use-after-free). SIGTERM stops at
once, hung check or not (the thread is a daemon; not ``asyncio.to_thread``, whose pool is
joined at exit). Rejected: serving 503 for an old report (unknown is not sick: a hung
check is the case where the GPU is most surely sick, so it is reported as critical).

GPUs that go away: every GPU seen since the watcher started (and ``0..expect_gpus-1``)
stays listed; one no longer visible is critical ``missing`` (report.collect does the same
for ``--expect-gpus``), with a node-level critical ``gpu_count``. The set never shrinks: a
GPU removed on purpose needs a watcher restart.

Critical XIDs clear only by ``POST /v1/clear``. Without ``--state-file`` the ledger is in
memory and a restart forgets it; with it, the ledger is restored at start and written
atomically after each check that changed it (``_StateFile``).

The XID thread: when ``wait_xid`` fails (events not supported on some vGPU/MIG setups),
it is restarted once; if that fails too, XID events are off (logged at info, counted in
``check_errors``) until the backend is reopened, instead of a new thread and a warning
every round.

The watcher only reports; the router and the Ray fleet act on ``/v1/gpus``, and on
Kubernetes the optional ``Cordoner`` (cordon.py) cordons the node. Auth: loopback by
default; with a token (``--auth-token-file``) ``/v1/gpus`` and ``/v1/clear`` need
``Authorization: Bearer TOKEN`` (401 otherwise, compared in constant time) and ``/metrics``
and ``/healthz`` stay open, as on the autoscaler's endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.health.backend import GpuBackend, open_backend
from control.health.checks import missing_problem
from control.health.config import HealthSettings, kube_node_name, node_name, read_token
from control.health.cordon import Cordoner
from control.health.errors import HealthError
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
from control.http import require_token
from shoal.errors import ConfigError

__all__ = ["Ledger", "Watcher", "XidPump", "make_app", "serve", "start_server"]

log = logging.getLogger("shoal." + __name__)

MAX_BODY_BYTES = 4 << 10  # a clear body is {"gpu": I}
HUNG_INTERVALS = 3  # a check not back within max(3 intervals, 30 s) is hung
HUNG_MIN_S = 30.0
MAX_PUMP_RESTARTS = 1  # then XID events are off until the backend is reopened


class Ledger(Protocol):
    """What the watcher needs of control.health.xid.XidLedger."""

    def record(self, event: XidEvent) -> None: ...

    def clear(self, index: int) -> None: ...


Collect = Callable[..., NodeHealth]  # report.collect(backend, *, node, ledger, expect_gpus, now)


class _Recording:
    """The backend, remembering each GPU's last snapshot for the metrics."""

    def __init__(self, backend: GpuBackend) -> None:
        self.backend = backend
        self.snapshots: dict[int, GpuSnapshot] = {}

    def device_count(self) -> int:
        return self.backend.device_count()

    def driver_version(self) -> str:
        return self.backend.driver_version()

    def snapshot(self, index: int) -> GpuSnapshot:
        snap = self.backend.snapshot(index)
        self.snapshots[index] = snap
        return snap

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        return self.backend.wait_xid(timeout_s)

    def close(self) -> None:
        self.backend.close()


class _StateFile:
    """The XID ledger kept in a small JSON file (``--state-file``), so a watcher restart
    does not forget critical XIDs: loaded once at start, written atomically (a temporary
    file, then ``os.replace``) after each check that changed it. A file that cannot be
    read or parsed is logged and ignored (the watcher starts with an empty ledger); a
    write that fails is logged and retried at the next change."""

    def __init__(self, path: Path, ledger: Any) -> None:
        self.path = path
        self._ledger = ledger
        self._saved: dict[str, Any] | None = None
        try:
            doc = json.loads(path.read_text())
            ledger.restore(doc)
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("XID state file %s unreadable, starting empty: %s", path, exc)
            return
        self._saved = ledger.to_json()
        log.info("XID state restored from %s: GPUs %s", path, ledger.indexes() or "none")

    def save(self) -> None:
        doc = self._ledger.to_json()
        if doc == self._saved:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("XID state file %s not written: %s", self.path, exc)
            return
        self._saved = doc


class _Collecting:
    """One ``collect`` on its own daemon thread, its result in an asyncio future.

    Not ``asyncio.to_thread``: the default executor's threads are joined when the loop
    (``asyncio.run``) ends and at interpreter exit, so a check hung in NVML would hold
    SIGTERM for ever. A daemon thread is simply left behind."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, call: Callable[[], NodeHealth], started: float
    ) -> None:
        self.started = started
        self.future: asyncio.Future[NodeHealth] = loop.create_future()
        self._loop = loop
        self._call = call
        self._thread = threading.Thread(target=self._run, name="shoal-health-check", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            result = self._call()
        except BaseException as exc:  # handed to the awaiting loop, which re-raises it
            error = exc
            self._hand(lambda: self.future.set_exception(error))
        else:
            self._hand(lambda: self.future.set_result(result))

    def _hand(self, deliver: Callable[[], None]) -> None:
        def on_loop() -> None:
            if not self.future.done():
                deliver()

        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(on_loop)

    def finished(self) -> bool:
        return not self._thread.is_alive()


def _lost(health: NodeHealth) -> str | None:
    """The reason when ``collect`` could not even count the GPUs (its node-level ``nvml``
    problem and no GPU listed): the backend is lost and must be reopened."""
    if health.gpus:
        return None
    return next((p.detail for p in health.problems if p.check == "nvml"), None)


class XidPump:
    """``backend.wait_xid`` in a loop on its own thread; events wait in a queue for the loop.

    ``stop()`` returns within one ``wait_s`` (the longest single wait). A backend error
    ends the thread and is kept in ``failure`` for the loop's next round to report."""

    def __init__(self, backend: GpuBackend, *, wait_s: float, notify: Callable[[], None]) -> None:
        self._backend = backend
        self._wait_s = wait_s
        self._notify = notify
        self._events: queue.SimpleQueue[XidEvent] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shoal-health-xid", daemon=True)
        self.failure: str | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                events = self._backend.wait_xid(self._wait_s)
            except HealthError as exc:
                # no wake: a wait_xid that fails at once would spin the loop; the next
                # regular round reports it and starts a new thread
                self.failure = str(exc)
                return
            for event in events:
                self._events.put(event)
            if events:
                self._notify()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def take_events(self) -> list[XidEvent]:
        events: list[XidEvent] = []
        with contextlib.suppress(queue.Empty):
            while True:
                events.append(self._events.get_nowait())
        return events

    def request_stop(self) -> None:
        """Ask the thread to stop; do not wait (it may be blocked in the backend)."""
        self._stop.set()

    def stop(self) -> bool:
        """Ask the thread to stop and wait for it; False if it is still blocked."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._wait_s + 2.0)
        return not self._thread.is_alive()


class Watcher:
    """The polling loop's state: the backend (or none), the ledger, the latest report."""

    def __init__(
        self,
        opener: Callable[[], GpuBackend],
        *,
        node: str,
        expect_gpus: int | None = None,
        interval_s: float = 5.0,
        xid_wait_s: float = 1.0,
        metrics: HealthMetrics | None = None,
        cordoner: Cordoner | None = None,
        collect: Collect | None = None,
        ledger: Ledger | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        check_deadline_s: float | None = None,
        state_file: Path | None = None,
    ) -> None:
        self._state: _StateFile | None = None
        if state_file is not None:
            from control.health.xid import XidLedger as _XidLedger

            assert ledger is None, "a state file keeps the watcher's own XidLedger"
            own = _XidLedger(clock=clock)
            self._state = _StateFile(state_file, own)
            ledger = own
        if collect is None:
            from control.health.report import collect as report_collect

            collect = report_collect
        if ledger is None:
            from control.health.xid import XidLedger

            ledger = XidLedger(clock=clock)
        self._opener = opener
        self.node = node
        self.expect_gpus = expect_gpus
        self.interval_s = interval_s
        self.xid_wait_s = xid_wait_s
        self.check_deadline_s = (
            max(HUNG_INTERVALS * interval_s, HUNG_MIN_S)
            if check_deadline_s is None
            else check_deadline_s
        )
        self.metrics = metrics or HealthMetrics()
        self.cordoner = cordoner
        self._collect: Collect = collect
        self.ledger = ledger
        self._clock = clock
        self._monotonic = monotonic
        self._backend: _Recording | None = None
        self._pump: XidPump | None = None
        self._clears: list[int] = []
        self._open_error = ""
        self._known: dict[int, str] = {}  # index -> uuid of every GPU seen (never shrinks)
        self._collecting: _Collecting | None = None  # a collect thread that has not returned
        self._abandoned: tuple[_Recording, XidPump | None] | None = None  # a hung check's
        self._pump_failures = 0  # XID threads that failed since the backend was opened
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self.latest: NodeHealth | None = None

    # -- one round ---------------------------------------------------------------------

    async def check_once(self) -> NodeHealth:
        """One full check; never raises for the backend's failures. A check that has not
        finished after ``check_deadline_s`` is hung: its thread is left alone (a daemon)
        and, until it returns, every round serves the ``check_hung`` report."""
        self._loop = asyncio.get_running_loop()
        self._wake.clear()
        if self._collecting is not None:
            if not self._collecting.finished():
                return self._publish(self._hung_report(self._collecting), None)
            await self._retire_hung()
        if self._backend is None and not await self._open():
            why = f"NVML unavailable: {self._open_error}"
            return self._publish(self._unavailable(why), None)
        assert self._backend is not None
        self._drain()
        if self._state is not None:
            self._state.save()
        self._backend.snapshots.clear()  # an unreadable GPU exports no stale readings
        started = self._monotonic()
        call = functools.partial(
            self._collect,
            self._backend,
            node=self.node,
            ledger=self.ledger,
            expect_gpus=self.expect_gpus,
            now=self._clock(),
        )
        collecting = _Collecting(self._loop, call, started)
        self._collecting = collecting
        try:
            async with asyncio.timeout(self.check_deadline_s):
                health = await asyncio.shield(collecting.future)
        except TimeoutError:
            return self._publish(self._hang(collecting), None)
        except HealthError as exc:  # report.collect says so itself; a backend may raise
            self._collecting = None
            lost: str | None = f"NVML lost: {exc}"
        else:
            self._collecting = None
            lost = _lost(health)
        if lost is not None:
            log.warning("GPU backend lost, reopening next round: %s", lost)
            self.metrics.check_errors.inc()
            await self._close_backend()
            return self._publish(self._unavailable(lost), None)
        health = self._with_missing(health)
        return self._publish(health, self._monotonic() - started)

    def _hang(self, collecting: _Collecting) -> NodeHealth:
        """The check has not returned in time: stop using its backend (it is closed only
        after the thread returns) and report the node as hung."""
        log.error(
            "GPU check hung for %.0f s (NVML blocked?): reporting check_hung; the check's "
            "thread is left to finish, the backend is reopened after it returns",
            self.check_deadline_s,
        )
        self.metrics.check_errors.inc()
        pump, backend = self._pump, self._backend
        self._pump = self._backend = None
        if pump is not None:
            pump.request_stop()
        if backend is not None:
            self._abandoned = (backend, pump)
        return self._hung_report(collecting)

    def _hung_report(self, collecting: _Collecting) -> NodeHealth:
        seconds = self._monotonic() - collecting.started
        return self._unavailable(
            f"the GPU check has not returned for {seconds:.0f} s (deadline "
            f"{self.check_deadline_s:.0f} s): NVML hangs, a GPU may be falling off the bus",
            check="check_hung",
            unread_why="the GPU check hangs",
        )

    async def _retire_hung(self) -> None:
        """The hung check returned at last: close its backend now (or leak it, with a log
        line, while its XID thread still runs) and start afresh this round."""
        assert self._collecting is not None
        log.warning(
            "the hung GPU check returned after %.0f s; reopening the backend",
            self._monotonic() - self._collecting.started,
        )
        self._collecting = None
        abandoned, self._abandoned = self._abandoned, None
        if abandoned is not None:
            backend, pump = abandoned
            await self._release(backend, pump)

    async def _open(self) -> bool:
        try:
            backend = await asyncio.to_thread(self._opener)
        except HealthError as exc:
            # a warning when it starts or changes, not every round of a long outage
            level = logging.DEBUG if str(exc) == self._open_error else logging.WARNING
            log.log(level, "GPU backend unavailable, retrying each round: %s", exc)
            self._open_error = str(exc)
            self.metrics.check_errors.inc()
            return False
        if self._open_error:
            log.warning("GPU backend open again")
            self._open_error = ""
        self._backend = _Recording(backend)
        self._pump_failures = 0
        self._start_pump()
        return True

    def _start_pump(self) -> None:
        assert self._backend is not None and self._loop is not None
        loop = self._loop
        self._pump = XidPump(
            self._backend.backend,
            wait_s=self.xid_wait_s,
            notify=lambda: self._notify(loop),
        )
        self._pump.start()

    def _notify(self, loop: asyncio.AbstractEventLoop) -> None:
        """From the XID thread: check now. The loop may be closing: then nobody waits."""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._wake.set)

    def _drain(self) -> None:
        pump = self._pump
        if pump is not None:
            for event in pump.take_events():
                log.warning("XID %d on gpu%d", event.xid, event.index)
                self.ledger.record(event)
                self.metrics.count_xid(event)
            if not pump.alive:  # wait_xid failed
                self._pump_failures += 1
                self.metrics.check_errors.inc()
                if self._pump_failures <= MAX_PUMP_RESTARTS:
                    log.warning("XID watch failed, restarting it: %s", pump.failure)
                    self._start_pump()
                else:
                    log.info(
                        "XID watch failed again (%s): XID events are off until the GPU "
                        "backend is reopened; the other checks go on",
                        pump.failure,
                    )
                    self._pump = None
        clears, self._clears = self._clears, []
        for index in clears:
            log.info("XIDs of gpu%d cleared", index)
            self.ledger.clear(index)

    def _unavailable(
        self, why: str, check: str = "nvml", unread_why: str = "NVML unavailable"
    ) -> NodeHealth:
        problem = Problem(check, Severity.CRITICAL, why, Remedy.DRAIN_NODE)
        # each GPU says so too, so that its own "healthy" is false for a reader of the
        # JSON that looks no further; the remedy stays on the node's problem (no cordon)
        unread = (Problem(check, Severity.CRITICAL, f"not read: {unread_why}"),)
        known = self._known or {i: "" for i in range(self.expect_gpus or 0)}
        gpus = tuple(GpuHealth(index, uuid, unread) for index, uuid in sorted(known.items()))
        return NodeHealth(self.node, self._clock(), gpus, (problem,))

    def _with_missing(self, health: NodeHealth) -> NodeHealth:
        """``health`` plus every GPU seen earlier (in this process) that it lacks, each
        critical ``missing`` (remedy ``drain_node``), and a node-level critical ``gpu_count``
        when ``collect`` had none; remembers the GPUs seen (the set never shrinks: a GPU
        taken out on purpose needs a watcher restart)."""
        listed = {g.index for g in health.gpus}
        gone = sorted(set(self._known) - listed)
        for g in health.gpus:
            if g.uuid or g.index not in self._known:
                self._known[g.index] = g.uuid
        if not gone:
            return health
        seen = len(self._known)
        problem = missing_problem(len(listed), seen)
        gpus = (*health.gpus, *(GpuHealth(i, self._known[i], (problem,)) for i in gone))
        node_problems = health.problems
        if not any(p.check == "gpu_count" and p.severity is Severity.CRITICAL
                   for p in node_problems):  # fmt: skip
            count = Problem(
                "gpu_count", Severity.CRITICAL, f"{len(listed)} GPUs visible, {seen} seen earlier"
            )
            node_problems = (*node_problems, count)
        return NodeHealth(
            health.node, health.time, tuple(sorted(gpus, key=lambda g: g.index)), node_problems
        )

    def _publish(self, health: NodeHealth, seconds: float | None) -> NodeHealth:
        snapshots: Mapping[int, GpuSnapshot] = {}
        if self._backend is not None:
            listed = {g.index for g in health.gpus}
            snapshots = {i: s for i, s in self._backend.snapshots.items() if i in listed}
        self.metrics.observe(health, snapshots, seconds)
        self.latest = health
        return health

    async def act(self, health: NodeHealth) -> None:
        if self.cordoner is not None:
            await self.cordoner.observe(health)

    # -- the loop ----------------------------------------------------------------------

    def request_clear(self, index: int) -> None:
        """Forget GPU ``index``'s XIDs at the next check, which starts at once."""
        self._clears.append(index)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Check every ``interval_s`` (at once after an XID or a clear) until ``stop``."""
        stopper = asyncio.create_task(stop.wait())
        stopper.add_done_callback(lambda _: self._wake.set())
        try:
            while not stop.is_set():
                check = asyncio.create_task(self.check_once())
                await asyncio.wait({check, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not check.done():  # stopped mid-check: the check's thread is a daemon
                    check.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await check
                    break
                health = check.result()
                await self.act(health)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.interval_s):
                        await self._wake.wait()
        finally:
            stopper.cancel()

    async def _close_backend(self) -> None:
        pump, backend = self._pump, self._backend
        self._pump = self._backend = None
        if backend is not None:
            await self._release(backend, pump)
        elif pump is not None:
            pump.request_stop()

    async def _release(self, backend: _Recording, pump: XidPump | None) -> None:
        """Close ``backend`` once nothing uses it; while a thread of ours is still inside it
        (a hung check, an XID wait that did not stop), leak it with a log line instead:
        closing NVML under a running call is a use-after-free."""
        if pump is not None and not await asyncio.to_thread(pump.stop):
            log.warning("the XID thread did not stop in time: leaving the GPU backend open")
            return
        if self._collecting is not None and not self._collecting.finished():
            log.warning("a hung GPU check still runs: leaving the GPU backend open")
            return
        with contextlib.suppress(HealthError):
            await asyncio.to_thread(backend.close)

    async def close(self) -> None:
        await self._close_backend()
        abandoned, self._abandoned = self._abandoned, None
        if abandoned is not None:
            await self._release(*abandoned)
        if self.cordoner is not None:
            await self.cordoner.close()


# -- HTTP ------------------------------------------------------------------------------

_WATCHER = web.AppKey("watcher", Watcher)


async def _gpus(request: web.Request) -> web.Response:
    latest = request.app[_WATCHER].latest
    if latest is None:
        return web.json_response({"error": "no check has finished yet"}, status=503)
    return web.json_response(latest.to_json())


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_WATCHER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _clear(request: web.Request) -> web.Response:
    try:
        body: Any = json.loads((await request.read()).decode() or "{}")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        body = None
    index = body.get("gpu") if isinstance(body, dict) else None
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
        return web.json_response({"error": 'body must be JSON {"gpu": INDEX}'}, status=400)
    request.app[_WATCHER].request_clear(index)
    return web.json_response({"gpu": index, "cleared": "at the next check"}, status=202)


def make_app(watcher: Watcher, token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[require_token(token)] if token else [], client_max_size=MAX_BODY_BYTES
    )
    app[_WATCHER] = watcher
    app.router.add_get("/v1/gpus", _gpus)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_post("/v1/clear", _clear)
    return app


async def start_server(
    watcher: Watcher, host: str, port: int, token: str | None = None
) -> tuple[web.AppRunner, int]:
    """Listen on ``host:port`` (0: a free port); the runner and the port bound.
    ``ConfigError`` if it cannot listen."""
    runner = web.AppRunner(make_app(watcher, token), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    server: Any = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None else port
    log.info("health watcher on http://%s:%d (/v1/gpus, /metrics, /healthz)", host, bound)
    return runner, int(bound)


# -- the daemon --------------------------------------------------------------------------


def build_watcher(settings: HealthSettings) -> Watcher:
    """The watcher the settings describe (the cordoner too, with ``--cordon``)."""
    mock = Path(settings.nvml_mock) if settings.nvml_mock else None
    metrics = HealthMetrics()
    cordoner = None
    if settings.cordon:
        cordoner = Cordoner(
            kube_node_name(settings),
            apply=settings.cordon_apply,
            metrics=metrics,
            after_checks=settings.cordon_after_checks,
        )
    return Watcher(
        lambda: open_backend(mock),
        node=node_name(settings),
        expect_gpus=settings.expect_gpus or None,
        interval_s=settings.interval_s,
        xid_wait_s=settings.xid_wait_s,
        metrics=metrics,
        cordoner=cordoner,
        state_file=Path(settings.state_file) if settings.state_file else None,
    )


async def _serve(settings: HealthSettings) -> int:
    token = read_token(settings.auth_token_file) if settings.auth_token_file else None
    watcher = build_watcher(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        runner, _ = await start_server(watcher, settings.host, settings.port, token)
        log.info(
            "watching GPUs of node %s every %.1f s%s",
            watcher.node,
            settings.interval_s,
            ""
            if watcher.cordoner is None
            else f", cordon {'on' if settings.cordon_apply else 'dry run'}",
        )
        await watcher.run(stop)
    finally:
        log.info("health watcher stopping")
        if runner is not None:
            await runner.cleanup()
        await watcher.close()
    return 0


def serve(settings: HealthSettings) -> int:
    """Run the watcher until SIGTERM/SIGINT; the exit code (0 on a clean stop)."""
    return asyncio.run(_serve(settings))
