"""Engine processes on this machine as the scale target, published to the router by file.

Each engine is ``--engine-command`` with ``{port}`` replaced by a free loopback port, in
its own session (so its whole process group is stopped, children included), its output in
``WORKDIR/engine-PORT.log``. Life of one engine::

    starting --GET /health 200--> ready --scale down--> draining --drain_s--> SIGTERM
        |                           |                                   (SIGKILL after grace)
        +--exits / start timeout----+--exits--> gone, replaced (state() notices)
                                    +--MAX_FAILED_PROBES /health failures in a row-->
                                         out of the file, stopped, replaced

Invariants:

* the discovery file lists exactly the ready engines (JSON ``[{"url": ...}]``), written
  atomically (a temporary file in the same directory, then ``os.replace``), so the router
  (``--discovery file``) never reads half a list;
* scaling down removes an engine from the file *first* and stops it ``drain_s`` later, so
  requests the router already sent it finish; starting engines are dropped first (they
  serve nothing), then the newest ready ones;
* ``spec`` is the count last asked for; ``ready + pending == spec`` after every
  ``state()``: an engine that died or did not start in ``ready_timeout_s`` is replaced
  there (logged with its exit code and log), never silently lost. The one exception is a
  command that keeps failing before any engine gets ready (a typo in
  ``--engine-command``): its replacements wait 1, 2, 4 ... s (at most ``MAX_BACKOFF_S``),
  and until then the missing engines are neither ready nor pending (``scale()`` honours
  the same backoff: asking for more engines does not skip it);
* an engine whose leader process died is replaced only after its whole process group got
  SIGKILL: children it left (vLLM's EngineCore) would keep its port and memory;
* a ready engine is probed again every ``state()`` (all engines at once, each within the
  probe timeout): after ``MAX_FAILED_PROBES`` failures in a row it is hung, not slow; it
  leaves the file, its group is stopped (in the background, with the grace) and it is
  replaced. One failed probe keeps it listed: the router's own checks cover blips.

Readiness is probed in ``state()`` (each control round), not by a task per engine: one
place changes the engine table, so the file and the counts cannot disagree. Drains are
timed tasks because they must not wait for the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from control.autoscale.errors import ActuatorError
from control.autoscale.types import ReplicaState
from shoal.errors import ConfigError
from shoal.processes import free_loopback_port, shoal_env

__all__ = ["LocalActuator", "free_port", "write_discovery_entries", "write_discovery_file"]

log = logging.getLogger("shoal." + __name__)

# An engine that fails before getting ready is replaced after 1, 2, 4 ... s, at most this.
MAX_BACKOFF_S = 60.0
# A ready engine that fails this many /health probes in a row (one per round) is replaced.
MAX_FAILED_PROBES = 3


def write_discovery_file(path: Path, urls: list[str]) -> None:
    """``[{"url": ...}, ...]`` into ``path`` atomically (temp file + rename)."""
    write_discovery_entries(path, [{"url": url} for url in urls])


def write_discovery_entries(path: Path, entries: Sequence[Mapping[str, str]]) -> None:
    """Discovery entries (``{"url", "gpu_type"?, "stream"?}``) into ``path`` atomically;
    the placement planner publishes several pools' engines with their GPU type this way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump([dict(entry) for entry in entries], handle)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def free_port(taken: set[int]) -> int:
    """A free loopback port not in ``taken`` (``shoal.processes.free_loopback_port``)."""
    port = free_loopback_port(taken)
    if port is None:
        raise ActuatorError("local target: no free loopback port outside the ephemeral range")
    return port


@dataclass
class _Engine:
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    started_s: float
    ready: bool = False
    failed_probes: int = 0  # /health failures in a row since it got ready

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class LocalActuator:
    def __init__(
        self,
        engine_command: str,
        *,
        discovery_file: str | Path = "",
        ready_timeout_s: float = 120.0,
        drain_s: float = 10.0,
        kill_grace_s: float = 5.0,
        workdir: str | Path | None = None,
        health_timeout_s: float = 1.0,
    ) -> None:
        if "{port}" not in engine_command:
            raise ConfigError("--engine-command must contain {port}")
        self._command = engine_command
        self._discovery = Path(discovery_file) if discovery_file else None
        self._ready_timeout_s = ready_timeout_s
        self._drain_s = drain_s
        self._kill_grace_s = kill_grace_s
        self._health_timeout_s = health_timeout_s
        self._own_workdir = workdir is None  # removed by close() unless an engine failed
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="shoal-autoscale-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._desired = 0
        self._engines: list[_Engine] = []  # starting and ready, oldest first
        self._draining: dict[int, asyncio.Task[None]] = {}  # port -> its retirement
        self._discarding: dict[int, asyncio.Task[None]] = {}  # port -> stop of a hung one
        self._published: list[str] | None = None
        self._num_failed = 0  # engines that died or never got ready (their logs are kept)
        self._failing_in_a_row = 0  # engines that failed before any got ready since
        self._restart_at = 0.0  # no replacement before this (monotonic): crash-loop backoff
        self._session: aiohttp.ClientSession | None = None
        if self._discovery is not None and not self._discovery.exists():
            try:  # the router's file discovery needs the file to exist when it starts
                write_discovery_file(self._discovery, [])
            except OSError as exc:
                raise ConfigError(f"--discovery-file {self._discovery}: {exc}") from None
            self._published = []

    # -- processes -----------------------------------------------------------------------

    def _start(self) -> _Engine:
        taken = {e.port for e in self._engines} | set(self._draining) | set(self._discarding)
        port = free_port(taken)
        argv = shlex.split(self._command.replace("{port}", str(port)))
        log_path = self.workdir / f"engine-{port}.log"
        try:
            with open(log_path, "ab") as out:
                process = subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=shoal_env(),
                    start_new_session=True,
                )
        except OSError as exc:
            raise ActuatorError(f"local target: cannot start {argv[0]!r}: {exc}") from None
        log.info("started engine on port %d (pid %d, log %s)", port, process.pid, log_path)
        return _Engine(port, process, log_path, time.monotonic())

    async def _stop(self, engine: _Engine) -> int:
        """SIGTERM to the engine's process group, SIGKILL after the grace; its exit code."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(engine.process.pid, signal.SIGTERM)
        try:
            return await asyncio.to_thread(engine.process.wait, self._kill_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("engine on port %d ignored SIGTERM; killing it", engine.port)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(engine.process.pid, signal.SIGKILL)
            return await asyncio.to_thread(engine.process.wait)

    async def _retire(self, engine: _Engine) -> None:
        try:
            await asyncio.sleep(self._drain_s)
        finally:
            code = await asyncio.shield(self._stop(engine))
            log.info("engine on port %d stopped after its drain (exit %d)", engine.port, code)
            self._draining.pop(engine.port, None)

    async def _healthy(self, engine: _Engine) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._health_timeout_s):
                async with self._session.get(engine.url + "/health") as reply:
                    return reply.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    # -- the Protocol --------------------------------------------------------------------

    async def _discard(self, engine: _Engine) -> None:
        try:
            code = await self._stop(engine)
            log.info("hung engine on port %d stopped (exit %d)", engine.port, code)
        finally:
            self._discarding.pop(engine.port, None)

    def _failed(self, engine: _Engine, now: float) -> None:
        self._engines.remove(engine)
        self._num_failed += 1
        if not engine.ready:
            self._failing_in_a_row += 1
            backoff_s = min(MAX_BACKOFF_S, 2.0 ** (self._failing_in_a_row - 1))
            self._restart_at = now + backoff_s

    async def state(self) -> ReplicaState:
        now = time.monotonic()
        for engine in list(self._engines):
            code = engine.process.poll()
            timed_out = not engine.ready and now - engine.started_s > self._ready_timeout_s
            if code is None and not timed_out:
                continue
            self._failed(engine, now)
            if code is None:
                log.warning(
                    "engine on port %d not healthy in %.0f s; replacing it (log %s)",
                    engine.port, self._ready_timeout_s, engine.log_path,
                )  # fmt: skip
                await self._stop(engine)
            else:
                # the leader is gone; children it left (vLLM's EngineCore) still hold the
                # port and memory: the group goes with it
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(engine.process.pid, signal.SIGKILL)
                log.warning(
                    "engine on port %d exited with %d; replacing it (log %s)",
                    engine.port, code, engine.log_path,
                )  # fmt: skip
        probed = list(self._engines)
        results = await asyncio.gather(*(self._healthy(e) for e in probed))
        for engine, healthy in zip(probed, results, strict=True):
            if healthy and not engine.ready:
                engine.ready = True
                self._failing_in_a_row = 0
                log.info(
                    "engine on port %d ready after %.1f s",
                    engine.port, time.monotonic() - engine.started_s,
                )  # fmt: skip
            elif engine.ready:
                engine.failed_probes = 0 if healthy else engine.failed_probes + 1
                if engine.failed_probes >= MAX_FAILED_PROBES:
                    log.warning(
                        "engine on port %d failed %d health checks in a row; replacing it "
                        "(log %s)", engine.port, engine.failed_probes, engine.log_path,
                    )  # fmt: skip
                    self._failed(engine, now)
                    self._discarding[engine.port] = asyncio.create_task(self._discard(engine))
        while len(self._engines) < self._desired and now >= self._restart_at:
            self._engines.append(self._start())
        ready = [e.url for e in self._engines if e.ready]
        self._publish(ready)
        return ReplicaState(
            spec=self._desired,
            ready=len(ready),
            pending=len(self._engines) - len(ready),
            endpoints=tuple(ready),
        )

    def _publish(self, urls: list[str]) -> None:
        if self._discovery is None or urls == self._published:
            return
        try:
            write_discovery_file(self._discovery, urls)
        except OSError as exc:
            raise ActuatorError(
                f"local target: cannot write the discovery file {self._discovery}: {exc}"
            ) from None
        self._published = list(urls)

    async def scale(self, desired: int) -> None:
        assert desired >= 0, f"scale to {desired} replicas"
        self._desired = desired
        while len(self._engines) < desired and time.monotonic() >= self._restart_at:
            self._engines.append(self._start())
        surplus = len(self._engines) - desired
        if surplus <= 0:
            return
        # Starting engines go first (newest first), then the newest ready ones.
        order = sorted(self._engines, key=lambda e: (e.ready, -e.started_s))
        leaving = order[:surplus]
        self._engines = [e for e in self._engines if e not in leaving]
        self._publish([e.url for e in self._engines if e.ready])  # out of the router first
        for engine in leaving:
            if engine.ready:
                log.info("draining engine on port %d for %.1f s", engine.port, self._drain_s)
                self._draining[engine.port] = asyncio.create_task(self._retire(engine))
            else:
                await self._stop(engine)

    async def close(self) -> None:
        """Stop every engine (draining ones at once) and remove them from the file."""
        engines, self._engines, self._desired = self._engines, [], 0
        with contextlib.suppress(ActuatorError):
            self._publish([])
        for task in list(self._draining.values()):
            task.cancel()
        await asyncio.gather(*self._draining.values(), return_exceptions=True)
        await asyncio.gather(*self._discarding.values(), return_exceptions=True)
        await asyncio.gather(*(self._stop(e) for e in engines))
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._own_workdir and self._num_failed == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        elif self._num_failed:
            log.warning("%d engine(s) failed; their logs: %s", self._num_failed, self.workdir)

    @property
    def num_draining(self) -> int:
        return len(self._draining)
