"""Storage tiers: where a block's bytes live (shared memory, DRAM, SSD) and how they move.

A tier is a ``SlabAllocator`` (offsets) over a ``Backing`` (bytes)::

    TierStore(SHM)  = allocator + MemoryBacking(mmap of the /dev/shm arena)   engines map it
    TierStore(DRAM) = allocator + MemoryBacking(anonymous mmap)               daemon-private
    TierStore(SSD)  = allocator + FileBacking(one file, posix_fallocate'd)     daemon-private

The metadata of which block sits where belongs to ``kvcache.store``; this module only
moves bytes, and does file I/O for the SSD tier (which the daemon runs on its I/O
workers, ``kvcache.io_workers``, never on its request loop). Every move between tiers
recomputes the block checksum (xxh3-64, ~10x faster than a memcpy, so verifying costs
little) and a mismatch is a ``CorruptBlock`` the store turns into a miss: wrong bytes
are never served. (They may land in the target slot first, when copying and hashing in
one pass is what makes the check cheap; the slot is then freed, never published.)

The spill file is allocated up front (``posix_fallocate``: ENOSPC at start, not as a
lost block later) and written and read with ``O_DIRECT`` where the filesystem allows it,
so spilled blocks do not also sit in the page cache, competing with the DRAM tier they
were demoted from. Direct I/O needs page-aligned offsets, lengths and buffers: slots and
arena views are page aligned and the store pads lengths to the page (``padded``);
anything else falls back to buffered I/O on a second descriptor.

Each backing is a Protocol with a memory and a file implementation; an anonymous
mmap (not a bytearray) backs DRAM so pages are only touched once used and the tier can be
larger than what is ever filled.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import mmap
import os
from pathlib import Path
from typing import Protocol

from kvcache.allocator import AllocatorStats, SlabAllocator
from kvcache.checksums import block_checksum, copy_checksum_exact
from kvcache.errors import CorruptBlock

__all__ = [
    "Backing",
    "FileBacking",
    "MemoryBacking",
    "Tier",
    "TierStore",
    "block_checksum",
    "copy_hashing_target",
    "padded",
]

PAGE = 4096


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to a page: the length of a direct-I/O transfer of a block
    (a slot always has room for it: slots are page multiples)."""
    return -(-nbytes // PAGE) * PAGE


# The checksum and the one-pass copy live in kvcache.checksums (compiled where possible);
# tier moves read one tier and write another: the checksum is of the bytes that landed.
copy_hashing_target = copy_checksum_exact


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
    """Bytes in one preallocated file (the SSD spill tier); positional I/O only, safe to
    call from several threads at once (pread/pwrite on distinct slots)."""

    def __init__(self, path: Path, nbytes: int, *, direct: bool = True) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._direct_fd = -1
        try:
            try:
                os.posix_fallocate(self._fd, 0, nbytes)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise  # ENOSPC: the spill tier cannot have its size; say so at start
                os.ftruncate(self._fd, nbytes)  # no fallocate here: sparse, as before
            if direct:
                try:
                    self._direct_fd = os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0))
                except OSError as exc:  # tmpfs and some others refuse O_DIRECT
                    if exc.errno != errno.EINVAL:
                        raise
        except BaseException:
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise

    @property
    def direct(self) -> bool:
        return self._direct_fd >= 0

    def _fd_for(self, offset: int, nbytes: int) -> int:
        aligned = self._direct_fd >= 0 and not offset % PAGE and not nbytes % PAGE
        return self._direct_fd if aligned else self._fd

    def write(self, offset: int, data: memoryview) -> None:
        try:
            written = os.pwrite(self._fd_for(offset, len(data)), data, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            written = os.pwrite(self._fd, data, offset)  # an unaligned buffer address
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes")

    def read_into(self, offset: int, out: memoryview) -> None:
        try:
            got = os.preadv(self._fd_for(offset, len(out)), [out], offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            got = os.preadv(self._fd, [out], offset)
        if got != len(out):
            raise OSError(f"short read from {self.path}: {got} of {len(out)} bytes")

    def close(self) -> None:
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
        os.close(self._fd)
        self.path.unlink(missing_ok=True)


class TierStore:
    """One tier: allocation plus byte movement, with checksums on every crossing."""

    def __init__(self, tier: Tier, allocator: SlabAllocator, backing: Backing) -> None:
        self.tier = tier
        self.allocator = allocator
        self.backing = backing

    @property
    def in_memory(self) -> bool:
        """Moves to and from this tier are memory copies (else file I/O: off the loop)."""
        return isinstance(self.backing, MemoryBacking)

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
        # Memory->memory copies hash what landed (one pass), so corrupt bytes may sit in
        # the target slot; the caller frees it on CorruptBlock, and nothing points at it.
        if found != checksum:
            raise CorruptBlock(f"checksum mismatch in {self.tier.label} at offset {offset}")
        if not landed:
            sink.write(target_offset, data)

    def close(self) -> None:
        self.backing.close()
