"""Scale from zero end to end with simulated engines (issue 13): a router with no engine,
the real controller (``shoal autoscale run --target local --min-replicas 0``) and its
local actuator starting ``shoal sim engine`` processes. The first request is held by the
router, which wakes the controller; the controller starts an engine and lists it in the
discovery file; the router routes the held request to it: 200. Then ``shoal up
--autoscale`` wires the same pieces itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.server import running_router
from tests.integration.conftest import ENV, free_port, wait_until

MODEL = "sim-7b"
POLICY = "kpa"
ROUTER_FAST = {"health_interval_s": 0.2, "metrics_interval_s": 0.2, "models_interval_s": 0.5,
               "discovery_interval_s": 0.2}  # fmt: skip


@pytest.fixture(autouse=True)
def _controller_merged() -> None:
    """The controller and the policy are other parts of issue 13: skip until merged."""
    pytest.importorskip("control.autoscale.controller")
    pytest.importorskip("control.autoscale.actuators.local")
    import control.autoscale.policies  # noqa: F401  (registers the policies that landed)
    from control.autoscale.policies.base import POLICIES

    if POLICY not in POLICIES:
        pytest.skip(f"policy {POLICY} not merged yet")


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal", *args]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


@contextlib.contextmanager
def running_autoscaler(tmp_path: Path, port: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``shoal autoscale run`` in its own session, its log in ``tmp_path``; stopped with
    SIGTERM (which stops its engines) and, after a grace, its whole group killed."""
    log_path = tmp_path / "autoscaler.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            shoal("autoscale", "run", "--host", "127.0.0.1", "--port", str(port), *args),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ENV,
            start_new_session=True,
        )  # fmt: skip
    try:

        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                get_json(f"http://127.0.0.1:{port}/status")
            except OSError:
                return False
            return True

        assert wait_until(ready, timeout=30, interval=0.1), log_path.read_text()
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def listed_urls(listing: Path) -> list[str]:
    return [entry["url"] for entry in json.loads(listing.read_text() or "[]")]


async def post(url: str, body: dict[str, Any], limit_s: float = 90.0) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=limit_s)) as reply,
    ):
        return reply.status, reply.headers.get("x-shoal-engine", ""), await reply.read()


def test_the_first_request_waits_for_the_engine_the_autoscaler_starts(tmp_path: Path) -> None:
    listing = tmp_path / "engines.json"
    listing.write_text("[]")
    autoscaler_port = free_port()
    engine = shoal("sim", "engine", "--host", "127.0.0.1", "--port", "{port}",
                   "--time-scale", "10")  # fmt: skip
    with running_router(
        free_port(), discovery="file", discovery_file=listing,
        autoscaler_url=f"http://127.0.0.1:{autoscaler_port}", strategy="least-request",
        **ROUTER_FAST,
    ) as router:  # fmt: skip
        with running_autoscaler(
            tmp_path, autoscaler_port, "--target", "local", "--policy", POLICY,
            "--engine-command", " ".join(engine), "--discovery-file", str(listing),
            "--min-replicas", "0", "--max-replicas", "1", "--model", MODEL,
            "--router-url", router.url, "--interval-s", "0.5", "--drain-s", "0.5",
        ) as autoscaler:  # fmt: skip
            status_url = f"http://127.0.0.1:{autoscaler_port}/status"
            assert get_json(status_url)["replicas"]["spec"] == 0  # scaled to zero: no engine
            assert listed_urls(listing) == []

            body = {"model": MODEL, "prompt": "hello from zero", "max_tokens": 4}
            status, engine_url, answer = asyncio.run(post(router.url + "/v1/completions", body))
            assert status == 200, (answer, router.log())
            assert json.loads(answer)["choices"]
            assert engine_url in listed_urls(listing)  # the engine the autoscaler started
            replicas = get_json(status_url)["replicas"]
            assert replicas["ready"] == 1, replicas
            held = [line for line in router.log().splitlines() if "held for" in line]
            assert held, router.log()  # the request was held, then routed on the wake-up
        assert autoscaler.returncode is not None
        assert not _group_alive(autoscaler.pid)
        port = int(engine_url.rpartition(":")[2])
        assert wait_until(lambda: _refused(port), timeout=10)  # stopped with the autoscaler


def _refused(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
    except OSError:
        return True
    return False


def test_shoal_up_autoscale_starts_from_zero_serves_and_stops_everything(tmp_path: Path) -> None:
    workdir = tmp_path / "up"
    process = subprocess.Popen(
        shoal("up", "--engines", "sim:2", "--autoscale", POLICY, "--min-replicas", "0",
              "--port", "0", "--workdir", str(workdir), "--json",
              "--autoscale-args", "--interval-s 0.5 --drain-s 0.5"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line, process.stderr.read() if process.stderr else ""
        described = json.loads(line)
        names = [c["component"] for c in described["components"]]
        assert names == ["cache", "autoscaler", "router"]
        assert described["autoscaler"] == next(
            c["address"] for c in described["components"] if c["component"] == "autoscaler"
        )
        body = {"model": described["model"], "prompt": "hello", "max_tokens": 4}
        status, engine_url, answer = asyncio.run(
            post(described["router"] + "/v1/completions", body)
        )
        assert status == 200, answer
        assert engine_url in listed_urls(workdir / "engines.json")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise
        finally:
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
    assert code == 0
    port = int(engine_url.rpartition(":")[2])
    assert wait_until(lambda: _refused(port), timeout=10)  # its engine stopped with it
