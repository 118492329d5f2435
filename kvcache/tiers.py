"""Storage tiers: where a block's bytes live (shared memory, DRAM, SSD) and how they move.

A tier is a ``SlabAllocator`` (offsets) over a ``Backing`` (bytes)::

    TierStore(SHM)  = allocator + MemoryBacking(mmap of the /dev/shm arena)   engines map it
    TierStore(DRAM) = allocator + MemoryBacking(anonymous mmap)               daemon-private
    TierStore(SSD)  = allocator + FileBacking(one preallocated file)          daemon-private

The metadata of which block sits where belongs to ``kvcache.store``; this module only
moves bytes. Every move between tiers recomputes the block checksum (xxh3-64, ~10x
faster than a memcpy, so verifying costs little) and a mismatch is a ``CorruptBlock``
the store turns into a miss: wrong bytes are never promoted.

Each backing is a Protocol with a memory and a file implementation; an anonymous
mmap (not a bytearray) backs DRAM so pages are only touched once used and the tier can be
larger than what is ever filled.
"""

from __future__ import annotations

import contextlib
import enum
import mmap
import os
from pathlib import Path
from typing import Protocol

import xxhash

from kvcache.allocator import AllocatorStats, SlabAllocator
from kvcache.errors import CorruptBlock

__all__ = [
    "Backing",
    "FileBacking",
    "MemoryBacking",
    "Tier",
    "TierStore",
    "block_checksum",
    "copy_hashing_target",
]


def block_checksum(data: bytes | bytearray | memoryview) -> int:
    """The integrity checksum every block carries: xxh3-64 of its payload."""
    return xxhash.xxh3_64_intdigest(data)


# Copy and hash in pieces small enough to stay in L2 between the two passes, so a block is
# read from DRAM once: hashing then costs its (fast) in-cache time, not a second DRAM pass.
_PIECE = 256 << 10


def copy_hashing_target(source: memoryview, target: memoryview) -> int:
    """``target[:] = source``; returns the checksum of the bytes that landed (reader's side)."""
    if len(source) <= _PIECE:
        target[:] = source
        return xxhash.xxh3_64_intdigest(target)
    hasher = xxhash.xxh3_64()
    for start in range(0, len(source), _PIECE):
        end = start + _PIECE
        target[start:end] = source[start:end]
        hasher.update(target[start:end])
    return hasher.intdigest()


class Tier(enum.IntEnum):
    SHM = 0
    DRAM = 1
    SSD = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Backing(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...
    def read_into(self, offset: int, out: memoryview) -> None: ...
    def close(self) -> None: ...


class MemoryBacking:
    """Bytes in a mapping: the shared arena or anonymous daemon memory."""

    def __init__(self, buffer: mmap.mmap, base: int = 0) -> None:
        self._mmap = buffer
        self._view = memoryview(buffer)[base:]

    @classmethod
    def anonymous(cls, nbytes: int) -> MemoryBacking:
        return cls(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))

    def view(self, offset: int, nbytes: int) -> memoryview:
        return self._view[offset : offset + nbytes]

    def write(self, offset: int, data: memoryview) -> None:
        self._view[offset : offset + len(data)] = data

    def read_into(self, offset: int, out: memoryview) -> None:
        out[:] = self._view[offset : offset + len(out)]

    def close(self) -> None:
        self._view.release()
        # A zero-copy frame (peer fetch) may still reference the mapping in ZeroMQ's
        # queue; it is unmapped when that last reference goes, which is moments away.
        with contextlib.suppress(BufferError):
            self._mmap.close()


class FileBacking:
    """Bytes in one preallocated file (the SSD spill tier); positional I/O only."""

    def __init__(self, path: Path, nbytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, nbytes)

    def write(self, offset: int, data: memoryview) -> None:
        written = os.pwrite(self._fd, data, offset)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def read_into(self, offset: int, out: memoryview) -> None:
        got = os.preadv(self._fd, [out], offset)
        if got != len(out):
            raise OSError(f"short read from {self.path}: {got} of {len(out)} bytes")

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class TierStore:
    """One tier: allocation plus byte movement, with checksums on every crossing."""

    def __init__(self, tier: Tier, allocator: SlabAllocator, backing: Backing) -> None:
        self.tier = tier
        self.allocator = allocator
        self.backing = backing

    def try_allocate(self, nbytes: int) -> int | None:
        return self.allocator.try_allocate(nbytes)

    def free(self, offset: int) -> None:
        self.allocator.free(offset)

    def statistics(self) -> AllocatorStats:
        return self.allocator.statistics()

    def copy_to(
        self, offset: int, nbytes: int, checksum: int, target: TierStore, target_offset: int
    ) -> None:
        """Copy a block to ``target``, verifying it; raises ``CorruptBlock`` on mismatch."""
        source, sink = self.backing, target.backing
        landed = False  # are the bytes already in the target slot?
        if isinstance(source, MemoryBacking) and isinstance(sink, MemoryBacking):
            data = sink.view(target_offset, nbytes)
            found = copy_hashing_target(source.view(offset, nbytes), data)
            landed = True
        else:
            if isinstance(source, MemoryBacking):
                data = source.view(offset, nbytes)
            elif isinstance(sink, MemoryBacking):  # file -> memory: read into the slot itself
                data = sink.view(target_offset, nbytes)
                source.read_into(offset, data)
                landed = True
            else:
                data = memoryview(bytearray(nbytes))
                source.read_into(offset, data)
            found = block_checksum(data)
        if found != checksum:  # verified before a write: corrupt bytes never reach the target
            raise CorruptBlock(f"checksum mismatch in {self.tier.label} at offset {offset}")
        if not landed:
            sink.write(target_offset, data)

    def close(self) -> None:
        self.backing.close()
