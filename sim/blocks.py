"""The simulated KV cache: a fixed pool of blocks and the prefix cache over them.

Invariant: block 0 is vLLM's *null block* (``BlockPool.null_block``, taken out of the free
queue at start and never handed to a request), so ``num_blocks`` blocks hold
``num_blocks - 1`` usable ones, as a vLLM engine given ``--num-gpu-blocks-override``
``num_blocks`` does. Every other block is either *in use* (``ref_count > 0``, held by
running requests) or *free* (in ``_free``, an LRU queue: allocation takes the oldest). A
free block may still be *cached*: it keeps its hash in ``_cached`` until it is allocated
again, and a prefix hit on it takes it back out of the free queue. So "free" counts cached
blocks, and ``usage`` = 1 - free / (num_blocks - 1), as vLLM's ``BlockPool.get_usage``
(``vllm:kv_cache_usage_perc``): 0 on an idle engine, whatever it has cached.

Block hashes chain like vLLM's (``vllm/v1/core/kv_cache_utils.py``): a full block's hash is
sha256 over (parent hash, the block's token ids, the LoRA name), so equal hashes mean an
equal whole prefix under the same adapter. Only full blocks are hashed and cached. The
hash vLLM publishes in KV events is its low 64 bits as an int (vLLM's default,
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``); ``external_hash`` computes it.

Like vLLM the pool may cache two blocks with the same hash (two requests computing one
prefix in the same steps), and evicting either publishes ``BlockRemoved`` for the hash.
Events are appended as data (``take_events``); the engine publishes them once per step.

Rejected: a deque for the free queue (taking a cached block out of the middle on a hit
must be O(1): an ``OrderedDict`` gives that, as vLLM's linked ``FreeKVCacheBlockQueue``).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AllCleared",
    "BlockPool",
    "CacheEvent",
    "Removed",
    "Stored",
    "block_hash",
    "external_hash",
]

_ROOT = hashlib.sha256(b"shoal-sim root").digest()


def block_hash(parent: bytes | None, token_ids: Sequence[int], lora_name: str | None) -> bytes:
    """The chained hash of one full block (see the module docstring)."""
    h = hashlib.sha256(parent or _ROOT)
    h.update(b"".join(int(t).to_bytes(4, "big") for t in token_ids))
    if lora_name:
        h.update(b"\x00lora\x00" + lora_name.encode())
    return h.digest()


def external_hash(digest: bytes) -> int:
    """The 64-bit int vLLM publishes for a block hash (its low 8 bytes, big-endian)."""
    return int.from_bytes(digest, "big") & ((1 << 64) - 1)


@dataclass(frozen=True, slots=True)
class Stored:
    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None
    lora_name: str | None


@dataclass(frozen=True, slots=True)
class Removed:
    block_hashes: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class AllCleared:
    pass


CacheEvent = Stored | Removed | AllCleared


class _Block:
    __slots__ = ("block_id", "hash", "ref_count")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None


class BlockPool:
    """``num_blocks`` blocks of ``block_size`` tokens, and the prefix cache over them."""

    def __init__(self, num_blocks: int, block_size: int, *, caching: bool = True) -> None:
        assert num_blocks > 1 and block_size > 0, "the engine checks the flags"
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Block 0 is the null block (see the module docstring).
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self._cached: dict[bytes, dict[int, _Block]] = {}
        self._events: list[CacheEvent] = []

    # -- queries --------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        """Blocks a request can hold: all but the null block."""
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_usable

    @property
    def num_cached(self) -> int:
        return sum(len(blocks) for blocks in self._cached.values())

    def longest_hit(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest cached prefix of ``hashes`` (not yet taken)."""
        found: list[int] = []
        if not self.caching:
            return found
        for digest in hashes:
            blocks = self._cached.get(digest)
            if not blocks:
                break
            found.append(next(iter(blocks)))
        return found

    # -- changes --------------------------------------------------------------------

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take cached blocks for a request (a prefix hit)."""
        for block_id in block_ids:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def allocate(self, count: int) -> list[int] | None:
        """``count`` fresh blocks, evicting the least recently freed cached ones; ``None``
        (and nothing taken) when fewer than ``count`` are free."""
        if count > len(self._free):
            return None
        taken = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self._blocks[block_id]
            self._evict(block)
            block.ref_count = 1
            taken.append(block_id)
        return taken

    def free(self, block_ids: Sequence[int]) -> None:
        """Release a request's blocks, last block first (so it is evicted first)."""
        for block_id in reversed(block_ids):
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed twice"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def cache(
        self,
        block_ids: Sequence[int],
        hashes: Sequence[bytes],
        parent: bytes | None,
        token_ids: Sequence[int],
        lora: tuple[int, str] | None,
    ) -> None:
        """Mark full, computed blocks as cached under ``hashes``; one ``Stored`` event."""
        if not self.caching or not block_ids:
            return
        assert len(block_ids) == len(hashes), "one hash per block"
        for block_id, digest in zip(block_ids, hashes, strict=True):
            block = self._blocks[block_id]
            assert block.hash is None, f"block {block_id} cached twice"
            block.hash = digest
            self._cached.setdefault(digest, {})[block_id] = block
        self._events.append(
            Stored(
                tuple(hashes),
                parent,
                tuple(token_ids),
                self.block_size,
                lora[0] if lora else None,
                lora[1] if lora else None,
            )
        )

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (vLLM's /reset_prefix_cache); False while any block is
        in use, as vLLM refuses then."""
        if len(self._free) != self.num_usable:
            return False
        for block in self._blocks:
            block.hash = None
        self._cached.clear()
        self._events.append(AllCleared())
        return True

    def take_events(self) -> list[CacheEvent]:
        events, self._events = self._events, []
        return events

    def _evict(self, block: _Block) -> None:
        if block.hash is None:
            return
        blocks = self._cached[block.hash]
        del blocks[block.block_id]
        if not blocks:
            del self._cached[block.hash]
        self._events.append(Removed((block.hash,)))
        block.hash = None
