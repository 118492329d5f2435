"""``shoal engines serve`` as a real process on a real one-machine Ray cluster, with real
simulated engines in real engine groups (RayEngineGroup, stand-in workers on fake GPUs),
driven the two ways a fleet is driven: by ``shoal engines scale|status`` (real client
processes) and by ``RayFleetActuator`` (the autoscaler's and the planner's path). It
listens beyond loopback, so every call carries the bearer token. SIGTERM stops every
group: no placement group or actor of the fleet is left. With ``--gpu-health``, a group
on a GPU a real ``shoal health watch`` calls sick is replaced."""

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

import pytest
import ray

from control.autoscale.actuators.ray import RayFleetActuator
from control.autoscale.types import ReplicaState
from control.health.mockfile import Injection, inject
from tests.integration.conftest import ENV, free_port
from tests.integration.ray_cluster import RayTestCluster, ray_test_cluster
from tests.integration.test_health_watch import start_watcher

pytestmark = pytest.mark.integration

TOKEN = "fleet-s3cret"
ENGINE = f"{sys.executable} -m shoal sim engine --host {{host}} --port {{port}} --model {{model}}"


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayTestCluster]:
    with ray_test_cluster() as c:
        c.add_node("node-a", gpus=2, **{"accelerator_type:A100": 1})
        c.add_node("node-b", gpus=2)
        yield c


def shoal(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "engines", *args],
        capture_output=True, text=True, env=ENV, timeout=timeout_s,
    )  # fmt: skip


def get(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"not {what} after {timeout_s} s"
        time.sleep(0.25)
    return result


@contextmanager
def daemon(cluster: RayTestCluster, tmp_path: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    log_path = tmp_path / "engines.log"
    log = open(log_path, "w")  # noqa: SIM115 (closed in finally)
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal", "engines", "serve", "--ray-address", cluster.address,
         "--model", "sim-7b", "--engine-command", ENGINE, *args],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def fleet_groups_alive() -> tuple[list[str], list[str]]:
    """Placement groups not removed, and actors alive, as the test's own driver sees them."""
    groups = [
        pg["name"] for pg in ray.util.placement_group_table().values() if pg["state"] != "REMOVED"
    ]
    actors = [
        info["Name"] or actor_id
        for actor_id, info in ray._private.state.actors().items()
        if info["State"] == "ALIVE"
    ]
    return groups, actors


def test_a_fleet_daemon_on_ray_scales_from_the_cli_and_the_actuator(
    cluster: RayTestCluster, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    discovery = tmp_path / "engines.json"
    args = ["--tp", "2", "--replicas", "1", "--gpu-type", "fake-gpu", "--port", str(port),
            "--host", "0.0.0.0", "--auth-token-file", str(token_file), "--interval-s", "0.5",
            "--discovery-file", str(discovery), "--drain-s", "0", "--stop-grace-s", "5"]  # fmt: skip
    client = ["--url", url, "--token-file", str(token_file)]
    with daemon(cluster, tmp_path, *args) as process:
        log = tmp_path / "engines.log"

        def listening() -> bool:
            assert process.poll() is None, log.read_text()
            try:
                return get(url + "/healthz")[0] == 200
            except OSError:
                return False

        eventually(listening, "listening", timeout_s=60)
        # beyond loopback: the API needs the token, /metrics and /healthz stay open
        code, body = get(url + "/v1/fleet")
        assert code == 401 and "bearer token" in body
        assert shoal("status", "--url", url).returncode == 1

        def ready(n: int) -> Callable[[], dict[str, Any] | None]:
            def check() -> dict[str, Any] | None:
                assert process.poll() is None, log.read_text()
                out = shoal("status", *client, "--json")
                assert out.returncode == 0, out.stderr
                answer: dict[str, Any] = json.loads(out.stdout)
                return answer if answer["ready"] == n and len(answer["groups"]) == n else None

            return check

        first = eventually(ready(1), "one group ready")
        (group,) = first["groups"]
        assert group["phase"] == "ready" and len(group["gpus"]) == 2
        assert {g.split("/")[0] for g in group["gpus"]} <= {"node-a", "node-b"}
        assert get(group["url"] + "/health")[0] == 200  # the real simulated engine

        scaled = shoal("scale", "2", *client)
        assert (scaled.returncode, scaled.stdout.strip()) == (0, "asked for 2 groups")
        second = eventually(ready(2), "two groups ready")
        assert second["spec"]["replicas"] == 2
        # PACK: each group's two workers on one node, the two groups on the two nodes
        nodes = sorted(sorted({g.split("/")[0] for g in grp["gpus"]}) for grp in second["groups"])
        assert nodes == [["node-a"], ["node-b"]], second["groups"]
        table = shoal("status", *client)
        assert table.returncode == 0
        assert table.stdout.splitlines()[0].startswith("sim-7b: 2 ready, 0 pending of 2 (tp 2")
        published = eventually(lambda: len(json.loads(discovery.read_text())) == 2
                               and json.loads(discovery.read_text()), "published")  # fmt: skip
        assert sorted(e["url"] for e in published) == sorted(g["url"] for g in second["groups"])
        assert {e["gpu_type"] for e in published} == {"fake-gpu"}
        _, metrics = get(url + "/metrics")
        assert "shoal_engines_ready 2.0" in metrics
        assert "shoal_engines_replicas_desired 2.0" in metrics
        assert 'shoal_engines_groups{phase="ready"} 2.0' in metrics
        assert "shoal_engines_wait_seconds_count 2.0" in metrics

        async def autoscaler_path() -> ReplicaState:
            actuator = RayFleetActuator(url, TOKEN)
            try:
                state = await actuator.state()
                assert (state.spec, state.ready, state.pending) == (2, 2, 0)
                assert sorted(state.endpoints) == sorted(g["url"] for g in second["groups"])
                await actuator.scale(1)
                async with asyncio.timeout(60):
                    while (state := await actuator.state()).ready != 1:
                        await asyncio.sleep(0.25)
                return state
            finally:
                await actuator.close()

        state = asyncio.run(autoscaler_path())
        assert (state.spec, state.ready) == (1, 1)
        eventually(lambda: len(json.loads(discovery.read_text())) == 1, "one published")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, log.read_text()
    assert json.loads(discovery.read_text()) == []
    eventually(lambda: fleet_groups_alive() == ([], []), "every group removed", timeout_s=30)


def fleet(url: str) -> dict[str, Any]:
    code, body = get(url + "/v1/fleet")
    assert code == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


def test_a_group_on_a_gpu_the_health_watcher_calls_sick_is_replaced(
    cluster: RayTestCluster, tmp_path: Path
) -> None:
    watcher = start_watcher(tmp_path, "node-a", cards=2)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # only node-a has the A100 resource: every group of this fleet lands there
    args = ["--tp", "2", "--replicas", "1", "--accelerator-type", "A100", "--port", str(port),
            "--interval-s", "0.5", "--gpu-health", watcher.url, "--gpu-health-interval-s",
            "0.5", "--drain-s", "0", "--stop-grace-s", "5"]  # fmt: skip
    try:
        with daemon(cluster, tmp_path, *args) as process:
            log = tmp_path / "engines.log"

            def one_ready() -> dict[str, Any] | None:
                assert process.poll() is None, log.read_text()
                try:
                    answer = fleet(url)
                except OSError:
                    return None
                return answer if answer["ready"] == 1 else None

            (first,) = eventually(one_ready, "a group ready")["groups"]
            assert sorted(first["gpus"]) == ["node-a/gpu0", "node-a/gpu1"]
            inject(watcher.mock, Injection("ecc_dbe", 1, 2))  # node-a/gpu1 is now sick

            def replaced() -> bool:
                assert process.poll() is None, log.read_text()
                return first["id"] not in {g["id"] for g in fleet(url)["groups"]}

            eventually(replaced, "the group on the sick GPU replaced", timeout_s=30)
            _, metrics = get(url + "/metrics")
            assert 'shoal_engines_group_failures_total{reason="gpu_unhealthy"} 1.0' in metrics
            assert "shoal_engines_replacements_total 1.0" in metrics
            inject(watcher.mock, Injection("clear", 1))  # healed: a group serves again
            (second,) = eventually(one_ready, "a group ready again")["groups"]
            assert second["id"] != first["id"]
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0, log.read_text()
    finally:
        watcher.stop()
    eventually(lambda: fleet_groups_alive() == ([], []), "every group removed", timeout_s=30)
