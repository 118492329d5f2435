"""Which Shoal chunk keys an engine holds on its GPU, learned from vLLM's block events.

Invariant: a Shoal key is *resident* exactly while at least one *path* for it is live,
and a path is live while every vLLM block holding a token of that chunk (in the chain
that produced it) is stored and not removed since. The tracker reports each key once as
it becomes resident and once as it stops being so (``take_events``).

How a vLLM block becomes Shoal keys. A ``BlockStored`` names each block's parent, so a
block's place in its chain is known from its parent's record, and its tokens extend the
parent's unfinished Shoal chunk::

    Shoal chunks (C = 32)  |<------- key K0 ------->|<------- key K1 ------->|
    vLLM blocks  (B = 16)  [  h0  ][  h1  ]          [  h2  ][  h3  ]
    records                 tail=16 tail=0, K0 done   tail=16 tail=0, K1 done
                                    chunk_parent=K0                chunk_parent=K1

    K_j = chain_keys(namespace, tail(parent) + tokens(block), C, chunk_parent(parent))

exactly as an engine-side client computes them from the prompt, so equal prefixes give
equal keys. A block whose tail reaches C completes the chunk; the path of that key is
the completing block plus the ancestors holding the chunk's other tokens. Any C and B
work (C < B completes several keys per block; C not a multiple of B shares a block
between two chunks); the keys match an engine's own only when the chunk grid starts at
token 0 as it does in vLLM, which holds for every chain rooted at a block with no parent.

Not mapped, each counted by reason and never guessed: blocks with a LoRA adapter
(``lora``) or per-block extra keys (``extra_keys``: multimodal inputs, cache salt), whose
KV differs from plain tokens', and every descendant of one (``tainted``); blocks of
another medium (``medium``: vLLM's CPU offload tier) or KV-cache group (``group``); a
block whose parent was never seen or was removed (``unknown_parent``: the subscriber
joined late, or the parent was evicted first), and an event whose token count is not
``len(block_hashes) * block_size`` (``inconsistent``, e.g. sliding-window null blocks).

Removal: removing a vLLM block kills every path it is part of, so the chunk holding it
stops being resident even while other blocks of that chunk stay. A block stored again
(vLLM re-announces prefix-cache hits) rebuilds the paths it completes.

Rejected: one residency bit per vLLM block and a key resident when its last block is
(wrong when vLLM evicts a block from the middle of a chain, which its free queue allows);
keeping removed blocks' records (memory would grow with everything ever seen).
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvcache.cluster.engine_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    EngineEvent,
)
from kvcache.cluster.messages import CLEARED_KEY, OP_CLEARED, OP_ON_GPU, OP_REMOVED
from kvcache.keys import BlockKey, Namespace, chain_keys

__all__ = ["GpuPrefixTracker", "TrackerStats"]

_GPU = "GPU"


@dataclass(slots=True, eq=False)
class _Path:
    key: bytes
    live: bool = True


@dataclass(slots=True, eq=False)
class _Block:
    parent: BlockHash | None
    end: int  # tokens from the chain's root through this block
    chunk_parent: BlockKey | None  # key of the last Shoal chunk completed at or before end
    tail: array[int]  # tokens after that chunk, up to end
    completes: tuple[tuple[bytes, int], ...]  # (key, chunk start) of chunks ending here
    paths: list[_Path] = field(default_factory=list)  # paths this block is part of


@dataclass(frozen=True, slots=True)
class TrackerStats:
    num_blocks: int  # vLLM blocks placed
    num_keys: int  # Shoal keys resident
    skipped: dict[str, int]  # blocks not mapped, by reason, since the start


class GpuPrefixTracker:
    """vLLM block hashes → resident Shoal chunk keys of one engine (pure, single-threaded).

    ``group_idx``: the KV-cache group whose blocks are tracked (events without one count
    as group 0).
    """

    def __init__(self, namespace: Namespace | bytes, chunk_tokens: int, *, group_idx: int = 0):
        if chunk_tokens <= 0:
            raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
        self._namespace = namespace.digest if isinstance(namespace, Namespace) else namespace
        self._chunk = chunk_tokens
        self._group = group_idx
        self._blocks: dict[BlockHash, _Block] = {}
        self._tainted: set[BlockHash] = set()  # LoRA / extra-keyed blocks and their children
        self._refs: dict[bytes, int] = {}  # resident key -> live paths
        self._events: list[tuple[int, bytes]] = []
        self._skipped: Counter[str] = Counter()
        self._skipped_new: Counter[str] = Counter()  # since the last take_skipped

    # -- inputs ---------------------------------------------------------------------------

    def apply(self, events: Iterable[EngineEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._stored(event)
            elif isinstance(event, BlockRemoved):
                self._removed(event)
            else:
                assert isinstance(event, AllBlocksCleared), f"unhandled event {event!r}"
                self.clear()

    def clear(self) -> None:
        """Forget everything (vLLM cleared its cache, or the stream cannot be trusted)."""
        self._blocks.clear()
        self._tainted.clear()
        self._refs.clear()
        self._events = [(OP_CLEARED, CLEARED_KEY)]

    # -- outputs --------------------------------------------------------------------------

    def take_events(self) -> list[tuple[int, bytes]]:
        """(op, key) changes since the last call: ``OP_ON_GPU``, ``OP_REMOVED``,
        ``OP_CLEARED`` (as ``kvcache.cluster.messages`` defines them for a stream)."""
        events, self._events = self._events, []
        return events

    def resident(self, key: bytes) -> bool:
        return key in self._refs

    def run_length(self, keys: Sequence[bytes]) -> int:
        """How many leading ``keys`` are resident."""
        for index, key in enumerate(keys):
            if key not in self._refs:
                return index
        return len(keys)

    def snapshot(self) -> list[bytes]:
        return list(self._refs)

    def statistics(self) -> TrackerStats:
        return TrackerStats(len(self._blocks), len(self._refs), dict(self._skipped))

    def take_skipped(self) -> dict[str, int]:
        """Blocks not mapped since the last call, by reason (for a metric)."""
        skipped, self._skipped_new = dict(self._skipped_new), Counter()
        return skipped

    # -- internals ------------------------------------------------------------------------

    def _skip(self, reason: str, count: int) -> None:
        self._skipped[reason] += count
        self._skipped_new[reason] += count

    def _stored(self, event: BlockStored) -> None:
        hashes = event.block_hashes
        if event.medium not in (None, _GPU):
            self._skip("medium", len(hashes))
            return
        if (event.group_idx or 0) != self._group:
            self._skip("group", len(hashes))
            return
        size = event.block_size
        if len(event.token_ids) != len(hashes) * size or (
            event.extra_keyed and len(event.extra_keyed) != len(hashes)
        ):
            self._skip("inconsistent", len(hashes))
            return
        parent = event.parent_block_hash
        for index, block_hash in enumerate(hashes):
            tokens = event.token_ids[index * size : (index + 1) * size]
            extra = bool(event.extra_keyed) and event.extra_keyed[index]
            self._store_block(block_hash, parent, tokens, event.lora, extra)
            parent = block_hash

    def _store_block(
        self,
        block_hash: BlockHash,
        parent: BlockHash | None,
        tokens: Sequence[int],
        lora: bool,
        extra: bool,
    ) -> None:
        if lora or extra or (parent is not None and parent in self._tainted):
            reason = "lora" if lora else "extra_keys" if extra else "tainted"
            self._skip(reason, 1)
            self._tainted.add(block_hash)
            return
        known = self._blocks.get(block_hash)
        if known is not None:  # stored again: re-announced, or its chain came back
            self._complete(block_hash, known)
            return
        if parent is None:
            start, chunk_parent, tail = 0, None, array("I")
        else:
            up = self._blocks.get(parent)
            if up is None:
                self._skip("unknown_parent", 1)
                return
            start, chunk_parent, tail = up.end, up.chunk_parent, up.tail
        try:
            joined = tail + array("I", tokens)
        except OverflowError:
            self._skip("bad_token", 1)
            return
        keys = chain_keys(self._namespace, joined, self._chunk, chunk_parent)
        first = start - len(tail)  # token index where ``joined`` begins
        done = len(keys) * self._chunk
        block = _Block(
            parent=parent,
            end=start + len(tokens),
            chunk_parent=keys[-1] if keys else chunk_parent,
            tail=joined[done:],
            completes=tuple((k, first + j * self._chunk) for j, k in enumerate(keys)),
        )
        self._blocks[block_hash] = block
        self._complete(block_hash, block)

    def _complete(self, block_hash: BlockHash, block: _Block) -> None:
        """Make a path for every chunk ``block`` completes that has no live one through it."""
        if not block.completes:
            return
        block.paths = [p for p in block.paths if p.live]
        have = {p.key for p in block.paths}
        for key, chunk_start in block.completes:
            if key in have:
                continue
            members = self._members(block, chunk_start)
            if members is None:
                self._skip("incomplete_chunk", 1)
                continue
            path = _Path(key)
            block.paths.append(path)
            for member in members:
                if len(member.paths) >= 8:  # a chunk-start block of a busy branch point
                    member.paths = [p for p in member.paths if p.live]
                member.paths.append(path)
            refs = self._refs.get(key, 0)
            self._refs[key] = refs + 1
            if refs == 0:
                self._events.append((OP_ON_GPU, key))

    def _members(self, block: _Block, chunk_start: int) -> list[_Block] | None:
        """Ancestors of ``block`` holding tokens at or after ``chunk_start``; None if one
        of them is no longer stored."""
        members: list[_Block] = []
        cursor = block.parent
        while cursor is not None:
            up = self._blocks.get(cursor)
            if up is None:
                return None
            if up.end <= chunk_start:
                break
            members.append(up)
            cursor = up.parent
        return members

    def _removed(self, event: BlockRemoved) -> None:
        if event.medium not in (None, _GPU) or (event.group_idx or 0) != self._group:
            return  # another tier's or group's copy: the GPU's is untouched
        for block_hash in event.block_hashes:
            self._tainted.discard(block_hash)
            block = self._blocks.pop(block_hash, None)
            if block is None:
                continue
            for path in block.paths:
                if not path.live:
                    continue
                path.live = False
                refs = self._refs[path.key] - 1
                if refs:
                    self._refs[path.key] = refs
                else:
                    del self._refs[path.key]
                    self._events.append((OP_REMOVED, path.key))
