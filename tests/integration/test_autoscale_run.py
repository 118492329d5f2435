"""``shoal autoscale run`` and ``status`` as real processes: a dry run with the local target
prints decisions and starts nothing; the HTTP endpoint (/status, /metrics, /v1/wake); a wake
scales a memory target from zero; bad flags exit 2, an unreachable controller exits 3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ENV, free_port

pytestmark = pytest.mark.integration

POLICY = "kpa"


def shoal(*args: str) -> list[str]:
    return [sys.executable, "-m", "shoal", *args]


@contextmanager
def running(args: list[str], port: int, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """The controller with stdout piped, stderr to a log; stopped (SIGTERM) on exit."""
    log = open(tmp_path / "autoscale.log", "w")  # noqa: SIM115 (closed in finally)
    process = subprocess.Popen(
        shoal("autoscale", "run", "--port", str(port), *args),
        stdout=subprocess.PIPE, stderr=log, text=True, env=ENV,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "autoscale.log").read_text()
            try:
                get(port, "/metrics")  # open even when a token guards /status
                break
            except OSError:
                time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
        log.close()


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        body = reply.read()
    return json.loads(body) if path == "/status" else body.decode()


def post(port: int, path: str, body: dict[str, Any], token: str = "") -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(), method="POST"
    )
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dry_run_with_the_local_target_prints_decisions_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    discovery = tmp_path / "engines.json"
    engine = f"{sys.executable} -m shoal sim engine --port {{port}}"
    args = [
        "--target", "local", "--dry-run", "--policy", POLICY, "--engine-command", engine,
        "--discovery-file", str(discovery), "--interval-s", "0.2",
        "--metrics", "requests_waiting:4", "--min-replicas", "0", "--max-replicas", "3",
    ]  # fmt: skip
    with running(args, port, tmp_path) as process:
        assert process.stdout is not None
        lines = [json.loads(process.stdout.readline()) for _ in range(3)]
        status = get(port, "/status")
        metrics = get(port, "/metrics")
        code, woke = post(port, "/v1/wake", {"model": "sim-7b"})
        table = subprocess.run(
            shoal("autoscale", "status", "--url", f"http://127.0.0.1:{port}"),
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
        as_json = subprocess.run(
            shoal("autoscale", "status", "--url", f"http://127.0.0.1:{port}", "--json"),
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
    assert process.returncode == 0  # SIGTERM is a clean stop
    for line in lines:
        assert line["dry_run"] is True and line["scaled"] is False
        assert {"desired", "recommendation", "per_metric", "panic", "bounds"} <= set(line)
        assert (line["spec"], line["ready"], line["pending"]) == (0, 0, 0)
    assert [n for n in (line["now_s"] for line in lines)] == sorted(line["now_s"] for line in lines)
    assert status["target"] == "local" and status["policy"] == POLICY and status["dry_run"]
    assert "shoal_autoscale_desired_replicas" in metrics
    assert "shoal_autoscale_round_seconds_count" in metrics
    assert (code, woke) == (202, {"desired": 1})  # what it would do; a dry run starts nothing
    assert json.loads(discovery.read_text()) == []
    assert not list(Path(tmp_path).glob("engine-*.log"))
    assert table.returncode == 0 and "target local" in table.stdout and "desired" in table.stdout
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["policy"] == POLICY


def post_raw(port: int, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/wake", data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_a_wake_scales_a_memory_target_from_zero_at_once(tmp_path: Path) -> None:
    port = free_port()
    args = ["--target", "memory", "--policy", POLICY, "--min-replicas", "0", "--model", "m",
            "--interval-s", "30", "--metrics", "requests_waiting:4"]  # fmt: skip
    with running(args, port, tmp_path):
        assert get(port, "/status")["replicas"]["spec"] == 0
        assert post(port, "/v1/wake", {"model": "other"}) == (
            404,
            {"error": "this controller scales model m, not other"},
        )
        assert get(port, "/status")["replicas"]["spec"] == 0
        assert post(port, "/v1/wake", {"model": "m"}) == (202, {"desired": 1})
        assert post(port, "/v1/wake", {"model": "m"}) == (202, {"desired": 1})
        bad_utf8 = post_raw(port, b'{"model": "\xff\xfe"}')
        whole = post_raw(port, b'{"model": "m", "pad": "' + b"x" * 60000 + b'"}')
        too_big = post_raw(port, b'{"pad": "' + b"x" * 70000 + b'"}')
        metrics = get(port, "/metrics")
    assert 'shoal_autoscale_wakes_total{result="scaled"} 1.0' in metrics
    assert 'shoal_autoscale_wakes_total{result="cached"} 2.0' in metrics  # a round read it
    assert 'shoal_autoscale_wakes_total{result="wrong-model"} 1.0' in metrics
    assert bad_utf8[0] == 400
    assert whole == (202, {"desired": 1})  # a large body is read whole, not cut at a chunk
    assert too_big[0] == 413


def test_a_token_guards_wake_and_status_but_not_metrics(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "token").write_text("s3cret\n")
    args = ["--target", "memory", "--policy", POLICY, "--min-replicas", "0", "--interval-s",
            "30", "--auth-token-file", str(tmp_path / "token")]  # fmt: skip
    status = shoal("autoscale", "status", "--url", f"http://127.0.0.1:{port}", "--json")
    with running(args, port, tmp_path):
        assert post(port, "/v1/wake", {"model": "m"})[0] == 401
        assert post(port, "/v1/wake", {"model": "m"}, token="wrong")[0] == 401
        metrics = get(port, "/metrics")  # Prometheus scrapes without the token
        assert 'shoal_autoscale_wakes_total{result="scaled"} 1.0' not in metrics  # none yet
        assert post(port, "/v1/wake", {"model": "m"}, token="s3cret") == (202, {"desired": 1})
        refused = subprocess.run(status, capture_output=True, text=True, env=ENV, timeout=30)
        allowed = subprocess.run(
            [*status, "--token-file", str(tmp_path / "token")],
            capture_output=True, text=True, env=ENV, timeout=30,
        )  # fmt: skip
    assert refused.returncode == 3 and "401" in refused.stderr
    assert allowed.returncode == 0 and json.loads(allowed.stdout)["target"] == "memory"


def test_listening_beyond_loopback_needs_a_token_or_an_explicit_flag() -> None:
    result = subprocess.run(
        shoal("autoscale", "run", "--target", "memory", "--host", "0.0.0.0", "--port", "1"),
        capture_output=True, text=True, env=ENV, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--auth-token-file FILE, or --insecure-no-auth" in result.stderr


def test_bad_metrics_exit_2_naming_the_known_ones() -> None:
    result = subprocess.run(
        shoal("autoscale", "run", "--target", "memory", "--policy", POLICY,
              "--metrics", "gpu_cache_usage:0.7", "--port", "0"),
        capture_output=True, text=True, env=ENV, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "unknown metric 'gpu_cache_usage'" in result.stderr
    assert "kv_cache_usage" in result.stderr


def test_status_of_an_unreachable_controller_exits_3() -> None:
    result = subprocess.run(
        shoal("autoscale", "status", "--url", f"http://127.0.0.1:{free_port()}"),
        capture_output=True, text=True, env=ENV, timeout=30,
    )  # fmt: skip
    assert result.returncode == 3 and "cannot reach" in result.stderr


def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    args = ["--target", "memory", "--policy", POLICY, "--interval-s", "0.2"]
    with running(args, port, tmp_path) as process:
        os.kill(process.pid, signal.SIGINT)
        assert process.wait(timeout=15) == 0
