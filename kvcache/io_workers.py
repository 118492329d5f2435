"""Where the store's slow byte moves run: off the daemon's request loop.

A move to or from a file tier (DRAM -> SSD demotion, an SSD block promoted for a read)
takes disk latency; on the loop it would stall every engine on the node. The store hands
such a move to ``IoWorkers`` as two callables: ``job`` (the bytes: runs on a worker, must
touch only the slots the store set aside for it) and ``done(error)`` (the metadata: runs
on the loop thread, like every other store call, so the store stays single threaded).

Three implementations of one Protocol (STYLE 8):

``ThreadIo``  a thread pool; finished jobs are queued and a pipe turns readable, which
              the daemon's poller watches (``fileno``) and answers with ``run_completions``.
``InlineIo``  runs ``job`` and ``done`` at once, inside ``submit``: the synchronous store
              (unit tests, tools, a daemon without file tiers).
``QueuedIo``  holds jobs until the test runs them (``run_next``): a slow disk on demand.

Invariant: every submitted job gets exactly one ``done`` call, with the exception the
job raised (``None`` on success); a job's exception never escapes into a worker thread.
The one exception: ``ThreadIo.close`` abandons a job still running after its timeout
(a hung disk must not keep a stopping daemon alive). A job submitted after ``close``
or not started by then gets ``done(OSError(ESHUTDOWN))`` without running.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Done", "InlineIo", "IoWorkers", "Job", "QueuedIo", "ThreadIo"]

log = logging.getLogger("shoal." + __name__)

Job = Callable[[], None]
Done = Callable[[Exception | None], None]


class IoWorkers(Protocol):
    def submit(self, job: Job, done: Done) -> None: ...

    @property
    def num_pending(self) -> int: ...

    def close(self) -> None: ...


def _run(job: Job) -> Exception | None:
    try:
        job()
    except Exception as exc:  # handed to done() on the loop thread, which decides
        return exc
    return None


class InlineIo:
    """Runs each job, then its ``done``, inside ``submit``."""

    num_pending = 0

    def submit(self, job: Job, done: Done) -> None:
        done(_run(job))

    def close(self) -> None:
        pass


class QueuedIo:
    """Jobs wait until ``run_next``/``run_all``; ``done`` runs right after its job."""

    def __init__(self) -> None:
        self._jobs: collections.deque[tuple[Job, Done]] = collections.deque()

    @property
    def num_pending(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job, done: Done) -> None:
        self._jobs.append((job, done))

    def run_next(self) -> None:
        job, done = self._jobs.popleft()
        done(_run(job))

    def run_all(self) -> None:
        while self._jobs:
            self.run_next()

    def close(self) -> None:
        self.run_all()


class ThreadIo:
    """``num_threads`` daemon threads; completions wait for ``run_completions``.

    Own threads rather than a ``ThreadPoolExecutor``: the executor's threads are joined
    at interpreter exit, so one job hung on a dead disk would keep a stopping daemon
    alive forever. ``close`` waits at most ``close_timeout_s`` for the jobs running;
    jobs not started by then are answered with ``ESHUTDOWN``, and a job still hung is
    abandoned (its ``done`` never runs: the process is exiting). A ``submit`` after
    ``close`` answers ``done`` at once with ``ESHUTDOWN``, as an ``OSError`` the store
    counts as an I/O error.
    """

    def __init__(self, num_threads: int = 4, *, close_timeout_s: float = 5.0) -> None:
        self._jobs: queue.SimpleQueue[tuple[Job, Done] | None] = queue.SimpleQueue()
        self._finished: queue.SimpleQueue[tuple[Done, Exception | None]] = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pipe_lock = threading.Lock()  # a late worker must not write to a closed fd
        self._pending = 0
        self._closed = False
        self._close_timeout_s = close_timeout_s
        self.num_failed_completions = 0  # a ``done`` that raised (logged; the rest ran)
        self._threads = [
            threading.Thread(target=self._worker, name=f"shoal-io-{n}", daemon=True)
            for n in range(num_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def num_pending(self) -> int:
        return self._pending

    def fileno(self) -> int:
        """Readable when completions wait: register it in the loop's poller."""
        return self._read_fd

    def submit(self, job: Job, done: Done) -> None:
        if self._closed:
            done(_closed_error())
            return
        self._pending += 1
        self._jobs.put((job, done))

    def _worker(self) -> None:
        while (item := self._jobs.get()) is not None:
            job, done = item
            self._finish(done, _closed_error() if self._closed else _run(job))

    def _finish(self, done: Done, error: Exception | None) -> None:
        self._finished.put((done, error))
        with self._pipe_lock:
            if self._write_fd >= 0:
                with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
                    os.write(self._write_fd, b"\0")

    def run_completions(self) -> int:
        """Call ``done`` of every finished job (on the calling, i.e. loop, thread).

        A ``done`` that raises is logged and counted; the others still run (one bad
        completion must neither kill the loop nor strand the readers of other moves).
        """
        if self._read_fd >= 0:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read_fd, 4096):
                    pass
        ran = 0
        while True:
            try:
                done, error = self._finished.get_nowait()
            except queue.Empty:
                return ran
            self._pending -= 1
            ran += 1
            try:
                done(error)
            except Exception:  # logged and counted; the loop and the other moves go on
                self.num_failed_completions += 1
                log.exception("an I/O completion failed")

    def close(self) -> None:
        """Stop taking jobs, wait up to ``close_timeout_s`` for those running, run the
        completions; idempotent."""
        if self._closed:
            return
        self._closed = True
        while True:  # jobs not started yet: answered, not run
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._finish(item[1], _closed_error())
        for _ in self._threads:
            self._jobs.put(None)
        deadline = time.monotonic() + self._close_timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        hung = sum(thread.is_alive() for thread in self._threads)
        self.run_completions()
        if hung:
            log.warning(
                "I/O workers still busy at close: abandoned",
                extra={"threads": hung, "jobs": self._pending, "timeout_s": self._close_timeout_s},
            )
        with self._pipe_lock:
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1


def _closed_error() -> OSError:
    return OSError(errno.ESHUTDOWN, "the I/O workers are closed (the daemon is stopping)")
