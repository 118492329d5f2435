"""Precise prefix routing through the real router process: simulated engines publish KV
events to a cache daemon, the router asks that daemon (``--cache-socket``) where each
prompt's prefix lives, and ``precise-prefix`` sends a prompt back to the engine holding it."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from router.server import RouterProcess, running_router
from sim.process import SimEngineProcess, start_sim_engine
from tests.integration.conftest import DaemonProcess, free_port, start_daemon, wait_until

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / ".cache/engine/tiny-llama"
BLOCK, CHUNK = 16, 32
FAST = {"health_interval_s": 0.2, "metrics_interval_s": 0.2, "models_interval_s": 0.5}

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "tokenizer.json").exists(),
    reason="the tiny model's tokenizer is missing: run scripts/setup-engine",
)


@contextlib.contextmanager
def stack(tmp_path: Path) -> Iterator[tuple[DaemonProcess, list[SimEngineProcess], RouterProcess]]:
    ports = [free_port(), free_port()]
    node = start_daemon(tmp_path, engine_events=",".join(f"tcp://127.0.0.1:{p}" for p in ports),
                        engine_events_topic="kv-events", engine_model="tiny-sim@1",
                        engine_chunk_tokens=CHUNK)  # fmt: skip
    engines: list[SimEngineProcess] = []
    try:
        for port in ports:
            events = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"tcp://*:{port}", "topic": "kv-events"}  # fmt: skip
            engines.append(start_sim_engine(free_port(), served_model_name="tiny",
                                            tokenizer=str(MODEL_DIR), block_size=BLOCK,
                                            time_scale=100, kv_events_config=events))  # fmt: skip
        with node.client(heartbeat=False) as client:
            streams = [e["stream"] for e in client.cluster_status()["engines"]]
        urls = [f"{e.url}={s}" for e, s in zip(engines, streams, strict=True)]
        with running_router(free_port(), engines=urls, strategy="precise-prefix",
                            cache_socket=str(node.config.socket_path), tokenizer=str(MODEL_DIR),
                            tokenizer_dialect="simulator", **FAST) as router:  # fmt: skip
            yield node, engines, router
    finally:
        for engine in engines:
            engine.stop()
        node.stop()


def served_by(router: RouterProcess, prompt: str) -> str:
    body: dict[str, Any] = {"model": "tiny", "prompt": prompt, "max_tokens": 1}
    status, headers, raw = router.request("POST", "/v1/completions", body)
    assert status == 200, raw
    assert json.loads(raw)["usage"]["prompt_tokens"] > 0
    return headers["x-shoal-engine"]


def test_a_prompt_goes_back_to_the_engine_that_holds_its_prefix(tmp_path: Path) -> None:
    with stack(tmp_path) as (_node, engines, router):
        prompts = [f"Tenant {i} keeps a long system prompt about caches. " * 12 for i in range(4)]
        homes = [served_by(router, prompt) for prompt in prompts]
        for prompt, home in zip(prompts, homes, strict=True):
            # once the daemon has the engine's events, the prompt (and a longer one that
            # starts with it) goes where its prefix is
            assert wait_until(lambda p=prompt, h=home: served_by(router, p) == h, timeout=10)
            for _ in range(3):
                assert served_by(router, prompt + " And one more question?") == home
        assert set(homes) <= {e.url for e in engines}
        assert gpu_decisions(router) >= 4 * 3  # decided by the GPU tier, not by chance
        text = router.request("GET", "/metrics")[2].decode()
        located = re.search(r'^shoal_router_prefix_lookups_total\{result="located"\} (\S+)$',
                            text, re.M)  # fmt: skip
        assert located and float(located.group(1)) >= 4 * 4


def gpu_decisions(router: RouterProcess) -> float:
    text = router.request("GET", "/metrics")[2].decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("shoal_router_decisions_total{") and 'reason="gpu"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
