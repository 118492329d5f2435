"""The daemon keys its engines' KV events in the namespace their connectors say hello with,
when ``--engine-layout`` is not given (on CPU vLLM's layout reads
``vllm0.32/LBHNC/b128/...``, which nobody should have to type)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import ENV, DaemonProcess, free_port, start_daemon, wait_until

pytest.importorskip("vllm.distributed.kv_events")

from tests.integration.test_engine_events import TOKENS, B, batch, publisher, stored

LEARNED = Namespace(
    "engine-events-test@1", "bfloat16", "vllm0.33/LBHNC/b16/FullAttentionSpec:2x32", 0, 1
)


def gpu_upto(node: DaemonProcess, keys: list[bytes]) -> int:
    with node.client(heartbeat=False) as client:
        runs = client.locate(keys).gpu
    return runs[0][1] if runs else 0


def start(tmp_path: Path, port: int, **extra: object) -> DaemonProcess:
    return start_daemon(
        tmp_path,
        engine_events=f"tcp://127.0.0.1:{port}",
        engine_model="engine-events-test",  # the model, without its revision
        engine_chunk_tokens=B,
        **extra,
    )


def test_the_engine_namespace_is_learned_from_a_connectors_hello(tmp_path: Path) -> None:
    port = free_port()
    keys = chain_keys(LEARNED, TOKENS, B)
    with publisher(port) as pub:
        node = start(tmp_path, port)
        try:
            with CacheClient(node.endpoint, namespace=LEARNED.to_wire(), heartbeat=False) as c:
                pub.publish(batch(stored(0, 4)))
                assert wait_until(lambda: gpu_upto(node, keys) == 4)
                # The session is labelled readably: evict by that label works.
                c.put(keys[:1], [b"x" * 4096])
                with node.client(heartbeat=False, role="operator") as admin:
                    assert admin.evict(namespace=LEARNED.label()) == 1
            assert "key namespace learned" in node.log()
        finally:
            node.stop()


def test_an_explicit_engine_layout_is_kept(tmp_path: Path) -> None:
    port = free_port()
    given = Namespace("engine-events-test", layout="given")
    with publisher(port) as pub:
        node = start(tmp_path, port, engine_layout="given")
        try:
            with CacheClient(node.endpoint, namespace=LEARNED.to_wire(), heartbeat=False):
                pub.publish(batch(stored(0, 4)))
                assert wait_until(lambda: gpu_upto(node, chain_keys(given, TOKENS, B)) == 4)
                assert gpu_upto(node, chain_keys(LEARNED, TOKENS, B)) == 0
        finally:
            node.stop()


def test_lookup_without_a_model_keys_in_the_namespace_the_daemon_learned(tmp_path: Path) -> None:
    """`shoal cache lookup` with no --model asks the daemon which namespace (layout
    included) and chunk size its engines' KV events are keyed in: nobody types
    ``vllm0.33/LBHNC/...`` (the e2e test found the layout learned by the daemon only)."""
    port = free_port()
    with publisher(port) as pub:
        node = start(tmp_path, port)
        try:
            with CacheClient(node.endpoint, namespace=LEARNED.to_wire(), heartbeat=False):
                pub.publish(batch(stored(0, 4)))
                assert wait_until(lambda: gpu_upto(node, chain_keys(LEARNED, TOKENS, B)) == 4)
            target = ["--name", node.config.name, "--runtime-dir", str(node.config.runtime_path)]
            tokens = ",".join(map(str, TOKENS))
            found = subprocess.run(
                [sys.executable, "-m", "shoal", "cache", "lookup", *target, "--tokens", tokens,
                 "--json"],
                env=ENV, capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            result = json.loads(found.stdout)
            assert result["namespace"] == LEARNED.label()
            assert result["chunk_tokens"] == B
            with node.client(heartbeat=False) as client:
                (engine,) = client.cluster_status()["engines"]
            assert result["gpu"] == [{"engine": engine["stream"], "upto": 4}]
            half = subprocess.run(
                [sys.executable, "-m", "shoal", "cache", "lookup", *target, "--layout", "x",
                 "--tokens", tokens],
                env=ENV, capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert half.returncode == 2 and "need --model" in half.stderr
        finally:
            node.stop()
