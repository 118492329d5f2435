"""Two real engines that share only a cache daemon: what one computed, the other loads.

Engine A (core 0) and engine B (core 1) run the same tiny model with Shoal's connector to
one daemon and a KV cache of their own. A prompt of 1,100 tokens computed by A is saved
as whole 256-token chunks; B then loads 1,024 of its tokens (four chunks: a prefix hit
never covers the last token, which must be computed) and computes the rest.

Exact equality needs equal computations: with one thread each, B (1,024 tokens loaded, 76
computed) gives exactly the top-5 logprobs that A gives when it answers the prompt again
from its own prefix cache (1,024 tokens cached on its GPU, the same 76 computed), so
every loaded byte was A's. A's first, cold answer computed all 1,100 tokens in one pass:
bfloat16 rounds differently there, by up to 0.008 (allowed: 0.016),
while a different prompt moves them by about 0.1. A different prompt loads nothing.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.engines import (
    BLOCK_SIZE,
    Engine,
    connector_config,
    running_engines,
    spawn_engine,
    top_logprobs,
)
from tests.integration.conftest import DaemonProcess, start_daemon, wait_until

CHUNK = 256
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"
LOCAL_HITS = "vllm:prefix_cache_hits_total"
# The largest difference seen between two batchings of one prompt is 2**-7 (0.0078, one
# rounding step of the bfloat16 logits here); a different prompt moves logprobs by ~0.1.
BF16_STEP = 2.0**-6


def random_prompt(seed: int, length: int) -> list[int]:
    """Token ids drawn from the tiny vocabulary, past its four special tokens."""
    rng = random.Random(seed)
    return [rng.randrange(4, 8192) for _ in range(length)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("prefix")


@pytest.fixture(scope="module")
def cache_daemon(workdir: Path) -> Iterator[DaemonProcess]:
    daemon = start_daemon(workdir, shm_bytes="256MiB", dram_bytes="0", session_ttl_s=60)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def engines(workdir: Path, cache_daemon: DaemonProcess) -> Iterator[tuple[Engine, Engine]]:
    config = connector_config(cache_daemon.endpoint, chunk_tokens=CHUNK)
    a = spawn_engine(workdir, "engine-a", cpu=0, kv_transfer=config)
    b = spawn_engine(workdir, "engine-b", cpu=1, kv_transfer=config)
    with running_engines(a, b):
        yield a, b


def stored_blocks(daemon: DaemonProcess) -> int:
    with daemon.client(heartbeat=False) as client:
        return sum(int(tier["num_blocks"]) for tier in client.stats()["tiers"])


def test_engine_b_loads_what_engine_a_computed(
    engines: tuple[Engine, Engine], cache_daemon: DaemonProcess
) -> None:
    a, b = engines
    prompt = random_prompt(1, 1100)
    before = stored_blocks(cache_daemon)
    from_a = a.complete(prompt, max_tokens=4, logprobs=5)
    # A saves its four whole chunks (the fifth, partial, is not saved) before B asks.
    assert wait_until(lambda: stored_blocks(cache_daemon) >= before + 4, timeout=30), (
        cache_daemon.log()
    )
    hits_before = b.metric(EXTERNAL_HITS)
    from_b = b.complete(prompt, max_tokens=4, logprobs=5)
    assert b.metric(EXTERNAL_HITS) - hits_before == 4 * CHUNK

    local_hits_before = a.metric(LOCAL_HITS)
    from_a_warm = a.complete(prompt, max_tokens=4, logprobs=5)
    assert a.metric(LOCAL_HITS) - local_hits_before == 8 * BLOCK_SIZE  # its own GPU cache
    assert top_logprobs(from_b) == top_logprobs(from_a_warm)
    assert from_b["choices"][0]["text"] == from_a["choices"][0]["text"]
    for cold, loaded in zip(top_logprobs(from_a), top_logprobs(from_b), strict=True):
        assert cold.keys() == loaded.keys()
        assert max(abs(cold[token] - loaded[token]) for token in cold) <= BF16_STEP


def test_a_different_prefix_loads_nothing(engines: tuple[Engine, Engine]) -> None:
    _, b = engines
    hits_before = b.metric(EXTERNAL_HITS)
    b.complete(random_prompt(2, 1100), max_tokens=1)
    assert b.metric(EXTERNAL_HITS) == hits_before
