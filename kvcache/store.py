"""The block store: which blocks exist, in which tier, and who may touch them.

Invariant (checked by the Hypothesis state machine in tests/unit/test_store.py)::

    every block is RESERVED by exactly one writer session, or COMMITTED;
    only COMMITTED blocks are visible to lookup and get;
    a COMMITTED block with leases (lease_count > 0) is never evicted, demoted or
    overwritten; an engine's lease is in SHM, a peer's (promote=False) in the tier the
    block lay in; a block sits in exactly one tier, and a slot a lease points at stays
    allocated until that lease ends, even if the block moved up meanwhile.

Life of a block::

    reserve ──► RESERVED (slot in SHM, owner session, deadline)
       │  writer copies payload into the arena, then
       ├── commit(checksum) ──► COMMITTED in SHM ──demote──► DRAM ──spill──► SSD ──► dropped
       │                              ▲   get = lease + promote to SHM      │
       │                              └─────────────────────────────────────┘
       └── abort / writer dies / deadline passes ──► slot freed; bytes never served

Leases expire on their own: a session opened with ``lease_ttl_s`` loses all its leases
``lease_ttl_s`` after its last reading call (``acquire`` or ``release``, which renew the
deadline). Session liveness (heartbeats) deliberately does not renew it, so a client
whose I/O thread hangs while a heartbeat thread lives on cannot pin blocks forever. One
deadline per session, not per lease: a reader that keeps reading keeps all it holds, and
expiry costs one comparison per session per ``expire_leases`` call. Sessions opened
without a TTL (the cluster's peer session, whose leases end when ZeroMQ has sent the
frames) keep their leases until released.

Tiers are exclusive: a block moves down on pressure and back up to SHM on a hit (engines
can only read the arena). Every move verifies the checksum the writer supplied at commit;
a mismatch drops the block and counts an error, so corruption is a miss, never wrong data.

Eviction is delegated per tier to a pluggable ``EvictionPolicy`` (``kvcache.eviction``,
sized by ``kvcache.tier_policy``); the store pins leased and moving blocks. Making room
is synchronous on the request that needs it, as far as memory goes: a copy between
memory tiers (SHM <-> DRAM) runs inline, at DRAM speed, paid once. Anything that touches
a file tier is a *move* (``kvcache.moves``, which states its invariants): the store
sets aside the slots, hands the bytes work to ``IoWorkers`` (threads in the daemon) and
finishes the metadata when the worker reports back, on the caller's thread. A block
being demoted to a file is staged in memory and stays visible and servable from there;
a block being promoted from a file stays visible, and a reader that wants it waits
(``prepare``) instead of the loop waiting for the disk.

Known limitation: eviction follows the policy's order, not the size class that needs a
slot. With mixed block sizes and leases spread over every slab, making room for a block
of another class can demote many blocks and still end in NO_SPACE (they are demoted, not
lost, while a lower tier has room). KV caches use one block size per namespace, where
this cannot happen; class-aware victim choice is future work.

Calls go down, events come up: the store appends ``BlockEvent``s and the daemon drains
them with ``take_events()``; this module imports no transport. Time is injected.
"""

from __future__ import annotations

import logging
import operator
import sys
import time
from collections.abc import Callable, Sequence

from kvcache.errors import CorruptBlock
from kvcache.io_workers import InlineIo, IoWorkers
from kvcache.moves import Move, MoveKind
from kvcache.store_bulk import BulkOperations
from kvcache.store_entries import Entry, Session, State, TierCounters
from kvcache.store_file_moves import FileTierMoves
from kvcache.store_values import (
    BlockEvent,
    EventKind,
    Lease,
    ReserveResult,
    ReserveStatus,
    StoreStats,
    TierStats,
)
from kvcache.tier_policy import TierPolicy
from kvcache.tiers import Backing, MemoryBacking, Tier, TierStore, block_checksum

log = logging.getLogger("shoal." + __name__)

_RECLAIM_STEP = 4096  # detached blocks freed per step after a flush
# Looked up once, not per block in the hot loops (issue 17).
_OK, _EXISTS, _NO_SPACE = ReserveStatus.OK, ReserveStatus.EXISTS, ReserveStatus.NO_SPACE
_COMMITTED, _STORED = State.COMMITTED, EventKind.STORED

__all__ = [
    "BlockEvent",
    "BlockStore",
    "EventKind",
    "Lease",
    "ReserveResult",
    "ReserveStatus",
    "StoreStats",
    "TierStats",
]


class BlockStore(FileTierMoves, BulkOperations):
    """Owner of all block metadata; tiers ordered SHM (required) → DRAM → SSD.

    Inherited from sibling modules: the moves to and from file tiers
    (``kvcache.store_file_moves``) and the whole-table work, ``statistics``,
    ``snapshot``, ``snapshot_columns``, ``hot_keys``, ``evict`` and ``clear``
    (``kvcache.store_bulk``).
    """

    def __init__(
        self,
        tiers: Sequence[TierStore],
        *,
        policy: str = "default",
        reservation_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        io: IoWorkers | None = None,
        max_staging_bytes: int = 256 << 20,
        record_events: bool = True,
    ) -> None:
        """``record_events=False``: no ``BlockEvent`` is kept (``take_events`` stays empty),
        for an owner that publishes none (a daemon outside a cluster): an event object per
        committed block was a tenth of a commit's cost, thrown away (issue 17)."""
        assert tiers and tiers[0].tier is Tier.SHM, "the first tier must be the SHM arena"
        self._tiers = list(tiers)
        # No file tier (no --ssd-dir): nothing is ever read on a worker, so a get need not
        # walk its keys twice (``prepare``, then ``acquire``).
        self._memory_only = all(t.in_memory for t in self._tiers)
        # Sized in the blocks each tier really holds (kvcache.tier_policy), not a guess.
        self._policy_name = policy
        self._policies = [TierPolicy(policy, t.allocator) for t in tiers]
        self._counters = [TierCounters() for _ in tiers]
        self._entries: dict[bytes, Entry] = {}
        self._doomed: set[Entry] = set()  # deleted while leased: removed on last release
        # Blocks a flush detached: invisible at once, their slots reclaimed in steps
        # (``clear`` and ``_reclaim``, in kvcache.store_bulk).
        self._cleared: list[dict[bytes, Entry]] = []
        self._num_cleared = [0] * len(tiers)  # of those, per tier, not reclaimed yet
        self._sessions: dict[int, Session] = {}
        self._reservations: dict[int, Entry] = {}  # id(entry) -> entry, in deadline order
        self._events: list[BlockEvent] = []
        self._record_events = record_events
        self._ttl = reservation_ttl_s
        self._clock = clock
        self._misses = 0
        self._num_leases = 0
        self._no_space = 0
        self._checksum_failures = 0
        self._io_errors = 0
        self._dropped = 0
        self._expired = 0
        self._expired_leases = 0
        self._callback_errors = 0  # move completions and their waiters that raised (bugs)
        self._io: IoWorkers = io or InlineIo()  # runs the file-tier moves
        self._moves: dict[int, Move] = {}  # id(move) -> move, in flight
        # Demotions staged in memory while their writes wait: bounded, so a disk slower
        # than the eviction rate costs dropped blocks, not unbounded daemon memory.
        self._max_staging = max_staging_bytes
        self._staging_bytes = 0

    @property
    def max_block_bytes(self) -> int:
        return self._tiers[0].allocator.max_block_bytes

    # -- sessions --------------------------------------------------------------------

    def open_session(
        self, session_id: int, namespace: str = "", *, lease_ttl_s: float | None = None
    ) -> None:
        """``namespace`` labels the blocks the session writes (``evict`` selects by it);
        with ``lease_ttl_s`` its leases expire that long after its last reading call."""
        assert lease_ttl_s is None or lease_ttl_s > 0, f"lease TTL {lease_ttl_s} must be > 0"
        self._sessions.setdefault(
            session_id, Session(sys.intern(namespace), lease_ttl_s=lease_ttl_s)
        )

    def close_session(self, session_id: int) -> None:
        """Release every lease and abort every reservation of a (possibly dead) client."""
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        for entries in session.leases.values():
            for entry in entries:
                self._unlease(entry)
        for entry in list(session.reservations.values()):
            self._discard_reservation(entry)

    def _session(self, session_id: int) -> Session:
        session = self._sessions.get(session_id)
        assert session is not None, f"session {session_id} used before open_session"
        return session

    # -- reads -----------------------------------------------------------------------

    def lookup(self, keys: Sequence[bytes]) -> int:
        """Length of the longest prefix of ``keys`` that is committed in any tier."""
        entries = self._entries
        for index, key in enumerate(keys):
            entry = entries.get(key)
            if entry is None or entry.state is not State.COMMITTED:
                return index
        return len(keys)

    def prepare(
        self, keys: Sequence[bytes], on_ready: Callable[[], None], *, prefix: bool = True
    ) -> bool:
        """Start bringing the file-tier blocks among ``keys`` to SHM, without waiting.

        True when every block ``acquire`` would lease is in a memory tier now (acquire
        will not touch a file). Otherwise ``on_ready`` runs once all the moves started or
        joined here have completed (successfully or not), on the loop thread; then call
        ``acquire``. A block that went back to a file tier in between is a miss there.
        """
        if self._memory_only:
            return True
        waiting: list[Move] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.state is not State.COMMITTED:
                if prefix:
                    break
                continue
            if self._tiers[entry.tier].in_memory or (
                entry.move is not None and entry.move.kind is MoveKind.DEMOTE
            ):
                continue  # served by a memory copy (from the staging buffer if demoting)
            move = entry.move or self._start_promotion(entry)
            if move is None:  # no room in SHM: acquire answers the miss
                if prefix:
                    break
                continue
            if not move.finished:
                waiting.append(move)
        if not waiting:
            return True
        remaining = len(waiting)

        def one_done() -> None:
            nonlocal remaining
            remaining -= 1
            if not remaining:
                on_ready()

        for move in waiting:
            move.waiters.append(one_done)
        return False

    def acquire(
        self,
        session_id: int,
        keys: Sequence[bytes],
        *,
        prefix: bool = True,
        promote: bool = True,
    ) -> list[Lease | None]:
        """Lease each committed block, promoting it to SHM; ``None`` marks a miss.

        With ``prefix`` (the default) the first miss ends the answer: blocks past a gap in
        a chain can never be used by an engine. A block on a file tier is promoted by a
        worker: with the inline workers that happens here, with threads the block is a
        miss now and in SHM soon (call ``prepare`` first to wait for it instead). Without
        ``promote`` a block is leased in the tier it lies in (``Lease.tier``; read it
        through ``backing``): a peer reading our warm blocks must not push this node's own
        hot blocks out of SHM.
        """
        return [
            None if entry is None
            else Lease(entry.key, entry.offset, entry.nbytes, entry.checksum, entry.tier)
            for entry in self._lease(session_id, keys, prefix, promote)
        ]  # fmt: skip

    def acquire_columns(
        self, session_id: int, keys: Sequence[bytes], *, prefix: bool = True
    ) -> tuple[list[int], list[int], list[int]]:
        """``acquire`` (promoting to SHM) as the wire answers it: the leases' offsets, sizes
        and checksums, one entry per lease or miss (offset -1, size and checksum 0)."""
        leased = self._lease(session_id, keys, prefix, True)
        return (
            [-1 if entry is None else entry.offset for entry in leased],
            [0 if entry is None else entry.nbytes for entry in leased],
            [0 if entry is None else entry.checksum for entry in leased],
        )

    def _lease(
        self, session_id: int, keys: Sequence[bytes], prefix: bool, promote: bool
    ) -> list[Entry | None]:
        """The entries ``acquire`` leases, ``None`` per miss (a leased entry is pinned:
        nothing later in the call moves it, so its tier and offset are the lease's).

        One pass; the common case, a hit already in SHM, is handled inline and its
        counters are added once per call (issue 17: this was ~5 us of calls per block).
        """
        session = self._session(session_id)
        self._renew(session)
        entries, held_by = self._entries, session.leases
        touch_shm = self._policies[0].touch
        shm = Tier.SHM
        out: list[Entry | None] = []
        hits = bytes_out = misses = 0
        for key in keys:
            entry = entries.get(key)
            if entry is not None and entry.state is _COMMITTED:
                if promote and entry.tier is shm and not entry.landed:  # _promote's SHM hit
                    hits += 1
                    bytes_out += entry.nbytes
                    touch_shm(key)
                elif not (self._promote(entry) if promote else self._touch(entry)):
                    entry = None
            else:
                entry = None
            out.append(entry)
            if entry is None:
                misses += 1
                if prefix:
                    break
                continue
            entry.lease_count += 1
            held = held_by.get(key)
            if held is None:
                held_by[key] = [entry]
            else:
                held.append(entry)
        counters = self._counters[0]
        counters.hits += hits
        counters.bytes_out += bytes_out
        self._misses += misses
        self._num_leases += len(out) - misses
        return out

    def backing(self, tier: Tier) -> Backing:
        """Where the bytes of tier ``tier`` live (to read a ``promote=False`` lease)."""
        return self._tiers[tier].backing

    def release_leases(self, session_id: int, leases: Sequence[Lease]) -> int:
        """``release`` of exactly these leases: where a session holds one key twice (a
        peer's two requests, before and after the block moved), the one at this slot."""
        session = self._session(session_id)
        self._renew(session)
        released = 0
        for lease in leases:
            held = session.leases.get(lease.key)
            if not held:
                continue
            at = next((i for i, e in enumerate(held)
                       if e.tier == lease.tier and e.offset == lease.offset), -1)  # fmt: skip
            entry = held.pop(at)
            if not held:
                del session.leases[lease.key]
            self._unlease(entry)
            released += 1
        return released

    def release(self, session_id: int, keys: Sequence[bytes]) -> int:
        """Drop one lease per key held by the session; returns how many were held."""
        session = self._session(session_id)
        self._renew(session)
        held_by, doomed = session.leases, self._doomed
        released = 0
        for key in keys:  # _unlease, inline: this loop is a get's whole cost in the daemon
            held = held_by.get(key)
            if not held:
                continue
            entry = held.pop()
            if not held:
                del held_by[key]
            assert entry.lease_count > 0, f"lease count of {key.hex()} would go negative"
            entry.lease_count -= 1
            released += 1
            if not entry.lease_count and doomed and entry in doomed:
                self._free_doomed(entry)
        self._num_leases -= released
        return released

    def _renew(self, session: Session) -> None:
        if session.lease_ttl_s is not None:
            session.lease_deadline = self._clock() + session.lease_ttl_s

    def expire_leases(self) -> int:
        """Release every lease of the sessions whose lease deadline passed; how many."""
        now = self._clock()
        expired = 0
        for session in self._sessions.values():
            if session.leases and session.lease_ttl_s is not None and session.lease_deadline <= now:
                leases, session.leases = session.leases, {}
                for entries in leases.values():
                    for entry in entries:
                        self._unlease(entry)
                        expired += 1
        self._expired_leases += expired
        return expired

    def _unlease(self, entry: Entry) -> None:
        assert entry.lease_count > 0, f"lease count of {entry.key.hex()} would go negative"
        entry.lease_count -= 1
        self._num_leases -= 1
        if entry.lease_count == 0 and entry in self._doomed:
            self._free_doomed(entry)

    def _free_doomed(self, entry: Entry) -> None:
        """The last lease of a block deleted while leased ended: free its slot."""
        self._doomed.discard(entry)
        if entry.move is None:  # else the move's completion frees it (moves.py, 1.)
            self._tiers[entry.tier].free(entry.offset)

    def _leave_slot(self, entry: Entry, tier: Tier, offset: int) -> None:
        """Free the slot a block moved out of, unless leases hold it there.

        A block leased where it lies (``promote=False``: a peer's frame or file read in
        flight) may still be promoted by a local reader: its old slot then passes to a
        stand-in entry that carries those leases and is freed on their last release,
        so the bytes a peer is sent are never overwritten under it.
        """
        if entry.lease_count == 0:
            self._tiers[tier].free(offset)
            return
        stand_in = Entry(entry.key, entry.parent, entry.nbytes, offset)
        stand_in.tier, stand_in.state = tier, State.COMMITTED
        stand_in.lease_count, entry.lease_count = entry.lease_count, 0
        for session in self._sessions.values():
            held = session.leases.get(entry.key)
            if held:
                held[:] = [stand_in if e is entry else e for e in held]
        self._doomed.add(stand_in)

    # -- writes ----------------------------------------------------------------------

    def reserve(
        self,
        session_id: int,
        keys: Sequence[bytes],
        sizes: Sequence[int],
        parent: bytes | None = None,
        namespace: str | None = None,
    ) -> list[ReserveResult]:
        """Reserve SHM slots for a chain of blocks (``keys[i-1]`` is the parent of ``keys[i]``).

        Raises ``ValueError`` for a size outside 1..max_block_bytes (bad input). After the
        first NO_SPACE the rest of the chain is NO_SPACE too: a suffix without its prefix
        is useless, so the store does not evict for it. ``reserve_columns`` is the same
        call answered as the wire carries it.
        """
        statuses, offsets = self.reserve_columns(session_id, keys, sizes, parent, namespace)
        return [
            ReserveResult(_OK, offset) if status == _OK else ReserveResult(ReserveStatus(status))
            for status, offset in zip(statuses, offsets, strict=True)
        ]

    def reserve_columns(
        self,
        session_id: int,
        keys: Sequence[bytes],
        sizes: Sequence[int],
        parent: bytes | None = None,
        namespace: str | None = None,
    ) -> tuple[bytes, list[int]]:
        """``reserve`` as columns: one ``ReserveStatus`` byte per key, and the offsets
        (0 where the status is not OK). The daemon's hot path (issue 17): the batch is
        checked once, in C-speed passes, and no value object is made per block."""
        num_keys = len(keys)
        if num_keys != len(sizes):
            raise ValueError(f"{num_keys} keys but {len(sizes)} sizes")
        limit = self.max_block_bytes
        if num_keys and (min(sizes) <= 0 or max(sizes) > limit):
            nbytes = next(n for n in sizes if not 0 < n <= limit)
            raise ValueError(
                f"block size {nbytes} is outside 1..{limit} bytes: {limit} is this "
                "daemon's max_block_bytes (its slab size, in the hello reply); cut "
                "smaller blocks or raise --slab-bytes"
            )
        if any(map(operator.eq, [parent, *keys[:-1]], keys)):
            raise ValueError("a block cannot be its own parent (a key repeats in its chain)")
        session = self._session(session_id)
        label = session.namespace if namespace is None else sys.intern(namespace)
        deadline = self._clock() + self._ttl
        statuses = bytearray(num_keys)  # 0 is ReserveStatus.OK
        offsets = [0] * num_keys
        entries, own, every = self._entries, session.reservations, self._reservations
        try_allocate = self._tiers[0].allocator.try_allocate  # the slot in SHM, if free
        no_space = 0
        for index, key, nbytes in zip(range(num_keys), keys, sizes, strict=True):
            chain_parent, parent = parent, key
            if key in entries:
                statuses[index] = _EXISTS
                continue
            if no_space:  # past the first NO_SPACE: no eviction for a useless suffix
                offset = None
            else:
                offset = try_allocate(nbytes)
                if offset is None:  # the tier is full: evict (demote) to make room
                    offset = self._allocate(0, nbytes)
            if offset is None:
                no_space += 1
                statuses[index] = _NO_SPACE
                continue
            entry = Entry(key, chain_parent, nbytes, offset, session_id, deadline, label)
            entries[key] = own[key] = every[id(entry)] = entry
            offsets[index] = offset
        self._no_space += no_space
        return bytes(statuses), offsets

    def commit(self, session_id: int, keys: Sequence[bytes], checksums: Sequence[int]) -> int:
        """Make reserved blocks visible; returns how many were committed.

        A key the session does not hold a reservation for (expired, never reserved) is
        skipped: its bytes were never published, so nothing wrong is served.
        """
        if len(keys) != len(checksums):
            raise ValueError(f"{len(keys)} keys but {len(checksums)} checksums")
        session = self._session(session_id)
        own, every = session.reservations, self._reservations
        events = self._events if self._record_events else None
        insert = self._policies[0].insert
        committed = bytes_in = 0
        for key, checksum in zip(keys, checksums, strict=True):
            entry = own.pop(key, None)
            if entry is None:
                continue
            del every[id(entry)]
            entry.state = _COMMITTED
            entry.checksum = checksum
            insert(key, entry.parent, entry.nbytes)
            bytes_in += entry.nbytes
            if events is not None:
                events.append(BlockEvent(_STORED, key, Tier.SHM))
            committed += 1
        self._counters[0].bytes_in += bytes_in
        return committed

    def abort(self, session_id: int, keys: Sequence[bytes]) -> None:
        session = self._session(session_id)
        for key in keys:
            entry = session.reservations.get(key)
            if entry is not None:
                self._discard_reservation(entry)

    def _discard_reservation(self, entry: Entry) -> None:
        session = self._sessions.get(entry.owner)
        if session is not None:
            session.reservations.pop(entry.key, None)
        self._reservations.pop(id(entry), None)
        del self._entries[entry.key]
        self._tiers[0].free(entry.offset)

    def expire(self) -> int:
        """Abort reservations past their deadline (a writer that hung mid-write)."""
        now = self._clock()
        expired = []
        for entry in self._reservations.values():  # insertion order is deadline order
            if entry.deadline > now:
                break
            expired.append(entry)
        for entry in expired:
            self._discard_reservation(entry)
        self._expired += len(expired)
        return len(expired)

    def delete(self, keys: Sequence[bytes]) -> int:
        """Remove committed blocks; a leased one disappears now and is freed on release.
        Readers delete the blocks that failed their check, so a block at rest in memory is
        verified first and a mismatch counts in ``checksum_failures``."""
        removed = 0
        for key in keys:
            entry = self._entries.get(key)
            if entry is None or entry.state is not State.COMMITTED:
                continue
            backing = self._tiers[entry.tier].backing
            if entry.move is None and isinstance(backing, MemoryBacking):
                found = block_checksum(backing.view(entry.offset, entry.nbytes))
                self._checksum_failures += found != entry.checksum
            self._policies[entry.tier].remove(key)
            self._remove(entry)
            removed += 1
        return removed

    def namespace_of(self, key: bytes) -> str:
        entry = self._entries.get(key)
        return "" if entry is None else entry.namespace

    def flush_policies(self, limit: int | None = None) -> bool:
        """Apply up to ``limit`` deferred eviction records per tier; True if more remain.

        The daemon calls this in small steps while idle, so a request arriving during
        the bookkeeping waits for one step (tens of microseconds), not for all of it.
        """
        more = self._reclaim(limit or sys.maxsize)
        for policy in self._policies:
            more = policy.flush(limit) or more
        return more

    def _emit(self, kind: EventKind, key: bytes, tier: Tier | None = None) -> None:
        if self._record_events:
            self._events.append(BlockEvent(kind, key, tier))

    def take_events(self) -> list[BlockEvent]:
        events, self._events = self._events, []
        return events

    # -- tier movement ---------------------------------------------------------------

    def _allocate(self, level: int, nbytes: int) -> int | None:
        """A slot in tier ``level``, demoting that tier's victims until one fits.

        A free slot is taken without asking the policy: ``len(policy)`` (the bound on
        the victims to try) applies the policy's deferred records, and doing that on
        every allocation put the bookkeeping back on the request path (issue 17).
        """
        tier = self._tiers[level]
        offset = tier.try_allocate(nbytes)
        if offset is not None:
            return offset
        policy = self._policies[level]
        for _ in range(len(policy) + 1):
            offset = tier.try_allocate(nbytes)
            while offset is None and self._cleared:  # a flush's slots, not yet freed
                self._reclaim(_RECLAIM_STEP)
                offset = tier.try_allocate(nbytes)
            if offset is not None:
                return offset
            victim_key = policy.pop_victim(self._is_pinned)
            if victim_key is None:
                return None
            self._counters[level].evictions += 1
            self._demote(self._entries[victim_key], level)
        return None

    def _is_pinned(self, key: bytes) -> bool:
        entry = self._entries[key]
        return entry.lease_count > 0 or entry.move is not None

    def _demote(self, entry: Entry, level: int) -> None:
        """Move an evicted block one tier down, or drop it from the bottom tier.

        A tier smaller than one slab has a smaller largest block: a block too large for
        it skips to the next tier that can hold one (or is dropped), never a ValueError
        in the middle of another client's request.
        """
        lower = level + 1
        while (
            lower < len(self._tiers) and entry.nbytes > self._tiers[lower].allocator.max_block_bytes
        ):
            lower += 1
        if lower >= len(self._tiers):
            self._remove(entry)
            return
        offset = self._allocate(lower, entry.nbytes)
        if offset is None:
            self._remove(entry)
            return
        if not self._tiers[lower].in_memory:
            self._start_demotion(entry, lower, offset)
            return
        if not self._move(entry, lower, offset):
            self._remove(entry)
            return
        self._policies[lower].insert(entry.key, entry.parent, entry.nbytes)

    def _touch(self, entry: Entry) -> bool:
        """A hit that leaves the block in its tier (``acquire(promote=False)``); a block in
        flight is a miss: a demotion's file slot is not written yet (its bytes are in the
        staging buffer), and a promotion's target slot is not filled yet."""
        if entry.move is not None:
            return False
        self._counters[entry.tier].hits += 1
        self._counters[entry.tier].bytes_out += entry.nbytes
        self._policies[entry.tier].touch(entry.key)
        return True

    def _promote(self, entry: Entry) -> bool:
        """Bring a committed block to SHM; ``False`` (a miss) if no room or it is corrupt."""
        level = entry.tier
        if level == Tier.SHM:
            if entry.landed:  # the hit was the file tier's, counted when the read landed
                entry.landed = False
            else:
                self._counters[0].hits += 1
            self._policies[0].touch(entry.key)
            self._counters[0].bytes_out += entry.nbytes
            return True
        move = entry.move
        if move is not None and move.kind is MoveKind.PROMOTE:
            return False  # in flight: served once it lands (``prepare`` waits for it)
        if move is None and not self._tiers[level].in_memory:
            started = self._start_promotion(entry)
            if started is None or not started.finished or not started.committed:
                return False
            entry.landed = False  # this very call is the read whose hit was counted
            self._counters[0].bytes_out += entry.nbytes
            return True
        # Out of its policy first, so making room in SHM (which demotes into this tier)
        # cannot pick the very block being promoted as a victim.
        self._policies[level].remove(entry.key)
        offset = self._allocate(0, entry.nbytes)
        if offset is None:
            self._policies[level].insert(entry.key, entry.parent, entry.nbytes)
            self._no_space += 1
            return False
        moved = self._move_from_staging(entry, offset) if move else self._move(entry, 0, offset)
        if not moved:
            self._remove(entry)
            return False
        self._counters[level].hits += 1
        self._counters[0].bytes_out += entry.nbytes
        self._policies[0].insert(entry.key, entry.parent, entry.nbytes)
        return True

    def _move(self, entry: Entry, level: int, offset: int) -> bool:
        """Copy a block to ``offset`` in tier ``level`` and free its old slot."""
        source, target = self._tiers[entry.tier], self._tiers[level]
        try:
            source.copy_to(entry.offset, entry.nbytes, entry.checksum, target, offset)
        except CorruptBlock:
            self._checksum_failures += 1
            target.free(offset)
            return False
        except OSError:  # e.g. the SSD spill file hit ENOSPC: the block is lost, not the slot
            self._io_errors += 1
            target.free(offset)
            return False
        self._counters[entry.tier].bytes_out += entry.nbytes
        self._counters[level].bytes_in += entry.nbytes
        self._leave_slot(entry, entry.tier, entry.offset)
        entry.tier = Tier(level)
        entry.offset = offset
        self._emit(EventKind.STORED, entry.key, entry.tier)
        return True

    def _remove(self, entry: Entry) -> None:
        """Forget a committed block (already out of its tier's policy)."""
        del self._entries[entry.key]
        self._dropped += 1
        self._emit(EventKind.REMOVED, entry.key)
        self._forget(entry)

    def _forget(self, entry: Entry) -> None:
        """Free the slot of a block no longer in the table, or leave it to its leases."""
        if entry.lease_count > 0:
            self._doomed.add(entry)
        elif entry.move is None:
            self._tiers[entry.tier].free(entry.offset)
        # else: a worker is on its slots; the move's completion frees them (moves.py, 1.)
