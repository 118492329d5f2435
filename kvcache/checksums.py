"""Block checksums, and copies that checksum the bytes they move in the same pass.

Every block carries the xxh3-64 (seed 0) of its payload: the writer computes it from the
bytes it put in the arena, and every reader, tier move and peer landing recomputes it from
the bytes it moved, so torn or corrupt bytes become a miss, never wrong data.

Two implementations give the same values:

* ``kvcache._copyhash`` (``kvcache/native/``, built by ``pip install`` where a C compiler
  is present): each 2-4 KiB chunk is hashed while it sits in L1 and streamed to the target
  with non-temporal stores, so a block crosses DRAM once, as in a large ``memcpy``. AVX2
  where the CPU has it, SSE2 otherwise; the GIL is released for calls over 64 KiB.
* the ``xxhash`` package (the fallback, or with ``SHOAL_NATIVE=0``): the copy and the hash
  in 256 KiB pieces, small enough to stay in L2 between the two passes.

Why two copy functions (they differ only in what a concurrent change of the source does):

``copy_checksum_source``  for writers (put, the connector's save): hashes the source as it
                          reads it. If the caller changes the source during the copy, the
                          arena may hold other bytes than were hashed: the block then fails
                          every reader's check and is a miss. No copy is spent on exactness.
``copy_checksum_exact``   for readers (get, load, tier moves, peer landing): hashes a private
                          copy of each chunk and writes that same copy to the target, so the
                          checksum is of exactly the bytes the target received, even if the
                          source (shared memory another process could write after a lease
                          broke) changes during the copy.

``IMPLEMENTATION`` names the one in use ("native-avx2", "native-generic" or "python");
the daemon logs it at start and ``bench/kvcache.py`` prints it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import xxhash

__all__ = [
    "IMPLEMENTATION",
    "block_checksum",
    "copy_checksum_exact",
    "copy_checksum_source",
]

# Fallback: copy and hash in pieces that stay in L2 between the two passes, so a block is
# read from DRAM once and hashing costs its in-cache time, not a second DRAM pass.
_PIECE = 256 << 10


def _python_checksum(data: Any) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _python_copy_checksum(source: memoryview, target: memoryview) -> int:
    """``target[:] = source``; the checksum of the bytes that landed in ``target``."""
    if len(source) != len(target):
        raise ValueError(f"source is {len(source)} bytes but target is {len(target)}")
    if len(source) <= _PIECE:
        target[:] = source
        return xxhash.xxh3_64_intdigest(target)
    hasher = xxhash.xxh3_64()
    for start in range(0, len(source), _PIECE):
        end = start + _PIECE
        target[start:end] = source[start:end]
        hasher.update(target[start:end])
    return hasher.intdigest()


def _load_native() -> Any:
    if os.environ.get("SHOAL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        from kvcache import _copyhash  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _copyhash


_native = _load_native()

block_checksum: Callable[[Any], int]
copy_checksum_source: Callable[[Any, Any], int]
copy_checksum_exact: Callable[[Any, Any], int]

if _native is not None:
    IMPLEMENTATION = f"native-{_native.KERNEL}"
    block_checksum = _native.checksum
    copy_checksum_source = _native.copy_checksum_source
    copy_checksum_exact = _native.copy_checksum_exact
else:
    IMPLEMENTATION = "python"
    block_checksum = _python_checksum
    copy_checksum_source = _python_copy_checksum
    copy_checksum_exact = _python_copy_checksum
