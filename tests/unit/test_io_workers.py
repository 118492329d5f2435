"""``ThreadIo``: a failing completion, a hung disk at close, and a submit after close.

Each would otherwise reach the daemon's loop: an exception out of ``run_completions``
ends the loop (the daemon dies); a job hung in a read kept ``close`` (SIGTERM) waiting
forever; a completion run by ``close`` that submits more work hit a shut-down pool.
"""

from __future__ import annotations

import errno
import select
import threading
import time

import pytest

from kvcache.io_workers import Done, ThreadIo


def succeed() -> None:
    pass


def fail() -> None:
    raise ZeroDivisionError("a job that fails")


def wait_for_completions(io: ThreadIo, count: int, timeout: float = 5.0) -> int:
    """Run completions as the daemon's loop does (poll the fd, then run) until ``count``."""
    ran, deadline = 0, time.monotonic() + timeout
    poller = select.poll()
    poller.register(io.fileno(), select.POLLIN)
    while ran < count and time.monotonic() < deadline:
        poller.poll(100)
        ran += io.run_completions()
    return ran


def test_a_completion_that_raises_is_counted_and_the_others_still_run() -> None:
    io = ThreadIo(2)
    try:
        called: list[int] = []

        def done(n: int) -> Done:
            def finish(error: Exception | None) -> None:
                called.append(n)
                if n == 1:
                    raise RuntimeError("a bug in a completion")

            return finish

        for n in range(3):
            io.submit(lambda: None, done(n))
        assert wait_for_completions(io, 3) == 3  # no exception reached the caller
        assert sorted(called) == [0, 1, 2]
        assert io.num_failed_completions == 1
        assert io.num_pending == 0
    finally:
        io.close()


def test_close_gives_up_on_a_hung_job_after_its_timeout_and_answers_the_queued_ones() -> None:
    io = ThreadIo(1, close_timeout_s=0.3)
    unblock = threading.Event()
    started = threading.Event()
    answers: list[Exception | None] = []

    def hung() -> None:
        started.set()
        unblock.wait(30)

    io.submit(hung, answers.append)
    assert started.wait(5)
    io.submit(lambda: None, answers.append)  # queued behind the hung one: never started
    began = time.monotonic()
    io.close()
    try:
        assert time.monotonic() - began < 5, "close waited for the hung job"
        assert len(answers) == 1, "the queued job was answered, the hung one abandoned"
        assert isinstance(answers[0], OSError) and answers[0].errno == errno.ESHUTDOWN
    finally:
        unblock.set()


def test_a_completion_run_by_close_may_submit_and_gets_a_clean_error() -> None:
    io = ThreadIo(1)
    late: list[Exception | None] = []

    def done(error: Exception | None) -> None:
        io.submit(lambda: None, late.append)  # e.g. a parked get's prepare() at close

    io.submit(lambda: None, done)
    io.close()  # runs the completion, which submits: answered at once, no RuntimeError
    assert len(late) == 1
    assert isinstance(late[0], OSError) and late[0].errno == errno.ESHUTDOWN
    io.close()  # idempotent


def test_a_submit_after_close_answers_without_running_the_job() -> None:
    io = ThreadIo(1)
    io.close()
    ran: list[bool] = []
    answers: list[Exception | None] = []
    io.submit(lambda: ran.append(True), answers.append)
    assert ran == []
    assert len(answers) == 1 and isinstance(answers[0], OSError)
    assert io.num_pending == 0


@pytest.mark.parametrize("num_jobs", [1, 50])
def test_every_job_gets_exactly_one_done(num_jobs: int) -> None:
    io = ThreadIo(4)
    answers: list[Exception | None] = []
    try:
        for n in range(num_jobs):
            io.submit(succeed if n % 2 else fail, answers.append)
        assert wait_for_completions(io, num_jobs) == num_jobs
    finally:
        io.close()
    assert len(answers) == num_jobs
    assert sum(isinstance(a, ZeroDivisionError) for a in answers) == (num_jobs + 1) // 2
