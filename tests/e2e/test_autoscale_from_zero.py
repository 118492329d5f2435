"""Scale from zero with a real ``vllm serve`` (issue 13): the router has no engine, the
autoscaler (``shoal autoscale run --target local --min-replicas 0``) starts one when the
router, holding the first request, asks for it; the request waits through the engine's
start (22-40 s on these CPUs, ENGINES.md) and succeeds.

The local actuator's engine command runs a script that starts vLLM exactly as
``tests/e2e/engines.py`` does (its command line and environment; the port is the one the
actuator picks), written by ``router.up_plan.engine_script`` as ``shoal up --autoscale``
writes its own."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from router.server import running_router
from router.up_plan import engine_script
from tests.e2e.engines import (
    DEFAULT_KV_BYTES,
    ENGINE_PYTHON,
    MODEL_DIR,
    SERVED_NAME,
    require_engine,
)
from tests.integration.conftest import REPO, free_port
from tests.integration.test_autoscale_from_zero import (
    POLICY,
    _refused,
    listed_urls,
    running_autoscaler,
)


@pytest.fixture(autouse=True)
def _controller_merged() -> None:
    pytest.importorskip("control.autoscale.controller")
    pytest.importorskip("control.autoscale.actuators.local")
    import control.autoscale.policies  # noqa: F401  (registers the policies that landed)
    from control.autoscale.policies.base import POLICIES

    if POLICY not in POLICIES:
        pytest.skip(f"policy {POLICY} not merged yet")


def vllm_script(workdir: Path) -> Path:
    """``sh engine.sh PORT``: one engine as ``tests.e2e.engines.spawn_engine`` starts it."""
    argv = [
        str(ENGINE_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(MODEL_DIR), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048",
        "--enforce-eager", "--dtype", "bfloat16", "--seed", "0",
        "--kv-cache-memory-bytes", str(DEFAULT_KV_BYTES), "--disable-uvicorn-access-log",
    ]  # fmt: skip
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "$home",
        "PYTHONPATH": str(REPO),
        "HF_HOME": "$home/hf",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": "$home/vllm-cache",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": "0",
        "VLLM_LOGGING_LEVEL": "INFO",
        "TMPDIR": "$home",
    }
    script = workdir / "engine.sh"
    script.write_text(engine_script(argv, env, f"{workdir}/e-$port"))
    return script


def test_the_first_request_waits_for_a_vllm_engine_started_from_zero(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    require_engine()
    # short: vLLM binds ipc sockets in its TMPDIR (the engine's home), at most 107 bytes
    tmp_path = tmp_path_factory.mktemp("zero")
    listing = tmp_path / "engines.json"
    listing.write_text("[]")
    script = vllm_script(tmp_path)
    autoscaler_port = free_port()
    with running_router(
        free_port(), discovery="file", discovery_file=listing,
        autoscaler_url=f"http://127.0.0.1:{autoscaler_port}", strategy="least-request",
        hold_timeout_s=300, health_interval_s=0.5, discovery_interval_s=0.5,
    ) as router, running_autoscaler(
        tmp_path, autoscaler_port, "--target", "local", "--policy", POLICY,
        "--engine-command", f"/bin/sh {script} {{port}}", "--discovery-file", str(listing),
        "--min-replicas", "0", "--max-replicas", "1", "--model", SERVED_NAME,
        "--router-url", router.url, "--interval-s", "1", "--engine-ready-timeout-s", "300",
    ):  # fmt: skip
        assert listed_urls(listing) == []  # nothing runs until a request comes
        body = {"model": SERVED_NAME, "prompt": "Hello", "max_tokens": 4, "temperature": 0.0}
        status, headers, answer = router.request("POST", "/v1/completions", body, timeout=330)
        assert status == 200, (answer, router.log())
        assert json.loads(answer)["usage"]["completion_tokens"] == 4
        engine_url = headers["x-shoal-engine"]
        assert listed_urls(listing) == [engine_url]
        with urllib.request.urlopen(router.url + "/metrics", timeout=5) as reply:
            metrics = reply.read().decode()
        assert "shoal_router_held_seconds_count 1.0" in metrics
    port = int(engine_url.rpartition(":")[2])
    assert _refused(port)  # the engine stopped with the autoscaler
