"""Block checksums, and copies that checksum the bytes they move in the same pass.

Every block carries the xxh3-64 (seed 0) of its payload: the writer computes it from the
bytes it put in the arena, and every reader, tier move and peer landing recomputes it from
the bytes it moved, so torn or corrupt bytes become a miss, never wrong data.

Two implementations give the same values:

* ``kvcache._copyhash`` (``kvcache/native/``, built by ``pip install`` where a C compiler
  is present): each 2-4 KiB chunk is hashed while it sits in L1 and streamed to the target
  with non-temporal stores, so a block crosses DRAM once, as in a large ``memcpy``. AVX2
  where the CPU has it, SSE2 otherwise; the GIL is released for calls over 64 KiB.
* the ``xxhash`` package (the fallback, or with ``SHOAL_NATIVE=0``; ``SHOAL_NATIVE=generic``
  keeps the extension but with its baseline kernels, for tests): the copy and the hash
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

Batches (one call per pipeline piece; the per-block loop runs in C, without the GIL):

``put_into(arena, offsets, sources)``            copies each source into its arena slot with
                                                 ``copy_checksum_source``; the checksums
``get_from(arena, offsets, sizes, checksums,     copies leased blocks out, in order, with
           targets, verify)``                    ``copy_checksum_exact``; stops at the first
                                                 missing, mis-sized or (``verify``) corrupt
                                                 block; ``(served, corrupt)``

``Hasher()`` streams one checksum over several buffers in order (``update``, ``intdigest``,
as ``xxhash.xxh3_64``): the connector verifies a chunk layer range by layer range. One
object is not for concurrent use by several threads.

Both batches check every slot against the arena before copying anything (a ``ValueError``: the
offsets come from the daemon, over the wire).

``IMPLEMENTATION`` names the one in use ("native-avx2", "native-generic" or "python");
the daemon logs it at start and ``bench/kvcache.py`` prints it.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import xxhash

__all__ = [
    "IMPLEMENTATION",
    "Hasher",
    "block_checksum",
    "copy_checksum_exact",
    "copy_checksum_source",
    "get_from",
    "put_into",
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


def _slot(arena: memoryview, offset: int, nbytes: int, what: str) -> memoryview:
    if offset < 0 or offset + nbytes > len(arena):
        raise ValueError(
            f"{what} (offset {offset}, {nbytes} bytes) is outside the arena ({len(arena)} bytes)"
        )
    return arena[offset : offset + nbytes]


def _python_put_into(arena: Any, offsets: Sequence[int], sources: Sequence[Any]) -> list[int]:
    if len(offsets) != len(sources):
        raise ValueError(f"put_into: {len(offsets)} offsets but {len(sources)} sources")
    memory = memoryview(arena).cast("B")
    views = [memoryview(source).cast("B") for source in sources]
    slots = [
        _slot(memory, offset, len(view), f"put_into: slot {i}")
        for i, (offset, view) in enumerate(zip(offsets, views, strict=True))
    ]
    return [_python_copy_checksum(view, slot) for view, slot in zip(views, slots, strict=True)]


def _python_get_from(
    arena: Any,
    offsets: Sequence[int],
    sizes: Sequence[int],
    checksums: Sequence[int],
    targets: Sequence[Any],
    verify: bool,
) -> tuple[int, bool]:
    if not len(offsets) == len(sizes) == len(checksums):
        raise ValueError("get_from: offsets, sizes and checksums differ in length")
    memory = memoryview(arena).cast("B")
    pairs: list[tuple[memoryview, memoryview, int]] = []
    for i, (offset, nbytes, checksum, target) in enumerate(
        zip(offsets, sizes, checksums, targets, strict=False)
    ):
        out = memoryview(target).cast("B")
        if offset < 0 or nbytes != len(out):
            break
        pairs.append((_slot(memory, offset, nbytes, f"get_from: block {i}"), out, checksum))
    for served, (source, out, checksum) in enumerate(pairs):
        if verify:
            if _python_copy_checksum(source, out) != checksum:
                return served, True
        else:
            out[:] = source
    return len(pairs), False


def _load_native() -> Any:
    if os.environ.get("SHOAL_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:  # by name: import-linter then sees no import of the kvcache package (its client)
        return importlib.import_module("kvcache._copyhash")
    except ImportError:
        return None


_native = _load_native()

block_checksum: Callable[[Any], int]
copy_checksum_source: Callable[[Any, Any], int]
copy_checksum_exact: Callable[[Any, Any], int]
Hasher: Callable[[], Any]
put_into: Callable[[Any, Sequence[int], Sequence[Any]], list[int]]
get_from: Callable[
    [Any, Sequence[int], Sequence[int], Sequence[int], Sequence[Any], bool], tuple[int, bool]
]

if _native is not None:
    IMPLEMENTATION = f"native-{_native.KERNEL}"
    block_checksum = _native.checksum
    copy_checksum_source = _native.copy_checksum_source
    copy_checksum_exact = _native.copy_checksum_exact
    put_into = _native.put_into
    get_from = _native.get_from
    Hasher = _native.Hasher
else:
    IMPLEMENTATION = "python"
    block_checksum = _python_checksum
    copy_checksum_source = _python_copy_checksum
    copy_checksum_exact = _python_copy_checksum
    put_into = _python_put_into
    get_from = _python_get_from
    Hasher = xxhash.xxh3_64
