"""A real vLLM (CPU build) at tensor parallel 2 on Ray, inside a placement group that
Shoal made, through ``control/ray/vllm.py``'s launcher.

The cluster is one real Ray head started from ``.venv-engine`` (its workers must import
vLLM) with 2 fake GPUs; the test creates the group's placement group (bundle 0 with the
driver's CPU, as control/ray/bundles.py lays it out), runs ``python -m control.ray.vllm
--placement-group ID -- <vLLM flags>`` and asks for a completion. It checks that vLLM used
*that* group: no other placement group appears, vLLM's two workers are alive in it, and
the launcher reports both bundles' GPUs.

One thing is not vLLM's own: vLLM 0.32's CPU platform declares no Ray device key
(``CpuPlatform.ray_device_key == ""``), so its Ray executor refuses to start on CPU
("current platform cpu does not support ray."). An import hook (``sitecustomize`` on the
cluster's PYTHONPATH, below) sets it to ``"GPU"``, the fake GPUs' key; every other step —
the placement group taken from the server's actor, the workers' placement, gloo between
them — is vLLM's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.engines import ENGINE_PYTHON, MODEL_DIR, SERVED_NAME, require_engine
from tests.integration.conftest import REPO, free_port

ray = pytest.importorskip("ray")

READY_TIMEOUT_S = 240.0

CPU_RAY_HOOK = """
import importlib.abc, importlib.util, sys

class _GiveCpuPlatformARayKey(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "vllm.platforms.cpu":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.CpuPlatform.ray_device_key = "GPU"
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _GiveCpuPlatformARayKey())
"""


def _engine_has_ray() -> bool:
    found = subprocess.run(
        [str(ENGINE_PYTHON), "-c", "import ray; print(ray.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return found.returncode == 0 and found.stdout.strip() == ray.__version__


def _wait_port(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.2)
    raise AssertionError(f"Ray head did not listen on {port} in {timeout_s:g} s")


def _stop(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


@pytest.fixture(scope="module")
def cluster_env() -> Iterator[dict[str, str]]:
    """A Ray head from .venv-engine with 2 fake GPUs; yields the environment a launcher
    started by hand needs (RAY_ADDRESS among it). Everything it started is killed on exit."""
    require_engine()
    if not _engine_has_ray():
        pytest.skip(f".venv-engine has no ray {ray.__version__}: run scripts/setup-engine")
    scratch = Path(tempfile.mkdtemp(prefix="rv", dir="/tmp"))  # short: Ray's socket paths
    (scratch / "hook").mkdir()
    (scratch / "hook" / "sitecustomize.py").write_text(CPU_RAY_HOOK)
    port = free_port()
    # Ray 2.5x turns token authentication on by itself in any process that finds a token
    # in ~/.ray/auth_token (a local ray.init() on this machine once wrote one), and a head
    # and a driver that disagree refuse each other ("InvalidAuthToken": one CI run). The
    # cluster is loopback-only and the test's own: off, explicitly, on both sides.
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {
        **os.environ,
        "PYTHONPATH": f"{scratch / 'hook'}:{REPO}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CACHE_ROOT": str(scratch / "vllm-cache"),
    }
    with (scratch / "head.log").open("wb") as head_log:
        head = subprocess.Popen(
            [
                str(ENGINE_PYTHON.parent / "ray"),
                "start",
                "--head",
                "--block",
                "--node-ip-address",
                "127.0.0.1",
                "--port",
                str(port),
                "--num-cpus",
                "2",
                "--num-gpus",
                "2",
                "--include-dashboard",
                "false",
                "--disable-usage-stats",
                "--temp-dir",
                str(scratch / "ray"),
            ],
            stdout=head_log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        _wait_port(port, 60)
        ray.init(address=f"127.0.0.1:{port}", log_to_driver=False)
        try:
            # Not in the head's own environment: the group's launcher must find the
            # cluster from its raylet (control.ray.vllm.cluster_address).
            yield {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}
        finally:
            ray.shutdown()
    finally:
        _stop(head)
        shutil.rmtree(scratch, ignore_errors=True)  # Ray's session logs, the hook
        if auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = auth_mode


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            return int(answer.status)
    except (urllib.error.URLError, OSError):
        return 0


def test_vllm_tp2_serves_inside_the_groups_placement_group(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    from ray.util.placement_group import placement_group, placement_group_table

    shm_before = set(Path("/dev/shm").iterdir())
    pg = placement_group([{"GPU": 1, "CPU": 1}, {"GPU": 1}], strategy="PACK", name="g-vllm")
    ray.get(pg.ready(), timeout=30)
    port = free_port()
    log_path = tmp_path / "launcher.log"
    with log_path.open("wb") as launcher_log:
        launcher = subprocess.Popen(
            [
                str(ENGINE_PYTHON),
                "-m",
                "control.ray.vllm",
                "--placement-group",
                pg.id.hex(),
                "--",
                "--model",
                str(MODEL_DIR),
                "--served-model-name",
                SERVED_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--tensor-parallel-size",
                "2",
                "--max-model-len",
                "2048",
                "--enforce-eager",
                "--dtype",
                "bfloat16",
                "--kv-cache-memory-bytes",
                str(128 << 20),
            ],
            stdout=launcher_log,
            stderr=subprocess.STDOUT,
            env=cluster_env,
            cwd=REPO,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert launcher.poll() is None, log_path.read_text()[-4000:]
            assert time.monotonic() < deadline, log_path.read_text()[-4000:]
            time.sleep(1)
        body = json.dumps(
            {"model": SERVED_NAME, "prompt": "def main(", "max_tokens": 8, "temperature": 0}
        ).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as answer:
            completion = json.loads(answer.read())
        assert completion["usage"]["completion_tokens"] == 8
        assert completion["choices"][0]["finish_reason"] == "length"

        log = log_path.read_text()
        assert "Using the existing placement group" in log
        assert "Creating a new placement group" not in log
        # Both bundles' GPUs, in rank order, one per bundle.
        line = next(x for x in log.splitlines() if x.startswith("SHOAL_VLLM_GPUS="))
        gpus = line.partition("=")[2].split(",")
        assert len(gpus) == 2 and len(set(gpus)) == 2, gpus
        assert {g.rpartition("/gpu")[2] for g in gpus} == {"0", "1"}
        # The only placement group is the group's: vLLM made none of its own.
        table = placement_group_table()
        alive = [p for p in table.values() if p["state"] != "REMOVED"]
        assert [p["placement_group_id"] for p in alive] == [pg.id.hex()]
        # vLLM's two workers hold both of the group's GPUs.
        assert ray.available_resources().get(f"GPU_group_{pg.id.hex()}", 0.0) == 0.0

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 128 + signal.SIGTERM
        # vLLM kills its Ray workers at shutdown; the launcher removed what they left.
        left = {p for p in set(Path("/dev/shm").iterdir()) - shm_before if "cpushm" in p.name}
        assert not left, left
        deadline = time.monotonic() + 60
        while _get(f"http://127.0.0.1:{port}/health") == 200:  # the server actor is gone
            assert time.monotonic() < deadline, "vLLM still serving after its launcher stopped"
            time.sleep(1)
    finally:
        _stop(launcher)
        ray.util.remove_placement_group(pg)


def test_an_engine_group_with_vllm_workers_serves_and_stops_clean(
    cluster_env: dict[str, str],
) -> None:
    """The same through the group: RayEngineGroup(workers="vllm") places the group, its
    driver actor runs the launcher (vllm_command), the group reports READY with the
    bundles' GPUs, and stop() leaves no placement group and no vLLM process."""
    import asyncio

    from ray.util.placement_group import placement_group_table

    from control.ray.group import RayEngineGroup
    from control.ray.types import GroupPhase, GroupSpec
    from control.ray.vllm import vllm_command

    flags = [
        "--served-model-name", SERVED_NAME, "--max-model-len", "2048", "--enforce-eager",
        "--dtype", "bfloat16", "--kv-cache-memory-bytes", str(128 << 20),
    ]  # fmt: skip
    spec = GroupSpec(
        model=str(MODEL_DIR),
        engine_command=vllm_command(str(ENGINE_PYTHON), extra_flags=flags),
        tensor_parallel=2,
        workers="vllm",
        ready_timeout_s=READY_TIMEOUT_S,
        env={k: cluster_env[k] for k in cluster_env if k.startswith(("VLLM_", "HF_", "TRANS"))},
    )
    group = RayEngineGroup(spec, "g-vllm-group")

    async def run() -> None:
        await group.start()
        try:
            status = await group.poll()
            deadline = time.monotonic() + READY_TIMEOUT_S
            while status.phase is not GroupPhase.READY:
                assert status.phase in (GroupPhase.WAITING, GroupPhase.STARTING), status
                assert time.monotonic() < deadline, status
                await asyncio.sleep(1)
                status = await group.poll()
            assert sorted(g.rpartition("/gpu")[2] for g in status.gpus) == ["0", "1"]
            body = json.dumps(
                {"model": SERVED_NAME, "prompt": "import ", "max_tokens": 4, "temperature": 0}
            ).encode()
            request = urllib.request.Request(
                status.url + "/v1/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                assert json.loads(answer.read())["usage"]["completion_tokens"] == 4
            alive = [p for p in placement_group_table().values() if p["state"] != "REMOVED"]
            assert len(alive) == 1, alive  # the group's; vLLM made none
        finally:
            await group.stop(grace_s=30.0)
        assert group.status().phase is GroupPhase.STOPPED
        assert all(p["state"] == "REMOVED" for p in placement_group_table().values())

    asyncio.run(run())
