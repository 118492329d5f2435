"""A tier's eviction policy as the store drives it: sized in real blocks, updated lazily.

Two jobs, both about *when* and *for what size* the policy (``kvcache.eviction``) hears
of a tier's blocks:

1. Sizing. A policy's capacity (S3-FIFO's small-queue share and ghost, the default's
   miniature caches, ghost and protected share) is a count of blocks, but a tier knows
   bytes. The count is derived from the blocks the tier actually receives: a moving
   average of their sizes, rounded to the allocator's slot class, and how many such
   slots its slabs hold. It starts at 256 KiB blocks (one KV chunk of a small model)
   and is re-derived when the average moves the count by more than a quarter, so a
   1 GiB tier holding 32 MiB blocks is a 32-block cache, not a 4,096-block one.
   Rejected: sizing once from the config (the block size is the engines' choice, not
   the daemon's) and sizing per namespace (a tier is one cache, whatever mix it holds).
2. Deferred bookkeeping. ``insert``/``touch``/``remove`` are recorded and applied in
   order before any ``pop_victim``, ``len`` or resize, so every decision sees exactly the
   state an eager policy would; the policy's own cost (several microseconds a block for
   the default) moves off the request path into idle time (``flush``). Measured: it
   was most of a commit's cost.
"""

from __future__ import annotations

from collections.abc import Callable

from kvcache.allocator import SlabAllocator, size_class
from kvcache.eviction import EvictionPolicy, make_policy

__all__ = ["TierPolicy"]

INITIAL_BLOCK_BYTES = 256 << 10
_INSERT, _TOUCH, _REMOVE = 0, 1, 2


class TierPolicy:
    """One tier's policy, sized by the blocks it receives, with deferred updates."""

    __slots__ = ("_block_bytes", "_blocks_at", "_num_slabs", "_observed", "_pending",
                 "_slab_bytes", "capacity_blocks", "policy")  # fmt: skip
    _MAX_PENDING = 1 << 16
    _WEIGHT = 1 / 16  # of the newest block in the moving average of sizes

    def __init__(self, name: str, allocator: SlabAllocator) -> None:
        self._slab_bytes = allocator.slab_bytes
        self._num_slabs = max(1, allocator.capacity_bytes // allocator.slab_bytes)
        self._block_bytes = float(min(INITIAL_BLOCK_BYTES, self._slab_bytes))
        self._observed = False
        self._blocks_at = (0, 0)  # (pages, _blocks_of them) last computed
        self.capacity_blocks = self._blocks_of(self._block_bytes)
        self.policy: EvictionPolicy[bytes] = make_policy(name, self.capacity_blocks)
        self._pending: list[tuple[int, bytes, bytes | None]] = []

    def _blocks_of(self, block_bytes: float) -> int:
        # To the nearest page first: an average a few bytes above a power of two (it
        # decays towards the new size) must not round up to the next slot class.
        pages = max(1, round(block_bytes / 4096))
        if self._blocks_at[0] == pages:  # the average rarely leaves its page: every
            return self._blocks_at[1]  # commit asks (issue 17: ~1 us a block otherwise)
        slot = size_class(min(pages * 4096, self._slab_bytes))
        blocks = max(1, self._num_slabs * max(1, self._slab_bytes // slot))
        self._blocks_at = (pages, blocks)
        return blocks

    def insert(self, key: bytes, parent: bytes | None, nbytes: int) -> None:
        self._observe(nbytes)
        self._record(_INSERT, key, parent)

    def touch(self, key: bytes) -> None:
        self._record(_TOUCH, key, None)

    def remove(self, key: bytes) -> None:
        self._record(_REMOVE, key, None)

    def _observe(self, nbytes: int) -> None:
        if self._observed:
            self._block_bytes += (nbytes - self._block_bytes) * self._WEIGHT
        else:  # the first real block replaces the guess outright
            self._block_bytes, self._observed = float(nbytes), True
        blocks = self._blocks_of(self._block_bytes)
        current = self.capacity_blocks
        if 4 * blocks < 3 * current or 4 * blocks > 5 * current:
            self.flush()
            self.policy.resize(blocks)
            self.capacity_blocks = blocks

    def _record(self, op: int, key: bytes, parent: bytes | None) -> None:
        self._pending.append((op, key, parent))
        if len(self._pending) >= self._MAX_PENDING:
            self.flush()

    def flush(self, limit: int | None = None) -> bool:
        """Apply the oldest ``limit`` (default: all) records; True if more remain."""
        if limit is None or limit >= len(self._pending):
            pending, self._pending = self._pending, []
        else:
            pending, self._pending = self._pending[:limit], self._pending[limit:]
        insert, touch, remove = self.policy.insert, self.policy.touch, self.policy.remove
        for op, key, parent in pending:
            if op == _INSERT:
                insert(key, parent)
            elif op == _TOUCH:
                touch(key)
            else:
                remove(key)
        return bool(self._pending)

    def pop_victim(self, is_pinned: Callable[[bytes], bool]) -> bytes | None:
        self.flush()
        return self.policy.pop_victim(is_pinned)

    def __len__(self) -> int:
        self.flush()
        return len(self.policy)
