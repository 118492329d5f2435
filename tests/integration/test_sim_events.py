"""A real cache daemon subscribed to a simulated engine's KV events: the prefix the engine
computed shows on its GPU through ``client.locate``, eviction in the engine removes it,
and batches published before the daemon joined come back through replay."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kvcache.keys import Namespace, chain_keys
from sim.process import SimEngineProcess, running_sim_engine
from tests.integration.conftest import DaemonProcess, free_port, start_daemon, wait_until

pytestmark = pytest.mark.integration

NS = Namespace(model="sim-events-test@1")
B = 16
TOKENS = list(range(1000, 1000 + 8 * B))  # 8 blocks
KEYS = chain_keys(NS, TOKENS, B)


def events_config(port: int, replay_port: int) -> dict[str, Any]:
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "replay_endpoint": f"tcp://*:{replay_port}",
        "topic": "kv-events",
    }


def daemon(tmp_path: Path, port: int, replay_port: int) -> DaemonProcess:
    return start_daemon(
        tmp_path,
        engine_events=f"tcp://127.0.0.1:{port}",
        engine_events_replay=f"tcp://127.0.0.1:{replay_port}",
        engine_events_topic="kv-events",
        engine_model=NS.model,
        engine_chunk_tokens=B,
        engine_replay_timeout_s=0.5,
    )


def gpu_upto(node: DaemonProcess) -> int:
    with node.client(heartbeat=False) as client:
        runs = client.locate(KEYS).gpu
    return runs[0][1] if runs else 0


def status(node: DaemonProcess) -> dict[str, Any]:
    with node.client(heartbeat=False) as client:
        (engine,) = client.cluster_status()["engines"]
        return dict(engine)


def compute(engine: SimEngineProcess, prompt: list[int]) -> None:
    code, raw = engine.request("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 1})
    assert code == 200, raw


def test_the_daemon_sees_the_engines_prefix_and_its_eviction(tmp_path: Path) -> None:
    port, replay_port = free_port(), free_port()
    node = daemon(tmp_path, port, replay_port)
    try:
        # 24 blocks: the 8 of TOKENS stay cached until a 20-block prompt needs them.
        with running_sim_engine(
            free_port(),
            time_scale=100,
            num_gpu_blocks=24,
            max_model_len=336,
            kv_events_config=events_config(port, replay_port),
        ) as engine:
            assert wait_until(lambda: bool(status(node)["connected"]))
            compute(engine, TOKENS)
            assert wait_until(lambda: gpu_upto(node) == 8), node.log()
            compute(engine, list(range(5000, 5000 + 20 * B)))
            # 23 usable blocks (block 0 is vLLM's null block). The free queue hands out
            # never-used blocks first, then TOKENS' blocks from its last one back (a request
            # frees its tail first): 5 of 8 are evicted.
            assert wait_until(lambda: gpu_upto(node) == 3), node.log()
            assert (status(node)["resets"], status(node)["replays"]) == (0, 0)
        assert wait_until(lambda: gpu_upto(node) == 0), "a stopped engine's GPU is forgotten"
    finally:
        node.stop()


def test_batches_published_before_the_daemon_joined_are_replayed(tmp_path: Path) -> None:
    port, replay_port = free_port(), free_port()
    with running_sim_engine(
        free_port(), time_scale=100, kv_events_config=events_config(port, replay_port)
    ) as engine:
        compute(engine, TOKENS)  # seq 0: nobody subscribed, lost on the wire
        node = daemon(tmp_path, port, replay_port)
        try:
            assert wait_until(lambda: bool(status(node)["connected"]))
            compute(engine, list(range(3000, 3000 + 2 * B)))  # seq 1: the daemon asks for 0
            assert wait_until(lambda: gpu_upto(node) == 8), node.log()
            assert status(node)["replays"] >= 1
        finally:
            node.stop()
