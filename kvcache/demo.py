"""The README's first-run demo: two engine processes share a prefix through the daemon.

Process A ("engine A") computes KV blocks for a prompt and stores them; process B
("engine B") gets the same prompt, finds the cached prefix with one lookup, and reads the
blocks back, verifying every byte. Each prints what it did, so a newcomer sees the whole
contract (chained keys, two-phase put, leased get, checksums) in a few lines of output.
"""

from __future__ import annotations

import multiprocessing
import time

import numpy as np

from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys

__all__ = ["run_demo"]

_NAMESPACE = Namespace(model="demo-llama-7b@rev1", kv_dtype="bfloat16", layout="demo")
_CHUNK_TOKENS = 16
_BLOCK_BYTES = 256 << 10


def _fake_kv(key: bytes) -> np.ndarray:
    """Deterministic 'KV bytes' for a block, so the reader can check them independently."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, _BLOCK_BYTES, dtype=np.uint8)


def _prompt(num_tokens: int) -> list[int]:
    return [(i * 7919) % 32000 for i in range(num_tokens)]


def _engine_a(endpoint: str, num_tokens: int) -> None:
    with CacheClient(endpoint, namespace=_NAMESPACE.label(), name="demo-engine-a") as client:
        keys = chain_keys(_NAMESPACE, _prompt(num_tokens), _CHUNK_TOKENS)
        started = time.perf_counter()
        result = client.put(keys, [_fake_kv(k) for k in keys])
        elapsed = time.perf_counter() - started
        print(
            f"[engine A pid {multiprocessing.current_process().pid}] prompt of {num_tokens} tokens "
            f"-> {len(keys)} blocks of {_BLOCK_BYTES >> 10} KiB: stored {result.stored}, "
            f"already cached {result.existed}, no space {result.no_space} ({elapsed * 1e3:.1f} ms)",
            flush=True,
        )


def _engine_b(endpoint: str, num_tokens: int) -> None:
    with CacheClient(endpoint, namespace=_NAMESPACE.label(), name="demo-engine-b") as client:
        tokens = _prompt(num_tokens) + [1, 2, 3] * 40  # same prefix, new question
        keys = chain_keys(_NAMESPACE, tokens, _CHUNK_TOKENS)
        cached = client.lookup(keys)
        outs = [np.empty(_BLOCK_BYTES, dtype=np.uint8) for _ in range(cached)]
        started = time.perf_counter()
        served = client.get_into(keys[:cached], outs)
        elapsed = time.perf_counter() - started
        intact = all(np.array_equal(out, _fake_kv(k)) for out, k in zip(outs, keys, strict=False))
        print(
            f"[engine B pid {multiprocessing.current_process().pid}] "
            f"prompt of {len(tokens)} tokens "
            f"-> {len(keys)} blocks: {cached} cached, read {served} "
            f"({served * _BLOCK_BYTES / max(elapsed, 1e-9) / 1e9:.2f} GB/s), "
            f"bytes identical: {intact}; {len(keys) - served} blocks to recompute",
            flush=True,
        )


def run_demo(endpoint: str, num_tokens: int = 1024) -> bool:
    """Run engine A then engine B in two fresh processes; True when both exit cleanly."""
    context = multiprocessing.get_context("spawn")
    for target in (_engine_a, _engine_b):
        process = context.Process(target=target, args=(endpoint, num_tokens))
        process.start()
        process.join(60)
        if process.exitcode != 0:
            print(f"demo process {target.__name__} failed with exit code {process.exitcode}")
            return False
    return True
