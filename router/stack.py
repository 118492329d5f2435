"""Processes started in stages and stopped in reverse: the supervisor behind ``shoal up``.

Invariant: every process this module started is either running and listed in
``Stack.running``, or has been waited for (its exit status collected); ``stop()`` leaves no
process group behind, within a bounded time (the longest stage's ``stop_grace_s`` per
stage, plus a short wait after SIGKILL).

A plan is a sequence of stages; each stage is one or more steps spawned together (so two
engines warm up in parallel) and then awaited in order. A step is either a ``Service``
(runs until stopped; ready when each of its probes holds: an HTTP ``GET`` answering 200,
a line in its log, a path that exists) or a ``Job`` (runs to completion; ready when it
exits 0). A step that exits early, or misses its ``ready_timeout_s``, raises
``StartFailed`` carrying its name, exit status and log tail; the caller then stops what is
already up (``Stack`` is a context manager that does so on any exception, Ctrl-C
included).

Choices:

- Every child starts in a session of its own (``start_new_session``) and is stopped by
  signalling its whole process group: a ``vllm serve`` forks an engine-core process that
  must get SIGTERM too, and must be *waited for*: it unlinks its shared memory
  (``/dev/shm/psm_*``, 240 MB each) a second or two after the API server exits, and a
  SIGKILL in that window leaks it (``tests/e2e/engines.py``). A terminal's Ctrl-C thus
  reaches only the supervisor, which stops the stages in reverse order (the router first,
  so no request is sent to an engine going away; the cache daemon last, so engines never
  lose it mid-request).
- On Linux each child also gets ``PR_SET_PDEATHSIG`` = SIGTERM, so a supervisor killed
  with SIGKILL does not leave its direct children running (grandchildren are theirs to
  stop).
- Time is injected (``clock``, ``sleep``) so the waiting logic can be driven by tests;
  HTTP probes use ``urllib`` (no event loop: the supervisor is a plain loop over a few
  processes).

Rejected: a thread per child (nothing here waits on more than one thing at a time that a
0.1 s poll cannot serve); asyncio subprocesses (the children outlive no loop, and
``preexec_fn`` is not available through them); killing with SIGKILL after a fixed short
delay (leaks vLLM's shared memory, see above).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from router.errors import RouterError

__all__ = [
    "Job",
    "RunningStep",
    "Service",
    "Stack",
    "StartFailed",
    "Step",
    "exit_text",
    "log_tail",
]

log = logging.getLogger("shoal." + __name__)

_POLL_S = 0.1
_KILL_WAIT_S = 5.0  # after SIGKILL, the kernel reaps within milliseconds; this is a bound
_PR_SET_PDEATHSIG = 1


class StartFailed(RouterError):
    """A step exited before it was ready, or was not ready in time (the message names it
    and carries its log tail)."""

    def __init__(self, name: str, reason: str, log_path: Path, tail: str) -> None:
        super().__init__(f"{name} {reason}; its log {log_path}, last lines:\n{tail}")
        self.name = name
        self.reason = reason
        self.log_path = log_path
        self.tail = tail


@dataclass(frozen=True, slots=True)
class Service:
    """A long-running process and how to tell that it is ready."""

    name: str  # "cache", "engine-0", "router": unique in a plan
    argv: tuple[str, ...]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)  # the whole environment
    cwd: Path | None = None
    address: str = ""  # what the table shows: a URL or socket
    detail: str = ""  # one more column of the table: stream, cpu, strategy ...
    ready_url: str = ""  # GET answers 200
    ready_log: str = ""  # this text appears in the log
    ready_path: Path | None = None  # this path exists (a socket)
    ready_timeout_s: float = 60.0
    stop_grace_s: float = 10.0  # SIGTERM to the group, then this long before SIGKILL


@dataclass(frozen=True, slots=True)
class Job:
    """A process that must run to completion (exit 0) before the next stage."""

    name: str
    argv: tuple[str, ...]
    log_path: Path
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ready_timeout_s: float = 120.0
    stop_grace_s: float = 5.0


Step = Service | Job


@dataclass
class RunningStep:
    """A step's process (owned by the ``Stack``)."""

    step: Step
    process: subprocess.Popen[bytes]
    started_at: float
    ready_after_s: float | None = None  # seconds from spawn to ready

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def pid(self) -> int:
        return self.process.pid


def exit_text(code: int) -> str:
    """'exited with status 3' or 'was killed by SIGKILL' for a ``Popen.returncode``."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a recycled id owned by someone else: not ours any more
        return False
    return True


class Stack:
    """Starts ``stages`` in order and stops them in reverse (module docstring).

    ``on_stage(steps)`` is called as a stage is spawned and ``on_ready(item)`` as each step
    becomes ready (progress output).
    """

    def __init__(
        self,
        stages: Sequence[Sequence[Step]],
        *,
        on_stage: Callable[[Sequence[Step]], None] | None = None,
        on_ready: Callable[[RunningStep], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        http_ok: Callable[[str], bool] = _http_ok,
    ) -> None:
        names = [step.name for stage in stages for step in stage]
        assert len(names) == len(set(names)), f"step names must be unique: {names}"
        self._stages = [tuple(stage) for stage in stages]
        self._on_stage = on_stage
        self._on_ready = on_ready
        self._clock = clock
        self._sleep = sleep
        self._http_ok = http_ok
        self._started: list[list[RunningStep]] = []  # per stage, services still running
        self.started_at = clock()

    # --- start ----------------------------------------------------------------------------

    def start(self) -> None:
        """Every stage, in order; raises ``StartFailed`` (what started stays running: call
        ``stop()``, or use the stack as a context manager)."""
        for stage in self._stages:
            running: list[RunningStep] = []
            self._started.append(running)  # before any wait: a Ctrl-C must find them
            if self._on_stage is not None:
                self._on_stage(stage)
            for step in stage:
                running.append(self._spawn(step))
            for item in list(running):
                self._wait_ready(item)
                if isinstance(item.step, Job):
                    running.remove(item)  # done: exited 0 and reaped

    def _spawn(self, step: Step) -> RunningStep:
        step.log_path.parent.mkdir(parents=True, exist_ok=True)
        if step.cwd is not None:
            step.cwd.mkdir(parents=True, exist_ok=True)
        with open(step.log_path, "ab") as log_file:
            try:
                process = subprocess.Popen(
                    list(step.argv),
                    env=dict(step.env) if step.env else None,
                    cwd=step.cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded parent
                )
            except OSError as exc:
                raise StartFailed(step.name, f"could not start ({exc})", step.log_path, "") from exc
        log.debug("started %s (pid %d): %s", step.name, process.pid, " ".join(step.argv))
        return RunningStep(step, process, self._clock())

    def _wait_ready(self, item: RunningStep) -> None:
        step = item.step
        deadline = item.started_at + step.ready_timeout_s
        while True:
            code = item.process.poll()
            if isinstance(step, Job):
                if code == 0:
                    break
                if code is not None:
                    self._fail(item, f"failed: it {exit_text(code)}")
            elif code is not None:
                self._fail(item, f"{exit_text(code)} before it was ready")
            elif self._service_ready(step):
                break
            if self._clock() >= deadline:
                self._fail(item, f"was not ready within {step.ready_timeout_s:.0f} s")
            self._sleep(_POLL_S)
        item.ready_after_s = self._clock() - item.started_at
        if self._on_ready is not None:
            self._on_ready(item)

    def _service_ready(self, step: Service) -> bool:
        if step.ready_path is not None and not step.ready_path.exists():
            return False
        if step.ready_log and step.ready_log not in log_tail(step.log_path, 10_000):
            return False
        return not step.ready_url or self._http_ok(step.ready_url)

    def _fail(self, item: RunningStep, reason: str) -> NoReturn:
        raise StartFailed(item.name, reason, item.step.log_path, log_tail(item.step.log_path))

    # --- run ------------------------------------------------------------------------------

    @property
    def running(self) -> list[RunningStep]:
        """Services started and not yet stopped, in start order."""
        return [item for stage in self._started for item in stage if isinstance(item.step, Service)]

    def find(self, name: str) -> RunningStep:
        for item in self.running:
            if item.name == name:
                return item
        raise KeyError(name)

    def exited(self) -> RunningStep | None:
        """The first service whose process has exited, if any (no waiting)."""
        for item in self.running:
            if item.process.poll() is not None:
                return item
        return None

    # --- stop -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every stage, the last started first; within a stage SIGTERM goes to every
        process group at once, then each is waited for (its ``stop_grace_s``) before a
        SIGKILL."""
        while self._started:
            stage = self._started.pop()
            for item in stage:
                self._signal(item, signal.SIGTERM)
            for item in stage:
                self._reap(item)

    @staticmethod
    def _signal(item: RunningStep, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(item.pid, signum)

    def _reap(self, item: RunningStep) -> None:
        deadline = self._clock() + item.step.stop_grace_s
        while self._clock() < deadline:
            # The leader first (reaping it keeps its id, = the group's, from being reused),
            # then whatever else the group holds (vLLM's engine core).
            if item.process.poll() is not None and not _group_alive(item.pid):
                return
            self._sleep(_POLL_S)
        log.warning("%s did not stop within %.0f s: killed", item.name, item.step.stop_grace_s)
        self._signal(item, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            item.process.wait(timeout=_KILL_WAIT_S)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
