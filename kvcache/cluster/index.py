"""The cluster index: which peer holds which block, in which tier.

Invariant: for every live member slot ``s`` and key ``k``, bits ``2s..2s+1`` of
``holders[k]`` are ``tier + 1`` if the member last announced ``k`` as stored in ``tier``
and 0 otherwise; a key with no holder has no entry. Bits of dead slots may linger until
swept, so every read masks with ``live_mask``.

Why one dict of small ints and not one set per member: a lookup walks a prefix chain
key by key and must find *all* holders of each key; with per-member sets that is
``members * keys`` probes (128 members * 1,000 keys = 128k per lookup), with a holder
mask it is one probe per key. A mask costs one int per key, shared between members
(``bench/cluster.py`` reports bytes per million blocks).

Why dropping a member is O(1): a dead member may hold millions of entries and the daemon
loop must not stall for them. ``drop_member`` only clears the slot's bits from
``live_mask`` (so it vanishes from every answer at once) and queues the slot; ``sweep``
clears its bits in bounded steps while the daemon is idle, and only then is the slot
reused. A rejoining member (new epoch) gets a fresh slot and loses nothing.

Layout of one holder mask (2 bits per member slot)::

    bit  2s+1 2s  ...   3  2   1  0
        [ slot s ] ... [slot 1][slot 0]      value: 0 absent, 1 SHM, 2 DRAM, 3 SSD

Engines' GPUs are members too: the stream ``<node>/<engine>`` (``messages.engine_stream``)
gets a slot of its own whose non-zero value means "on that engine's GPU". A key in a
daemon's SHM and on its engine's GPU thus sets two slots, and the index, its sweep and
its sync stay what they are for daemons; only the reads tell the two apart
(``_engine_mask``): ``longest_prefix`` and ``holders`` answer what can be fetched (daemons'
tiers), ``engine_runs`` what engines hold. Rejected: a third bit per slot for "also on a
GPU" (+50% index memory on every key for every member, and it could not say which of a
node's engines holds the key, which is what a router needs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from kvcache.cluster.messages import is_engine_stream
from kvcache.keys import KEY_BYTES

__all__ = ["ClusterIndex", "Holder", "PrefixMatch"]

_SLOT_MASK = 0b11


@dataclass(frozen=True, slots=True)
class Holder:
    node: str
    tier: int  # kvcache.tiers.Tier value


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """``length``: the chain prefix (from ``start``) that peers can provide, block by block.

    ``runs`` lists, per node, how far (exclusive index into the keys) its own contiguous
    run from ``start`` reaches, longest first: fetching from the first node alone yields
    ``keys[start:runs[0][1]]``.
    """

    start: int
    length: int
    runs: tuple[tuple[str, int], ...]


class ClusterIndex:
    """Block key → holder mask over member slots; pure (no sockets, no clock)."""

    def __init__(self) -> None:
        self._holders: dict[bytes, int] = {}
        self._slots: dict[str, int] = {}  # live member -> slot
        self._nodes: dict[int, str] = {}  # slot -> live member
        self._counts: dict[int, int] = {}  # slot -> keys it holds
        self._free: list[int] = []
        self._next_slot = 0
        self._live_mask = 0
        self._engine_mask = 0  # both bits of every live engine stream's slot
        self._sweeping: list[int] = []  # dead slots the current sweep pass clears
        self._dropped: list[int] = []  # dead slots waiting for the next pass
        self._sweep_keys: Iterator[bytes] | None = None

    # -- membership ----------------------------------------------------------------------

    def _slot(self, node: str) -> int:
        slot = self._slots.get(node)
        if slot is None:
            if self._free:
                slot = self._free.pop()
            else:
                slot = self._next_slot
                self._next_slot += 1
            self._slots[node] = slot
            self._nodes[slot] = node
            self._counts[slot] = 0
            self._live_mask |= _SLOT_MASK << (2 * slot)
            if is_engine_stream(node):
                self._engine_mask |= _SLOT_MASK << (2 * slot)
        return slot

    def drop_member(self, node: str) -> int:
        """Forget every block of ``node`` now (answers exclude it); returns how many."""
        slot = self._slots.pop(node, None)
        if slot is None:
            return 0
        del self._nodes[slot]
        self._live_mask &= ~(_SLOT_MASK << (2 * slot))
        self._engine_mask &= ~(_SLOT_MASK << (2 * slot))
        self._dropped.append(slot)
        return self._counts.pop(slot)

    def sweep(self, limit: int = 10_000) -> bool:
        """Clear up to ``limit`` entries' dead bits; True while more work remains."""
        if self._sweep_keys is None:
            if not self._dropped:
                return False
            # A pass clears only the slots dead when it began: a slot dropped mid-pass may
            # have bits in keys the pass already visited, so freeing it at the end of this
            # pass would hand those stale bits to the next member given the slot.
            self._sweeping, self._dropped = self._dropped, []
            self._sweep_keys = iter(list(self._holders))
        dead = 0
        for slot in self._sweeping:
            dead |= _SLOT_MASK << (2 * slot)
        holders = self._holders
        for _ in range(limit):
            key = next(self._sweep_keys, None)
            if key is None:
                self._free.extend(self._sweeping)
                self._sweeping = []
                self._sweep_keys = None
                return bool(self._dropped)
            mask = holders.get(key)
            if mask is not None and mask & dead:
                mask &= ~dead
                if mask:
                    holders[key] = mask
                else:
                    del holders[key]
        return True

    # -- events --------------------------------------------------------------------------

    def store(self, node: str, keys: Sequence[bytes], tiers: Sequence[int]) -> None:
        slot = self._slot(node)
        shift = 2 * slot
        clear = ~(_SLOT_MASK << shift)
        holders = self._holders
        added = 0
        for key, tier in zip(keys, tiers, strict=True):
            mask = holders.get(key, 0)
            if not (mask >> shift) & _SLOT_MASK:
                added += 1
            holders[key] = (mask & clear) | ((tier + 1) << shift)
        self._counts[slot] += added

    def remove(self, node: str, keys: Sequence[bytes]) -> None:
        slot = self._slots.get(node)
        if slot is None:
            return
        shift = 2 * slot
        clear = ~(_SLOT_MASK << shift)
        holders = self._holders
        removed = 0
        for key in keys:
            mask = holders.get(key)
            if mask is None or not (mask >> shift) & _SLOT_MASK:
                continue
            removed += 1
            mask &= clear
            if mask:
                holders[key] = mask
            else:
                del holders[key]
        self._counts[slot] -= removed

    def clear(self, node: str) -> None:
        """The member dropped everything (flush or a snapshot about to replace it)."""
        self.drop_member(node)

    # -- reads ---------------------------------------------------------------------------

    @property
    def members(self) -> list[str]:
        return sorted(self._slots)

    def num_blocks(self, node: str | None = None) -> int:
        """Blocks announced by ``node`` (all members: the sum, a key held twice counts twice)."""
        if node is None:
            return sum(self._counts.values())
        slot = self._slots.get(node)
        return 0 if slot is None else self._counts[slot]

    def __len__(self) -> int:
        """Entries in the table, dead bits not yet swept included."""
        return len(self._holders)

    def holders(self, key: bytes) -> list[Holder]:
        """The daemons holding ``key`` (engines' GPUs are not holders one can fetch from)."""
        mask = self._holders.get(key, 0) & self._live_mask & ~self._engine_mask
        found = []
        while mask:
            low = mask & -mask
            bit = low.bit_length() - 1
            slot = bit // 2
            value = (mask >> (2 * slot)) & _SLOT_MASK
            found.append(Holder(self._nodes[slot], value - 1))
            mask &= ~(_SLOT_MASK << (2 * slot))
        return found

    def keys_of(self, node: str) -> list[bytes]:
        """Every key ``node`` holds (a full scan: for tests and operators, not hot paths)."""
        slot = self._slots.get(node)
        if slot is None:
            return []
        shift = 2 * slot
        return [k for k, mask in self._holders.items() if (mask >> shift) & _SLOT_MASK]

    def longest_prefix(
        self,
        keys: Sequence[bytes],
        start: int = 0,
        held_here: Callable[[bytes], bool] | None = None,
    ) -> PrefixMatch:
        """How far past ``start`` the chain ``keys`` is held by peers, and by whom.

        Keys for which ``held_here`` is true (the asking node has them) neither end the
        prefix nor break a peer's run: they need no fetch.
        """
        holders = self._holders
        live = self._live_mask & ~self._engine_mask
        running = live  # slots whose contiguous run from ``start`` is still unbroken
        runs: dict[int, int] = {}
        end = start
        for index in range(start, len(keys)):
            if held_here is not None and held_here(keys[index]):
                end = index + 1
                continue
            mask = holders.get(keys[index], 0) & live
            if not mask:
                break
            end = index + 1
            # A slot's run breaks at the first key it lacks.
            present = _expand(mask)
            broken = running & ~present
            if broken:
                for slot in _slots_of(broken):
                    runs.setdefault(slot, index)
                running &= present
        for slot in _slots_of(running):
            runs.setdefault(slot, end)
        ordered = sorted(
            ((self._nodes[s], upto) for s, upto in runs.items() if upto > start),
            key=lambda item: (-item[1], item[0]),
        )
        return PrefixMatch(start, end - start, tuple(ordered))

    def engine_runs(self, keys: Sequence[bytes]) -> tuple[tuple[str, int], ...]:
        """Per engine stream holding ``keys[0]``, how many leading keys it holds, longest
        first (ties by name)."""
        running = self._live_mask & self._engine_mask
        runs: dict[int, int] = {}
        holders = self._holders
        for index, key in enumerate(keys):
            if not running:
                break
            present = _expand(holders.get(key, 0) & running)
            for slot in _slots_of(running & ~present):
                runs[slot] = index
            running &= present
        for slot in _slots_of(running):
            runs[slot] = len(keys)
        ordered = sorted(((self._nodes[s], upto) for s, upto in runs.items() if upto > 0),
                         key=lambda item: (-item[1], item[0]))  # fmt: skip
        return tuple(ordered)


def _expand(mask: int) -> int:
    """Set both bits of every non-empty 2-bit slot (so masks compare slot by slot)."""
    fives = _fives(mask.bit_length() + 1)
    either = (mask & fives) | ((mask >> 1) & fives)
    return either | (either << 1)


@functools.cache
def _fives(nbits: int) -> int:
    """0b0101...01 covering ``nbits`` bits (rounded up to whole slots)."""
    return int("01" * ((nbits + 1) // 2), 2) if nbits > 0 else 0


def _slots_of(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        slot = (low.bit_length() - 1) // 2
        yield slot
        mask &= ~(_SLOT_MASK << (2 * slot))


def split(keys: bytes) -> list[bytes]:
    return [keys[i : i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)]
