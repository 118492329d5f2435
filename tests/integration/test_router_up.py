"""``shoal up --engines sim`` as a user runs it: a real subprocess that starts a cache daemon,
simulated engines and the router, prints what runs where, serves a completion through the
router, and leaves no process behind after Ctrl-C (or after a component fails to start)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ENV

pytest.importorskip("aiohttp")
pytest.importorskip("router.server")  # `shoal router serve`

SHOAL_UP = [sys.executable, "-m", "shoal", "up"]


def alive(pid: int) -> bool:
    """Running (a zombie awaiting its parent counts as stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def group_members(group: int) -> list[int]:
    """Processes whose process group is ``group`` (the engines' children included)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    members.append(int(entry.name))
    return members


def read_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The first line ``process`` prints on stdout, or '' if it exits or times out first."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            return process.stdout.readline()
        if process.poll() is not None:
            return ""
    return ""


@contextlib.contextmanager
def shoal_up(tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``shoal up ARGS``; whatever happens, it and every process it reported are gone after."""
    stderr = open(tmp_path / "up.stderr", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [*SHOAL_UP, *args], env=ENV, stdout=subprocess.PIPE, stderr=stderr, text=True
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for pid in reported_pids(tmp_path):
            for member in group_members(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGKILL)
        stderr.close()
        assert process.stdout is not None
        process.stdout.close()


def reported_pids(tmp_path: Path) -> list[int]:
    """Every pid the progress lines named ("cache ready (pid 123)")."""
    text = (tmp_path / "up.stderr").read_text()
    return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", text)]


def unique_workdir(tmp_path: Path) -> Path:
    """A workdir whose name (which names the daemon: /dev/shm/shoal-<name>.arena) no other
    test run on this machine uses at the same time."""
    return tmp_path / f"up-{uuid.uuid4().hex[:8]}"


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return reply.status, dict(reply.headers), json.loads(reply.read())


def test_shoal_up_with_simulated_engines_serves_through_the_router_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    workdir = unique_workdir(tmp_path)
    # least-request: this test is about the processes, not the default strategy's choices.
    with shoal_up(tmp_path, "--engines", "sim", "--port", "0", "--workdir", str(workdir),
                  "--strategy", "least-request", "--json") as process:  # fmt: skip
        line = read_line(process, timeout=90)
        assert line, (tmp_path / "up.stderr").read_text()
        described = json.loads(line)
        components = {c["component"]: c for c in described["components"]}
        assert list(components) == ["cache", "engine-0", "engine-1", "router"]
        pids = [c["pid"] for c in components.values()]
        assert all(alive(pid) for pid in pids)
        assert components["router"]["address"] == described["router"]
        for component in components.values():
            assert Path(component["log"]).is_file()

        status, headers, answer = post(
            described["router"] + "/v1/completions",
            {"model": described["model"], "prompt": "Hello, Shoal", "max_tokens": 4},
        )
        assert status == 200
        assert answer["usage"]["completion_tokens"] == 4
        engines = {components[f"engine-{i}"]["address"] for i in range(2)}
        assert headers.get("x-shoal-engine") in engines
        assert described["curl"].startswith(f"curl -sD - {described['router']}/v1/")

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0
        stopped = [pid for pid in pids if alive(pid) or group_members(pid)]
        assert stopped == [], f"left running: {stopped}"
        assert "stopped" in (tmp_path / "up.stderr").read_text()
        arena = Path("/dev/shm") / f"shoal-{workdir.name}.arena"
        assert not arena.exists()  # the daemon exited cleanly and removed it
        assert not arena.with_name(arena.name + ".lock").exists()  # nothing piles up


def test_a_component_that_fails_to_start_stops_the_others_with_its_log(tmp_path: Path) -> None:
    with shoal_up(tmp_path, "--engines", "sim:1", "--port", "0", "--workdir",
                  str(unique_workdir(tmp_path)), "--engine-args=--no-such-flag") as process:  # fmt: skip
        assert process.wait(timeout=60) == 1  # EXIT_FAILED
        assert process.stdout is not None
        assert process.stdout.read() == ""  # no table: nothing is up
    stderr = (tmp_path / "up.stderr").read_text()
    assert "engine-0 exited with status 2 before it was ready" in stderr
    assert "--no-such-flag" in stderr  # its log tail: argparse's complaint
    (cache_pid,) = reported_pids(tmp_path)
    assert not alive(cache_pid)


def test_missing_set_up_is_refused_before_anything_starts(tmp_path: Path) -> None:
    engine_python = tmp_path / "python"
    engine_python.touch()
    done = subprocess.run(
        [*SHOAL_UP, "--model", str(tmp_path / "no-model"), "--port", "0", "--engine-python",
         str(engine_python), "--no-loader"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "no config.json" in done.stderr
    assert "pid" not in done.stderr


def test_a_component_dying_while_up_stops_the_rest_and_exits_1(tmp_path: Path) -> None:
    with shoal_up(tmp_path, "--engines", "sim", "--port", "0", "--workdir",
                  str(unique_workdir(tmp_path)), "--strategy", "least-request", "--json") as process:  # fmt: skip
        line = read_line(process, timeout=90)
        assert line, (tmp_path / "up.stderr").read_text()
        components = {c["component"]: c["pid"] for c in json.loads(line)["components"]}
        os.kill(components["engine-1"], signal.SIGKILL)
        assert process.wait(timeout=60) == 1
        stderr = (tmp_path / "up.stderr").read_text()
        assert "engine-1 was killed by SIGKILL" in stderr
        assert [pid for pid in components.values() if alive(pid)] == []
