"""A block in flight between a memory tier and a file tier, and the bytes work of moving it.

The store (``kvcache.store``) owns the metadata; this module holds the record of one move
and the two jobs that run on an I/O worker (``kvcache.io_workers``). Two kinds::

    DEMOTE   memory tier -> file tier (DRAM -> SSD on pressure)
             on the loop: copy the block into a page-aligned staging buffer (a memcpy,
             verified), free the memory slot, point the block at its file slot;
             on a worker: write the staging buffer to the file slot.
             While in flight the block is visible and served *from the staging buffer*
             (a memory copy on the loop); the write's completion then frees the file slot.
    PROMOTE  file tier -> SHM (a read of an SSD block)
             on the loop: reserve an SHM slot for it; on a worker: read the file slot
             into it and verify the checksum. While in flight the block stays visible at
             its file slot; a reader waits for the completion (the daemon parks its
             request and answers when the move lands).

A third kind of file I/O is not a move: a peer's read of a block leased where it lies
(``read_job``, ``BlockStore.read_leased``) copies the file slot into the peer's buffer,
verified; the lease, not a ``Move``, keeps the slot allocated meanwhile.

Invariants (the store checks them; tests/unit/test_store.py drives them):

1. A slot a worker reads or writes is freed only by that move's completion, whatever
   happens to the block meanwhile (delete, flush, a promote from staging).
2. A moving block is pinned: never an eviction victim, so its slots cannot be reused.
3. A move commits (the block's tier/offset become the target) only if, at completion,
   the block is still in the store and still this move's; otherwise its slots are freed.
4. Corrupt or unreadable bytes never become visible: a failed promotion frees the SHM
   slot it filled and drops the block (a miss, counted).
"""

from __future__ import annotations

import enum
import mmap
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvcache.errors import CorruptBlock
from kvcache.tiers import MemoryBacking, Tier, TierStore, block_checksum, padded

if TYPE_CHECKING:
    from kvcache.store_entries import Entry

__all__ = ["Move", "MoveKind", "promotion_job", "read_job", "stage", "write_job"]


class MoveKind(enum.IntEnum):
    DEMOTE = 0
    PROMOTE = 1


class Move:
    """One block in flight; ``waiters`` run once it completes (success or not)."""

    __slots__ = ("committed", "entry", "finished", "kind", "source", "staging", "target",
                 "view", "waiters")  # fmt: skip

    def __init__(
        self,
        entry: Entry,
        kind: MoveKind,
        source: tuple[Tier, int],
        target: tuple[Tier, int],
        staging: mmap.mmap | None = None,
    ) -> None:
        self.entry = entry
        self.kind = kind
        self.source = source
        self.target = target
        self.staging = staging
        self.view = memoryview(staging) if staging is not None else None
        self.finished = False
        self.committed = False  # a promotion that landed (the block is in SHM now)
        self.waiters: list[Callable[[], None]] = []

    def release_staging(self) -> None:
        if self.view is not None:
            self.view.release()
            self.view = None
        if self.staging is not None:
            self.staging.close()
            self.staging = None


def stage(source: TierStore, offset: int, nbytes: int, checksum: int) -> mmap.mmap:
    """Copy a block out of a memory tier into a page-aligned buffer, verified.

    Raises ``CorruptBlock`` if the bytes do not match their checksum.
    """
    assert isinstance(source.backing, MemoryBacking), "staging copies from memory tiers"
    staging = mmap.mmap(-1, padded(nbytes))  # anonymous: page aligned, for O_DIRECT
    with memoryview(staging) as view:
        view[:nbytes] = source.backing.view(offset, nbytes)
        found = block_checksum(view[:nbytes])
    if found != checksum:
        staging.close()
        raise CorruptBlock(f"checksum mismatch in {source.tier.label} at offset {offset}")
    return staging


def write_job(target: TierStore, offset: int, move: Move) -> Callable[[], None]:
    view = move.view
    assert view is not None, "a demotion writes its staging buffer"

    def job() -> None:
        target.backing.write(offset, view)

    return job


def promotion_job(
    source: TierStore, offset: int, shm: TierStore, shm_offset: int, nbytes: int, checksum: int
) -> Callable[[], None]:
    """Read a file slot into an SHM slot (padded to the page for O_DIRECT) and verify it."""
    assert isinstance(shm.backing, MemoryBacking), "promotions land in the arena"
    slot = shm.backing.view(shm_offset, padded(nbytes))

    def job() -> None:
        source.backing.read_into(offset, slot)
        if block_checksum(slot[:nbytes]) != checksum:
            raise CorruptBlock(f"checksum mismatch in {source.tier.label} at offset {offset}")

    return job


def read_job(
    source: TierStore, offset: int, out: memoryview, nbytes: int, checksum: int
) -> Callable[[], None]:
    """Read a file slot into ``out`` (page aligned, ``padded(nbytes)`` long, for O_DIRECT)
    and verify its first ``nbytes``: a peer's read of a block leased where it lies."""
    assert len(out) >= padded(nbytes), "a direct read fills whole pages"

    def job() -> None:
        source.backing.read_into(offset, out[: padded(nbytes)])
        if block_checksum(out[:nbytes]) != checksum:
            raise CorruptBlock(f"checksum mismatch in {source.tier.label} at offset {offset}")

    return job
