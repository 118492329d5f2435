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
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

__all__ = ["Done", "InlineIo", "IoWorkers", "Job", "QueuedIo", "ThreadIo"]

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
    """A pool of ``num_threads`` workers; completions wait for ``run_completions``."""

    def __init__(self, num_threads: int = 4) -> None:
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="shoal-io")
        self._finished: queue.SimpleQueue[tuple[Done, Exception | None]] = queue.SimpleQueue()
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending = 0

    @property
    def num_pending(self) -> int:
        return self._pending

    def fileno(self) -> int:
        """Readable when completions wait: register it in the loop's poller."""
        return self._read_fd

    def submit(self, job: Job, done: Done) -> None:
        self._pending += 1
        self._pool.submit(self._work, job, done)

    def _work(self, job: Job, done: Done) -> None:
        self._finished.put((done, _run(job)))
        with contextlib.suppress(BlockingIOError):  # a full pipe already wakes the loop
            os.write(self._write_fd, b"\0")

    def run_completions(self) -> int:
        """Call ``done`` of every finished job (on the calling, i.e. loop, thread)."""
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
            done(error)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.run_completions()
        os.close(self._read_fd)
        os.close(self._write_fd)
