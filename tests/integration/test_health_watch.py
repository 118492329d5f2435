"""``shoal health watch`` as an operator runs it: a real process over the fake backend's TOML
file, faults injected into the file while it runs, read back over HTTP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from control.health.mockfile import Injection, inject
from tests.integration.conftest import ENV, free_port, wait_until

pytestmark = pytest.mark.integration


@dataclass
class WatcherProcess:
    proc: subprocess.Popen[bytes]
    url: str
    mock: Path
    log: Path

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def http(url: str, *, token: str | None = None, data: bytes | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def gpus(watcher: WatcherProcess, token: str | None = None) -> dict[str, Any] | None:
    """The watcher's report; None before its first (503) or while it cannot be reached."""
    try:
        status, body = http(watcher.url + "/v1/gpus", token=token)
    except OSError:
        return None
    return json.loads(body) if status == 200 else None


def metric(watcher: WatcherProcess, name: str, **labels: str) -> float | None:
    """The sample ``name`` with exactly ``labels`` on ``/metrics``, or None."""
    _, body = http(watcher.url + "/metrics")
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def start_watcher(
    tmp: Path,
    node: str,
    *,
    cards: int = 2,
    args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    interval_s: float = 0.5,
    wait: bool = True,
) -> WatcherProcess:
    """``shoal health watch --node NODE --nvml-mock NODE.toml`` on a free port; waits for
    its first report (``wait``)."""
    mock = tmp / f"{node}.toml"
    if not mock.exists():
        inject(mock, Injection("card_count", None, cards))
    port = free_port()
    log = tmp / f"{node}.log"
    command = [
        sys.executable, "-m", "shoal", "health", "watch", "--node", node,
        "--nvml-mock", str(mock), "--port", str(port), "--interval-s", str(interval_s),
        "--xid-wait-s", "0.2", *args,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env or ENV, stdout=out, stderr=subprocess.STDOUT)
    watcher = WatcherProcess(proc, f"http://127.0.0.1:{port}", mock, log)
    if wait and not wait_until(lambda: _answers(watcher), timeout=30):
        watcher.stop()
        raise AssertionError(f"watcher {node} did not answer: {log.read_text()}")
    return watcher


def _answers(watcher: WatcherProcess) -> bool:
    assert watcher.proc.poll() is None, watcher.log.read_text()
    return gpus(watcher) is not None


@pytest.fixture
def watcher(tmp_path: Path) -> Iterator[WatcherProcess]:
    process = start_watcher(tmp_path, "node-a")
    try:
        yield process
    finally:
        process.stop()


GPU1 = {"node": "node-a", "gpu": "1", "uuid": "GPU-00000000-0000-4000-8000-000000000001"}


def test_a_fault_in_the_file_shows_in_gpus_and_metrics_within_a_round(
    watcher: WatcherProcess,
) -> None:
    first = gpus(watcher)
    assert first is not None and first["healthy"] and first["node"] == "node-a"
    assert [g["index"] for g in first["gpus"]] == [0, 1]
    assert metric(watcher, "shoal_gpu_healthy", **GPU1) == 1.0

    inject(watcher.mock, Injection("ecc_dbe", 1, 3))
    assert wait_until(lambda: not (gpus(watcher) or {"healthy": True})["healthy"], timeout=10)
    report = gpus(watcher)
    assert report is not None
    sick = [g for g in report["gpus"] if not g["healthy"]]
    assert [g["index"] for g in sick] == [1]
    assert {p["check"] for p in sick[0]["problems"]} == {"ecc"}
    assert metric(watcher, "shoal_gpu_healthy", **GPU1) == 0.0
    dbe = metric(watcher, "shoal_gpu_ecc_errors", **GPU1, scope="volatile", bit="dbe")
    assert dbe == 3.0

    inject(watcher.mock, Injection("clear", 1))
    assert wait_until(lambda: (gpus(watcher) or {"healthy": False})["healthy"], timeout=10)


def test_an_xid_is_reported_at_once_and_cleared_by_post(tmp_path: Path) -> None:
    # a round every minute: only the XID thread's wake can report it within the test
    watcher = start_watcher(tmp_path, "node-a", interval_s=60)
    try:
        inject(watcher.mock, Injection("xid", 1, 79))
        assert wait_until(lambda: not (gpus(watcher) or {"healthy": True})["healthy"], timeout=10)
        report = gpus(watcher)
        assert report is not None
        problems = report["gpus"][1]["problems"]
        assert [(p["check"], p["remedy"]) for p in problems] == [("xid", "drain_node")]
        assert metric(watcher, "shoal_gpu_xid_events_total", **GPU1, xid="79") == 1.0

        assert http(watcher.url + "/v1/clear", data=b'{"gpu": "x"}')[0] == 400
        status, body = http(watcher.url + "/v1/clear", data=b'{"gpu": 1}')
        assert status == 202 and json.loads(body)["gpu"] == 1
        assert wait_until(lambda: (gpus(watcher) or {"healthy": False})["healthy"], timeout=10)
    finally:
        assert watcher.stop() == 0  # SIGTERM: a clean stop


def test_nvml_unavailable_is_served_as_a_node_problem_and_recovers(tmp_path: Path) -> None:
    mock = tmp_path / "node-b.toml"
    inject(mock, Injection("card_count", None, 2))
    inject(mock, Injection("nvml_init_error", None, 12))  # NVML_ERROR_LIBRARY_NOT_FOUND
    watcher = start_watcher(tmp_path, "node-b", args=["--expect-gpus", "2"])
    try:
        report = gpus(watcher)
        assert report is not None and not report["healthy"]
        assert [p["check"] for p in report["problems"]] == ["nvml"]
        # the expected GPUs, listed unhealthy
        assert [(g["index"], g["healthy"]) for g in report["gpus"]] == [(0, False), (1, False)]
        nvml = {"node": "node-b", "check": "nvml", "severity": "critical"}
        assert metric(watcher, "shoal_gpu_node_problems", **nvml) == 1.0
        assert (metric(watcher, "shoal_gpu_check_errors_total") or 0) >= 1

        inject(mock, Injection("nvml_init_error", None, 0))  # the driver is back
        assert wait_until(lambda: (gpus(watcher) or {"healthy": False})["healthy"], timeout=10)

        inject(mock, Injection("nvml_init_error", None, 999))  # and lost again
        assert wait_until(lambda: not (gpus(watcher) or {"healthy": True})["healthy"], timeout=10)
        report = gpus(watcher)
        assert report is not None and [p["check"] for p in report["problems"]] == ["nvml"]
        # the GPUs last seen, with their UUIDs, stay listed: consumers stop using them
        assert [g["uuid"][-1] for g in report["gpus"]] == ["0", "1"]
    finally:
        assert watcher.stop() == 0


def test_beyond_loopback_a_token_guards_gpus_and_clear_not_metrics(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    watcher = start_watcher(
        tmp_path, "node-c", args=["--host", "0.0.0.0", "--auth-token-file", str(token_file)],
        wait=False,
    )  # fmt: skip
    try:
        assert wait_until(lambda: gpus(watcher, token="s3cret") is not None, timeout=30)
        assert http(watcher.url + "/v1/gpus")[0] == 401
        assert http(watcher.url + "/v1/gpus", token="wrong")[0] == 401
        assert http(watcher.url + "/v1/clear", data=b'{"gpu": 0}')[0] == 401
        assert http(watcher.url + "/v1/clear", data=b'{"gpu": 0}', token="s3cret")[0] == 202
        assert http(watcher.url + "/metrics")[0] == 200
        assert http(watcher.url + "/healthz")[0] == 200
    finally:
        watcher.stop()


def test_beyond_loopback_without_a_token_it_refuses_to_start(tmp_path: Path) -> None:
    inject(tmp_path / "n.toml", Injection("card_count", None, 1))
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "health", "watch", "--node", "n", "--nvml-mock",
         str(tmp_path / "n.toml"), "--host", "0.0.0.0", "--port", str(free_port())],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--auth-token-file" in done.stderr and "--insecure-no-auth" in done.stderr
