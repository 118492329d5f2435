"""``shoal placement run`` as a real process against a real router and two local pools.

The loop end to end: simulated engines with two step profiles stand for two GPU types
(``A10G``: cheap, only short answers within the SLO; ``A100``: dearer, serves long ones);
clients send short requests, then long ones, through the router; the router's rolling
request sizes move the plan from A10G to A100, the pools start and stop engines
(published with their ``gpu_type`` in the router's discovery file), ``GET /v1/plan``,
``/status``, ``/metrics`` and ``shoal placement status`` show it, and the router's ``slo``
strategy, polling that plan (``--placement-url``), sends the long cell to the A100. Also: a dry run serves a
plan and starts nothing; listening beyond loopback needs a token.

Short intervals and time-scaled engines keep it within about a minute: plans every 0.5 s
over a 20 s window (the router's slots are 10 s), a 2 s scale-down delay.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.server import running_router
from sim.profile import DEFAULT_PROFILE
from tests.integration.conftest import ENV, free_port

pytestmark = pytest.mark.integration

OUT_TICKS = [16, 256]  # completion tokens: short answers (<= 16) and long ones
IN_TICKS = [4096]  # every prompt here is in the one input cell
SHORT_TOKENS = 8
LONG_TOKENS = 64


def profile(gpu: str, cost: float, tputs: list[list[float]]) -> dict[str, Any]:
    return {
        "gpu": gpu,
        "cost": cost,
        "tputs": tputs,
        "indexes": [OUT_TICKS, IN_TICKS],
        "slos": {"e2e": 2.0, "percentile": 99},
        "created": 0,
    }


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal", *args]


def fetch(port: int, path: str, token: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            body = reply.read()
            status = reply.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    return status, (body.decode() if path == "/metrics" else json.loads(body))


@contextmanager
def planner(args: list[str], port: int, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``shoal placement run`` until its /metrics answers; SIGTERM (then kill) on exit."""
    log = open(log_path, "w")  # noqa: SIM115 (closed in finally)
    process = subprocess.Popen(
        shoal("placement", "run", "--port", str(port), *args),
        stdout=log, stderr=subprocess.STDOUT, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"no /metrics in 30 s:\n{log_path.read_text()}"
            try:
                fetch(port, "/metrics")
                break
            except OSError:
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def listed(path: Path) -> list[dict[str, str]]:
    try:
        entries: list[dict[str, str]] = json.loads(path.read_text())
        return entries
    except (OSError, ValueError):
        return []


def count_type(path: Path, gpu: str) -> int:
    return sum(1 for entry in listed(path) if entry.get("gpu_type") == gpu)


async def until(check: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}\n{log.read_text()[-4000:]}")
        await asyncio.sleep(0.2)


async def traffic(
    url: str, max_tokens: int, rate: float, stop: asyncio.Event, statuses: list[int]
) -> None:
    """Requests of ``max_tokens`` at ``rate`` per second (open loop) until ``stop``."""

    async def one(session: aiohttp.ClientSession) -> None:
        body = {"model": "sim-7b", "prompt": "plan the fleet " * 8, "max_tokens": max_tokens}
        try:
            async with session.post(url + "/v1/completions", json=body) as reply:
                await reply.read()
                statuses.append(reply.status)
        except aiohttp.ClientError:
            statuses.append(0)

    async with aiohttp.ClientSession() as session:
        pending: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            task = asyncio.create_task(one(session))
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(1.0 / rate)
        await asyncio.gather(*pending)


def test_short_then_long_requests_move_the_plan_and_the_engines(tmp_path: Path) -> None:
    small, big = tmp_path / "a10g.json", tmp_path / "a100.json"
    small.write_text(json.dumps(profile("A10G", 1.0, [[3.0], [0.0]])))
    big.write_text(json.dumps(profile("A100", 4.0, [[6.0], [4.0]])))
    DEFAULT_PROFILE.scaled(2.0).save(tmp_path / "step-a10g.json")  # a slower GPU
    DEFAULT_PROFILE.save(tmp_path / "step-a100.json")
    engine = f"{sys.executable} -m shoal sim engine --port {{port}} --time-scale 20 --profile"
    discovery = tmp_path / "engines.json"
    discovery.write_text("[]")
    port = free_port()
    log = tmp_path / "placement.log"
    with running_router(
        free_port(),
        wait_healthy=False,
        discovery="file",
        discovery_file=discovery,
        discovery_interval_s=0.25,
        health_interval_s=0.25,
        strategy="slo",  # following the plan this planner serves
        placement_url=f"http://127.0.0.1:{port}",
        placement_interval_s=0.5,
    ) as router, planner(
        [
            "--router-url", router.url, "--model", "sim-7b",
            "--profile", str(small), "--profile", str(big),
            "--pool", "A10G=local", "--pool", "A100=local",
            "--pool-engine-command", f"A10G={engine} {tmp_path / 'step-a10g.json'}",
            "--pool-engine-command", f"A100={engine} {tmp_path / 'step-a100.json'}",
            "--discovery-file", str(discovery), "--min-replicas", "A10G=1",
            "--interval-s", "0.5", "--pool-interval-s", "0.25", "--window-s", "20",
            "--headroom", "1.0", "--scale-down-delay-s", "2", "--drain-s", "0.5",
            "--engine-stop-grace-s", "5", "--engine-ready-timeout-s", "30",
        ],
        port,
        log,
    ):  # fmt: skip
        statuses: list[int] = []
        seen_a10g: list[int] = []

        def plan() -> dict[str, Any]:
            status, body = fetch(port, "/v1/plan")
            return body if status == 200 else {}

        def a10g_engines() -> int:
            seen_a10g.append(count_type(discovery, "A10G"))
            return seen_a10g[-1]

        async def main() -> None:
            # An empty window: the minimum, one A10G engine, published with its type.
            await until(lambda: a10g_engines() == 1, 30, "the minimum A10G engine", log)
            assert plan()["status"] == "empty"
            # Short answers at 5/s: 2 A10G (3/s each) at $2 beat one A100 at $4 for any
            # measured rate in (3, 6] (the window's first seconds measure less: they
            # include the idle time before the traffic).
            stop = asyncio.Event()
            short = asyncio.create_task(traffic(router.url, SHORT_TOKENS, 5.0, stop, statuses))
            await until(
                lambda: a10g_engines() == 2 and plan().get("gpus") == {"A100": 0, "A10G": 2},
                30,
                "two A10G engines for short traffic",
                log,
            )
            body = plan()
            assert body["assignment"]["A10G"][0] == [1.0]
            assert body["indexes"] == [OUT_TICKS, IN_TICKS] and body["model"] == "sim-7b"
            stop.set()
            await short
            # Long answers at 2/s: only the A100 serves them; the A10G pool falls back to
            # its minimum once the short requests left the window and the delay passed.
            stop = asyncio.Event()
            long = asyncio.create_task(traffic(router.url, LONG_TOKENS, 2.0, stop, statuses))
            try:
                await until(lambda: count_type(discovery, "A100") >= 1, 30, "an A100 engine", log)
                await until(
                    lambda: plan().get("gpus") == {"A100": 1, "A10G": 1} and a10g_engines() == 1,
                    40,
                    "the A10G pool back to its minimum",
                    log,
                )
            finally:
                stop.set()
                await long
            body = plan()
            assert body["assignment"]["A100"][1] == [1.0]  # the long cell goes to the A100

        asyncio.run(main())
        # The router follows the plan: the long cell is the A100's alone.
        (a100,) = [e["url"] for e in listed(discovery) if e["gpu_type"] == "A100"]
        long_body = {"model": "sim-7b", "prompt": "plan the fleet " * 8, "max_tokens": LONG_TOKENS}
        served_by = []
        for _ in range(8):
            code, headers, answer = router.request("POST", "/v1/completions", long_body)
            assert code == 200, answer
            served_by.append(headers["x-shoal-engine"])
        assert served_by == [a100] * 8
        assert statuses and set(statuses) == {200}, f"failed requests: {statuses}"
        assert max(seen_a10g) == 2
        status = fetch(port, "/status")[1]
        assert status["pools"]["A100"]["ready"] == 1 and status["pools"]["A10G"]["target"] == 1
        metrics = fetch(port, "/metrics")[1]
        assert 'shoal_placement_target_replicas{gpu_type="A100"} 1.0' in metrics
        assert "shoal_placement_plan_cost 5.0" in metrics
        shown = subprocess.run(
            shoal("placement", "status", "--url", f"http://127.0.0.1:{port}"),
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "A100" in shown.stdout and "A10G" in shown.stdout
    assert listed(discovery) == []  # the planner unpublished its engines on the way out


def test_a_dry_run_serves_a_plan_behind_a_token_and_starts_nothing(tmp_path: Path) -> None:
    small, big = tmp_path / "a10g.json", tmp_path / "a100.json"
    small.write_text(json.dumps(profile("A10G", 1.0, [[3.0], [0.0]])))
    big.write_text(json.dumps(profile("A100", 4.0, [[6.0], [4.0]])))
    (tmp_path / "token").write_text("s3cret\n")
    port = free_port()
    log = tmp_path / "placement.log"
    nowhere = f"http://127.0.0.1:{free_port()}"  # an engine that is not there: no traffic
    with running_router(free_port(), engines=[nowhere], wait_healthy=False) as router, planner(
        [
            "--router-url", router.url, "--profile", str(small), "--profile", str(big),
            "--dry-run", "--interval-s", "0.5", "--window-s", "20",
            "--auth-token-file", str(tmp_path / "token"),
        ],
        port,
        log,
    ):  # fmt: skip
        deadline = time.monotonic() + 20
        while fetch(port, "/v1/plan", "s3cret")[0] == 404:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        body = fetch(port, "/v1/plan", "s3cret")[1]
        assert (body["status"], body["gpus"]) == ("empty", {"A100": 0, "A10G": 0})
        assert fetch(port, "/v1/plan")[0] == 401
        assert fetch(port, "/status", "wrong")[0] == 401
        status = fetch(port, "/status", "s3cret")[1]
        assert status["dry_run"] is True
        assert status["pools"]["A10G"] == {"target": 0, "spec": 0, "ready": 0, "pending": 0}
        assert fetch(port, "/metrics")[0] == 200  # open for Prometheus
        wake = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/wake", data=b'{"model": "m"}', method="POST"
        )
        try:
            urllib.request.urlopen(wake, timeout=5).close()
            code = 202
        except urllib.error.HTTPError as exc:
            code = exc.code
            exc.close()
        assert code == 401  # a wake starts engines: the token rule holds for it too


def test_listening_beyond_loopback_needs_a_token_or_an_explicit_flag(tmp_path: Path) -> None:
    done = subprocess.run(
        shoal("placement", "run", "--host", "0.0.0.0", "--profile", "x.json", "--dry-run"),
        capture_output=True, text=True, env=ENV, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--auth-token-file" in done.stderr


def test_a_held_request_wakes_the_planner_and_an_engine_starts_from_zero(tmp_path: Path) -> None:
    """Review finding 2: at zero replicas no request finishes and the window stays empty;
    the router (``--autoscaler-url`` = the planner) holds the request and posts a wake,
    the planner starts the cheapest type serving the smallest cell, the request goes on."""
    small, big = tmp_path / "a10g.json", tmp_path / "a100.json"
    small.write_text(json.dumps(profile("A10G", 1.0, [[3.0], [0.0]])))
    big.write_text(json.dumps(profile("A100", 4.0, [[6.0], [4.0]])))
    engine = f"{sys.executable} -m shoal sim engine --port {{port}} --time-scale 20"
    discovery = tmp_path / "engines.json"
    discovery.write_text("[]")
    port = free_port()
    log = tmp_path / "placement.log"
    with running_router(
        free_port(), wait_healthy=False, discovery="file", discovery_file=discovery,
        discovery_interval_s=0.25, health_interval_s=0.25, models_interval_s=0.5,
        strategy="least-request", autoscaler_url=f"http://127.0.0.1:{port}",
    ) as router, planner(
        [
            "--router-url", router.url, "--model", "sim-7b",
            "--profile", str(small), "--profile", str(big),
            "--pool", "A10G=local", "--pool", "A100=local",
            "--pool-engine-command", f"A10G={engine}", "--pool-engine-command", f"A100={engine}",
            "--discovery-file", str(discovery), "--interval-s", "0.5",
            "--pool-interval-s", "0.25", "--window-s", "20", "--drain-s", "0.5",
            "--engine-stop-grace-s", "5", "--engine-ready-timeout-s", "30",
        ],
        port,
        log,
    ):  # fmt: skip
        deadline = time.monotonic() + 20
        while fetch(port, "/v1/plan")[0] == 404:  # the first round: empty, zero engines
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert fetch(port, "/v1/plan")[1]["gpus"] == {"A100": 0, "A10G": 0}
        assert listed(discovery) == []
        body = {"model": "sim-7b", "prompt": "hello from zero", "max_tokens": 4}
        code, _, answer = router.request("POST", "/v1/completions", body, timeout=60.0)
        assert code == 200, (answer, router.log()[-3000:], log.read_text()[-3000:])
        assert [e["gpu_type"] for e in listed(discovery)] == ["A10G"]
        metrics = fetch(port, "/metrics")[1]
        assert 'shoal_placement_wakes_total{result="scaled"} 1.0' in metrics
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/wake", data=b'{"model": "another"}', method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as reply:
                code = reply.status
        except urllib.error.HTTPError as exc:
            code = exc.code
            exc.close()
        assert code == 404  # --model sim-7b: another model's wake scales nothing
