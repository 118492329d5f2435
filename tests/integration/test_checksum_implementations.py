"""A block written with one checksum implementation is read with the other (issue 17).

The compiled copy+checksum (kvcache._copyhash) and the pure-Python fallback (the xxhash
package, SHOAL_NATIVE=0) must agree byte for byte and checksum for checksum: a node may run
engines of both kinds against one daemon (a build without a compiler, or the fallback
forced while debugging). A writer in its own interpreter with the fallback, a reader here
with the native kernel, and the other way round; then a block corrupted at rest is a miss
for both (``served`` stops before it; what a target past ``served`` holds is undefined,
as `CacheClient.get_into` says) and is deleted.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from kvcache import checksums
from kvcache.keys import Namespace, chain_keys
from tests.integration.conftest import ENV, DaemonProcess

pytestmark = pytest.mark.integration

BLOCK = 256 << 10
COUNT = 24  # 6 MiB: more than one 4 MiB pipeline piece, so both batch paths run

FALLBACK = """
import json, sys
import numpy as np
from kvcache import checksums
from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys
assert checksums.IMPLEMENTATION == "python", checksums.IMPLEMENTATION
endpoint, op, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
keys = chain_keys(Namespace(model="m"), list(range(seed, seed + 16 * 24)), 16)
blocks = [np.random.default_rng(seed + i).integers(0, 256, 256 << 10, dtype=np.uint8)
          for i in range(24)]
with CacheClient(endpoint) as client:
    if op == "put":
        result = client.put(keys, blocks)
        print(json.dumps({"stored": result.stored}))
    else:
        outs = [np.zeros(256 << 10, np.uint8) for _ in range(24)]
        served = client.get_into(keys, outs)
        same = all(np.array_equal(a, b) for a, b in zip(outs[:served], blocks))
        print(json.dumps({"served": served, "same": same}))
"""


def _keys_and_blocks(seed: int) -> tuple[list[bytes], list[np.ndarray]]:
    keys = chain_keys(Namespace(model="m"), list(range(seed, seed + 16 * COUNT)), 16)
    blocks = [
        np.random.default_rng(seed + i).integers(0, 256, BLOCK, dtype=np.uint8)
        for i in range(COUNT)
    ]
    return keys, blocks


def _fallback(daemon: DaemonProcess, op: str, seed: int) -> dict[str, object]:
    env = {**ENV, "SHOAL_NATIVE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK, daemon.endpoint, op, str(seed)],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.mark.skipif(not checksums.IMPLEMENTATION.startswith("native"), reason="no C extension")
def test_blocks_cross_between_the_native_and_the_fallback_implementations(
    daemon: DaemonProcess,
) -> None:
    # fallback writes, native reads
    assert _fallback(daemon, "put", 1000) == {"stored": COUNT}
    keys, blocks = _keys_and_blocks(1000)
    outs = [np.zeros(BLOCK, np.uint8) for _ in range(COUNT)]
    with daemon.client() as client:
        assert client.get_into(keys, outs) == COUNT
        assert all(np.array_equal(a, b) for a, b in zip(outs, blocks, strict=True))
        # native writes, fallback reads
        keys, blocks = _keys_and_blocks(5000)
        assert client.put(keys, blocks).stored == COUNT
    assert _fallback(daemon, "get", 5000) == {"served": COUNT, "same": True}


@pytest.mark.parametrize("native", [True, False], ids=["native", "fallback"])
def test_a_block_corrupted_at_rest_is_a_miss_from_there_on(
    daemon: DaemonProcess, native: bool
) -> None:
    seed = 9000 if native else 9500
    keys, blocks = _keys_and_blocks(seed)
    with daemon.client() as client:
        assert client.put(keys, blocks).stored == COUNT
        (view,) = client.get([keys[10]])
        assert view is not None
        arena = client.arena_memory()
        offset = view.offset
        client.release([view])
        arena_bytes = np.frombuffer(arena, np.uint8)
        arena_bytes[offset + 12345] ^= 0xFF  # a bit flip in block 10, at rest
    if native:
        outs = [np.zeros(BLOCK, np.uint8) for _ in range(COUNT)]
        with daemon.client() as client:
            assert client.get_into(keys, outs) == 10
            assert all(np.array_equal(a, b) for a, b in zip(outs[:10], blocks, strict=False))
    else:
        result = _fallback(daemon, "get", seed)
        assert result == {"served": 10, "same": True}
    with daemon.client() as client:  # the reader deleted it: no one is served it again
        assert client.lookup(keys) == 10
