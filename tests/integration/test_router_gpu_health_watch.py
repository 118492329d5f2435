"""End to end (issue 15): a real ``shoal health watch`` on a fake-backend TOML file, a real
router polling it, two simulated engines on node-a/gpu0 and node-a/gpu1 (the discovery
file's ``gpus``). ``shoal health inject --xid 79`` on gpu1 takes its engine out of the
router's rotation (every request goes to the other, by the engines' own
``vllm:request_success`` counters); clearing the card and the watcher's XID record
(``inject --clear``, ``POST /v1/clear``: what an operator does after a reset) brings the
traffic back."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from router.server import RouterProcess
from shoal.processes import shoal_env, spawn_logged
from tests.integration.conftest import free_port, stop_process, wait_until
from tests.integration.test_router_gpu_health import engines_view, fleet, send, served

pytest.importorskip("control.health.watch", reason="the health watcher is not merged yet")


def shoal(*args: str) -> None:
    """One ``shoal ...`` command that must succeed."""
    done = subprocess.run([sys.executable, "-m", "shoal", *args], env=shoal_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, f"shoal {' '.join(args)}: {done.stdout}{done.stderr}"


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


@contextmanager
def health_watch(tmp_path: Path, mock: Path) -> Iterator[str]:
    """``shoal health watch`` for node-a on ``mock``, checking every 0.2 s; its URL once
    ``/v1/gpus`` answers a first check."""
    port = free_port()
    log_path = tmp_path / "watch.log"
    command = [sys.executable, "-m", "shoal", "health", "watch", "--node", "node-a",
               "--nvml-mock", str(mock), "--expect-gpus", "2", "--interval-s", "0.2",
               "--xid-wait-s", "0.1", "--port", str(port)]  # fmt: skip
    process = spawn_logged(command, log_path, shoal_env())
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_until(lambda: get(url + "/v1/gpus")[0] == 200 or process.poll() is not None,
                           timeout=30)  # fmt: skip
        assert ready and process.poll() is None, log_path.read_text()
        yield url
    finally:
        stop_process(process)


def gpu1_unhealthy(router: RouterProcess, url: str) -> bool:
    return not engines_view(router)[url]["gpu_healthy"]


def test_xid_79_injected_on_gpu1_sends_every_request_to_the_engine_on_gpu0(
    tmp_path: Path,
) -> None:
    mock = tmp_path / "gpus.toml"
    shoal("health", "inject", "--nvml-mock", str(mock), "--card-count", "2")
    with health_watch(tmp_path, mock) as watcher, fleet(tmp_path, watcher) as (router, e0, e1):
        report = json.loads(get(watcher + "/v1/gpus")[1])
        assert report["node"] == "node-a" and report["healthy"], report
        assert sorted(send(router, 4)) == sorted([e0.url, e1.url] * 2)

        shoal("health", "inject", "--nvml-mock", str(mock), "--gpu", "1", "--xid", "79")
        assert wait_until(lambda: gpu1_unhealthy(router, e1.url), timeout=15), router.log()
        assert engines_view(router)[e1.url]["unhealthy_gpus"] == ["node-a/gpu1"]
        assert not engines_view(router)[e0.url]["unhealthy_gpus"]
        before = served(e0), served(e1)
        assert send(router, 10) == [e0.url] * 10
        assert (served(e0) - before[0], served(e1) - before[1]) == (10, 0)

        shoal("health", "inject", "--nvml-mock", str(mock), "--gpu", "1", "--clear")
        request = urllib.request.Request(watcher + "/v1/clear", data=b'{"gpu": 1}',
                                         method="POST",
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=5) as reply:
            assert reply.status == 202
        assert wait_until(lambda: not gpu1_unhealthy(router, e1.url), timeout=15), router.log()
        before = served(e0), served(e1)
        assert sorted(send(router, 6)) == sorted([e0.url, e1.url] * 3)
        assert (served(e0) - before[0], served(e1) - before[1]) == (3, 3)
