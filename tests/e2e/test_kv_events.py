"""A real engine's KV events, ingested by the cache daemon: what is on the engine's GPU is
what ``shoal cache lookup`` and ``client.locate`` report, and an eviction in the engine
takes it out of their answers.

One engine (core 0) publishes vLLM's KV events on ZeroMQ (``--kv-events-config`` on an
``ipc://`` socket, which vLLM binds and the daemon connects to) and runs Shoal's connector to the same daemon. The daemon is
told the model (``--engine-model tiny-llama``) and nothing about the layout: it learns the
engine's namespace (``vllm0.32/LBHNC/b128/...`` on CPU) from the connector's hello, and
``shoal cache lookup`` without ``--model`` keys in what the daemon learned.

The engine's KV cache is 8 MiB: 2 KiB per token (4 layers x K and V x 2 heads x 64 x
bfloat16) makes 32 blocks of 128 tokens (``--max-model-len 2048`` needs 16). A prompt of
1,100 tokens holds 9 of them, so four more such prompts make vLLM evict the first's
blocks; the test watches vLLM's own ``BlockRemoved`` for the first block of the first
prompt (on a subscriber of its own), after which the engine no longer holds any of that
prompt's chunks and the lookup must say so. The daemon keeps its own copy (the connector
saved the chunks), which the same answer reports apart from the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import zmq

from kvcache.cluster.engine_events import BlockRemoved, BlockStored, decode_batch
from kvcache.keys import Namespace, chain_keys
from tests.e2e.engines import (
    BLOCK_SIZE,
    CHUNK,
    MODEL_DIR,
    Engine,
    connector_config,
    kv_events_config,
    random_prompt,
    running_engines,
    spawn_engine,
)
from tests.integration.conftest import ENV, DaemonProcess, start_daemon, wait_until

KV_CACHE_BYTES = 8 << 20  # 32 blocks of 128 tokens
TOPIC = "kv-events"


class EventWatcher:
    """A subscriber of the engine's publisher beside the daemon's: which vLLM blocks were
    stored (by their tokens) and which removed."""

    def __init__(self, endpoint: str) -> None:
        self._context = zmq.Context()
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        self._sub.connect(endpoint)
        self.stored: dict[tuple[int, ...], Any] = {}  # a root block's tokens -> its hash
        self.removed: set[Any] = set()
        self.num_events = 0

    def drain(self) -> None:
        while True:
            try:
                _, _, payload = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            for event in decode_batch(payload).events:
                self.num_events += 1
                if isinstance(event, BlockStored) and event.parent_block_hash is None:
                    tokens = tuple(event.token_ids[:BLOCK_SIZE])
                    self.stored[tokens] = event.block_hashes[0]
                elif isinstance(event, BlockRemoved):
                    self.removed.update(event.block_hashes)

    def events(self) -> int:
        """How many events arrived so far."""
        self.drain()
        return self.num_events

    def root_block(self, prompt: Sequence[int]) -> Any:
        """The hash of the block holding ``prompt``'s first 128 tokens, once stored."""
        self.drain()
        return self.stored.get(tuple(prompt[:BLOCK_SIZE]))

    def was_removed(self, block: Any) -> bool:
        self.drain()
        return block in self.removed

    def close(self) -> None:
        self._sub.close(linger=0)
        self._context.term()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, DaemonProcess, str]]:
    workdir = tmp_path_factory.mktemp("events")
    events, replay = f"ipc://{workdir}/kv-events.sock", f"ipc://{workdir}/kv-replay.sock"
    daemon = start_daemon(
        workdir,
        shm_bytes="64MiB",
        dram_bytes="0",
        engine_events=events,
        engine_events_replay=replay,
        engine_events_topic=TOPIC,
        engine_model=MODEL_DIR.resolve().name,  # the model; its layout is learned
        engine_chunk_tokens=CHUNK,
    )
    try:
        engine = spawn_engine(
            workdir,
            "engine",
            cpu=0,
            kv_transfer=connector_config(daemon.endpoint, chunk_tokens=CHUNK),
            kv_events=kv_events_config(events, replay, TOPIC),
            kv_cache_bytes=KV_CACHE_BYTES,
        )
        with running_engines(engine):
            yield engine, daemon, events
    finally:
        daemon.stop()


def engine_status(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client(heartbeat=False) as client:
        (status,) = client.cluster_status()["engines"]
    return dict(status)


def lookup(daemon: DaemonProcess, prompt: Sequence[int]) -> dict[str, Any]:
    """``shoal cache lookup --json`` as an operator runs it: no namespace given."""
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "cache", "lookup", "--name", daemon.config.name,
         "--runtime-dir", str(daemon.config.runtime_path),
         "--tokens", ",".join(map(str, prompt)), "--json"],
        env=ENV, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def locate_gpu(daemon: DaemonProcess, keys: Sequence[bytes]) -> tuple[tuple[str, int], ...]:
    with daemon.client(heartbeat=False) as client:
        return client.locate(keys).gpu


def test_the_prefix_on_the_engines_gpu_is_looked_up_and_leaves_with_vllms_eviction(
    served: tuple[Engine, DaemonProcess, str],
) -> None:
    engine, daemon, events = served
    watcher = EventWatcher(events)
    try:
        status = engine_status(daemon)
        assert wait_until(lambda: engine_status(daemon)["connected"], timeout=30), status
        # The layout came from the connector's hello: the engine logs the same namespace.
        namespace = Namespace.from_wire(engine_status(daemon)["namespace"])
        assert namespace is not None and namespace.layout != "default"
        assert f"namespace {namespace.label()}" in engine.log()

        # ZeroMQ drops what a subscriber misses while it connects: warm up until it sees.
        def watching() -> bool:
            engine.complete(random_prompt(50, 2 * BLOCK_SIZE), max_tokens=1, logprobs=None)
            return wait_until(lambda: watcher.events() > 0, timeout=2)

        assert wait_until(watching, timeout=60, interval=0.1)

        prompt = random_prompt(10, 1100)
        keys = chain_keys(namespace, prompt, CHUNK)
        engine.complete(prompt, max_tokens=4, logprobs=None)
        assert wait_until(lambda: watcher.root_block(prompt) is not None, timeout=30)
        root = watcher.root_block(prompt)
        stream = status["stream"]
        assert wait_until(lambda: locate_gpu(daemon, keys) == ((stream, 4),), timeout=30), (
            engine_status(daemon)
        )
        found = lookup(daemon, prompt)
        assert found["namespace"] == namespace.label() and found["chunk_tokens"] == CHUNK
        assert found["keys"] == [key.hex() for key in keys]
        assert found["gpu"] == [{"engine": stream, "upto": 4}]
        assert wait_until(lambda: lookup(daemon, prompt)["local_blocks"] == 4, timeout=30)

        for seed in range(11, 23):  # each holds 9 of the engine's 32 blocks
            if watcher.was_removed(root):
                break
            engine.complete(random_prompt(seed, 1100), max_tokens=4, logprobs=None)
        assert wait_until(lambda: watcher.was_removed(root), timeout=10), "vLLM never evicted"
        assert wait_until(lambda: locate_gpu(daemon, keys) == (), timeout=30), engine_status(daemon)
        after = lookup(daemon, prompt)
        assert after["gpu"] == []
        assert after["local_blocks"] == 4, "the daemon's own copy stays"
        assert engine_status(daemon)["resets"] == 0, "followed event by event, never reset"
    finally:
        watcher.close()
