"""``router.stack``: real processes started in stages and stopped in reverse, whole process
groups, never left behind."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from router.stack import Job, Service, Stack, StartFailed

# A service: says "ready", records its own stop in `order`, and (with a child) forks one
# that sleeps in the same process group.
SERVICE = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    name, order, child, ignore = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
    if child:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("child", sleeper.pid, flush=True)
    def stop(signum, frame):
        with open(order, "a") as f:
            f.write(name + "\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, signal.SIG_IGN if ignore else stop)
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
    """
)


def service(
    tmp_path: Path, name: str, *, child: bool = False, ignore_term: bool = False, **kw: object
) -> Service:
    argv = (sys.executable, "-c", SERVICE, name, str(tmp_path / "order"), str(int(child)),
            str(int(ignore_term)))  # fmt: skip
    return Service(name, argv, tmp_path / f"{name}.log", ready_log="ready", **kw)  # type: ignore[arg-type]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (not yet reaped by its parent) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def child_pid(log: Path) -> int:
    for line in log.read_text().splitlines():
        if line.startswith("child "):
            return int(line.split()[1])
    raise AssertionError(f"no child in {log.read_text()!r}")


def test_stages_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    ready: list[str] = []
    stages = [
        [service(tmp_path, "cache")],
        [service(tmp_path, "engine-0"), service(tmp_path, "engine-1")],
        [service(tmp_path, "router")],
    ]
    with Stack(stages, on_ready=lambda item: ready.append(item.name)) as stack:
        pids = [item.pid for item in stack.running]
        assert [item.name for item in stack.running] == ["cache", "engine-0", "engine-1", "router"]
        assert stack.exited() is None
    assert ready == ["cache", "engine-0", "engine-1", "router"]
    stopped = (tmp_path / "order").read_text().split()
    assert stopped[0] == "router" and stopped[-1] == "cache"
    assert sorted(stopped[1:3]) == ["engine-0", "engine-1"]
    assert all(gone(pid) for pid in pids)


def test_a_service_that_exits_before_ready_stops_the_others_and_names_itself(
    tmp_path: Path,
) -> None:
    broken = Service(
        "engine-0",
        (sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"),
        tmp_path / "engine-0.log",
        ready_url="http://127.0.0.1:9/health",
    )
    stack = Stack([[service(tmp_path, "cache")], [broken], [service(tmp_path, "router")]])
    with pytest.raises(StartFailed) as failed, stack:
        pass
    assert failed.value.name == "engine-0"
    assert "exited with status 3" in str(failed.value)
    assert "no model here" in failed.value.tail
    assert (tmp_path / "order").read_text().split() == ["cache"]  # stopped; router never ran
    assert not (tmp_path / "router.log").exists()
    assert stack.running == []


def test_a_service_not_ready_in_time_fails_with_its_log(tmp_path: Path) -> None:
    slow = Service(
        "engine-0",
        (sys.executable, "-c", "import time; print('loading'); time.sleep(600)"),
        tmp_path / "engine-0.log",
        ready_log="never printed",
        ready_timeout_s=1.0,
    )
    stack = Stack([[slow]])
    with pytest.raises(StartFailed, match="not ready within 1 s") as failed, stack:
        pass
    assert "loading" in failed.value.tail


def test_stopping_reaches_the_whole_process_group(tmp_path: Path) -> None:
    with Stack([[service(tmp_path, "engine-0", child=True)]]) as stack:
        leader = stack.find("engine-0").pid
        grandchild = child_pid(tmp_path / "engine-0.log")
        assert not gone(grandchild)
    assert gone(leader)
    deadline = time.monotonic() + 5  # init reaps the orphan
    while not gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(grandchild)


def test_a_process_ignoring_sigterm_is_killed_after_its_grace(tmp_path: Path) -> None:
    stubborn = service(tmp_path, "engine-0", ignore_term=True, stop_grace_s=1.0)
    began = time.monotonic()
    with Stack([[stubborn]]) as stack:
        pid = stack.find("engine-0").pid
        began = time.monotonic()
    assert gone(pid)
    assert 1.0 <= time.monotonic() - began < 8.0
    assert stack.running == []


def test_a_job_must_exit_zero_before_the_next_stage(tmp_path: Path) -> None:
    ok = Job("prefetch", (sys.executable, "-c", "print('staged')"), tmp_path / "ok.log")
    with Stack([[ok], [service(tmp_path, "engine-0")]]) as stack:
        assert [item.name for item in stack.running] == ["engine-0"]
    failing = Job("prefetch", (sys.executable, "-c", "raise SystemExit(7)"), tmp_path / "bad.log")
    stack = Stack([[service(tmp_path, "cache")], [failing], [service(tmp_path, "router")]])
    with pytest.raises(StartFailed, match="failed: it exited with status 7"), stack:
        pass
    assert not (tmp_path / "router.log").exists()


def test_interrupting_a_start_stops_what_is_already_up(tmp_path: Path) -> None:
    """Ctrl-C while an engine is still loading: what started is stopped, nothing leaks."""

    def interrupt_soon(stage: object) -> None:
        if any(step.name == "engine-0" for step in stage):  # type: ignore[attr-defined]
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()

    slow = Service(
        "engine-0",
        (
            sys.executable,
            "-c",
            "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)",
        ),
        tmp_path / "engine-0.log",
        ready_log="never",
    )
    stack = Stack([[service(tmp_path, "cache")], [slow]], on_stage=interrupt_soon)
    # A terminal's Ctrl-C: Python's own SIGINT handler, even where this run inherited SIGINT
    # ignored (a shell's background job starts Python with SIG_IGN, and then SIGINT is lost)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), stack:
            pass
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stack.running == []
    assert (tmp_path / "order").read_text().split() == ["cache"]
    slow_pid = int((tmp_path / "engine-0.log").read_text().split()[1])
    assert gone(slow_pid)
