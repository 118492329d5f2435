"""The file-tier half of ``BlockStore``: moves to and from the SSD tier on I/O workers,
and peers' reads of file-tier leases.

``BlockStore`` (``kvcache.store``) inherits this class; it is split out only to keep each
module one concern (STYLE 1): the store's bookkeeping there, the asynchronous moves here.
The attributes annotated below are the store's own, set in ``BlockStore.__init__``; the
methods named at the end are the store's, which these call. The moves' life and their
invariants are in ``kvcache.moves``'s docstring; the lease invariant (a leased slot is
never freed) in ``kvcache.store``'s.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator

from kvcache.errors import CorruptBlock
from kvcache.io_workers import IoWorkers
from kvcache.moves import Move, MoveKind, promotion_job, read_job, stage, write_job
from kvcache.store_entries import Entry, TierCounters
from kvcache.store_values import EventKind, Lease
from kvcache.tier_policy import TierPolicy
from kvcache.tiers import Tier, TierStore, copy_hashing_target

__all__ = ["FileTierMoves"]

log = logging.getLogger("shoal." + __name__)


class FileTierMoves:
    """Mixin of ``BlockStore``: its moves to and from file tiers (see the module)."""

    _tiers: list[TierStore]
    _policies: list[TierPolicy]
    _counters: list[TierCounters]
    _entries: dict[bytes, Entry]
    _io: IoWorkers
    _moves: dict[int, Move]
    _max_staging: int
    _staging_bytes: int
    _no_space: int
    _io_errors: int
    _checksum_failures: int
    _callback_errors: int

    # The store's own methods these call (defined in kvcache.store.BlockStore).
    def _remove(self, entry: Entry) -> None:
        raise NotImplementedError

    def _leave_slot(self, entry: Entry, tier: Tier, offset: int) -> None:
        raise NotImplementedError

    def _allocate(self, level: int, nbytes: int) -> int | None:
        raise NotImplementedError

    def _emit(self, kind: EventKind, key: bytes, tier: Tier | None = None) -> None:
        raise NotImplementedError

    # -- peers' reads of file-tier leases -------------------------------------------

    def read_leased(self, lease: Lease, out: memoryview, done: Callable[[bool], None]) -> None:
        """Read a file-tier lease's bytes into ``out`` on an I/O worker, verified.

        ``out`` is page aligned and ``padded(lease.nbytes)`` long (O_DIRECT). ``done(ok)``
        runs on the loop thread once the read landed; the caller holds the lease until
        then (the lease keeps the file slot from being freed or reused). A corrupt or
        unreadable block is counted and dropped, as a failed promotion would drop it.
        """
        assert not self._tiers[lease.tier].in_memory, "memory-tier leases are read in place"
        job = read_job(self._tiers[lease.tier], lease.offset, out, lease.nbytes, lease.checksum)
        self._io.submit(job, functools.partial(self._read_done, lease, done))

    def _read_done(
        self, lease: Lease, done: Callable[[bool], None], error: Exception | None
    ) -> None:
        if error is not None:
            entry = self._entries.get(lease.key)
            self._count_error(error, lease.key)
            if (entry is not None and entry.move is None and entry.tier == lease.tier
                    and entry.offset == lease.offset):  # fmt: skip
                self._policies[entry.tier].remove(entry.key)
                self._remove(entry)  # leased: its slot is freed on the last release
        done(error is None)

    def _start_demotion(self, entry: Entry, level: int, offset: int) -> None:
        """Stage an evicted block and write it to file tier ``level`` on a worker."""
        source = self._tiers[entry.tier]
        if self._staging_bytes + entry.nbytes > self._max_staging:
            self._tiers[level].free(offset)  # the disk is behind: drop, do not queue more
            self._remove(entry)
            return
        try:
            staging = stage(source, entry.offset, entry.nbytes, entry.checksum)
        except CorruptBlock:
            self._checksum_failures += 1
            self._tiers[level].free(offset)
            self._remove(entry)
            return
        except OSError:  # no memory for the staging buffer (ENOMEM): dropped, counted
            self._io_errors += 1
            self._tiers[level].free(offset)
            self._remove(entry)
            return
        self._counters[entry.tier].bytes_out += entry.nbytes
        source.free(entry.offset)
        move = Move(entry, MoveKind.DEMOTE, (entry.tier, entry.offset), (Tier(level), offset),
                    staging)  # fmt: skip
        entry.tier, entry.offset, entry.move = Tier(level), offset, move
        self._moves[id(move)] = move
        self._staging_bytes += entry.nbytes
        self._policies[level].insert(entry.key, entry.parent, entry.nbytes)
        self._emit(EventKind.STORED, entry.key, entry.tier)
        job = write_job(self._tiers[level], offset, move)
        self._io.submit(job, functools.partial(self._demotion_done, move))

    def _demotion_done(self, move: Move, error: Exception | None) -> None:
        with self._waking(move):
            entry = move.entry
            del self._moves[id(move)]
            move.finished = True
            move.release_staging()
            self._staging_bytes -= entry.nbytes
            live = entry.move is move and self._entries.get(entry.key) is entry
            if entry.move is move:
                entry.move = None
            if not live:  # deleted, or promoted from the staging buffer meanwhile
                self._tiers[move.target[0]].free(move.target[1])
            elif error is not None:
                self._count_error(error, entry.key)
                self._policies[entry.tier].remove(entry.key)
                self._remove(entry)  # frees the file slot: the write is over
            else:
                self._counters[entry.tier].bytes_in += entry.nbytes

    def _move_from_staging(self, entry: Entry, offset: int) -> bool:
        """Promote a block whose demotion is in flight: copy its staging buffer to SHM."""
        move = entry.move
        assert move is not None and move.view is not None, "staged while demoting"
        shm = self._tiers[0].backing
        assert hasattr(shm, "view"), "the SHM tier is a memory mapping"
        if copy_hashing_target(move.view[: entry.nbytes], shm.view(offset, entry.nbytes)) != (
            entry.checksum
        ):
            self._checksum_failures += 1
            self._tiers[0].free(offset)
            return False  # the caller removes it; its file slot waits for the write
        entry.move = None  # the write's completion frees the file slot (not live)
        self._counters[0].bytes_in += entry.nbytes
        entry.tier, entry.offset = Tier.SHM, offset
        self._emit(EventKind.STORED, entry.key, entry.tier)
        return True

    def _start_promotion(self, entry: Entry) -> Move | None:
        """Reserve an SHM slot and read a file-tier block into it on a worker; ``None``
        if SHM has no room (a miss)."""
        level = entry.tier
        self._policies[level].remove(entry.key)  # not a victim while SHM makes room
        offset = self._allocate(0, entry.nbytes)
        if offset is None:
            self._policies[level].insert(entry.key, entry.parent, entry.nbytes)
            self._no_space += 1
            return None
        move = Move(entry, MoveKind.PROMOTE, (level, entry.offset), (Tier.SHM, offset))
        entry.move = move
        self._moves[id(move)] = move
        job = promotion_job(self._tiers[level], entry.offset, self._tiers[0], offset,
                            entry.nbytes, entry.checksum)  # fmt: skip
        self._io.submit(job, functools.partial(self._promotion_done, move))
        return move

    def _promotion_done(self, move: Move, error: Exception | None) -> None:
        with self._waking(move):
            entry = move.entry
            del self._moves[id(move)]
            move.finished = True
            live = entry.move is move and self._entries.get(entry.key) is entry
            entry.move = None
            source, target = self._tiers[move.source[0]], self._tiers[0]
            if not live:  # deleted while in flight: both slots are the move's to free
                if entry.lease_count == 0:  # else its leases' last release frees it
                    source.free(move.source[1])
                target.free(move.target[1])
            elif error is not None:
                self._count_error(error, entry.key)
                target.free(move.target[1])  # filled with bytes nobody will see
                self._remove(entry)  # frees the file slot
            else:
                self._counters[move.source[0]].hits += 1
                self._counters[move.source[0]].bytes_out += entry.nbytes
                self._counters[0].bytes_in += entry.nbytes
                self._leave_slot(entry, move.source[0], move.source[1])
                entry.tier, entry.offset, entry.landed = Tier.SHM, move.target[1], True
                self._policies[0].insert(entry.key, entry.parent, entry.nbytes)
                self._emit(EventKind.STORED, entry.key, entry.tier)
                move.committed = True

    def _count_error(self, error: Exception, key: bytes) -> None:
        if isinstance(error, CorruptBlock):
            self._checksum_failures += 1
        elif isinstance(error, OSError):
            self._io_errors += 1
        else:  # a bug in a job: counted as an I/O error, and loud
            self._io_errors += 1
            log.error("tier move failed", exc_info=error, extra={"key": key.hex()})

    @contextlib.contextmanager
    def _waking(self, move: Move) -> Iterator[None]:
        """Around a move's completion: a bug in it is logged and counted, not raised into
        the I/O loop, and the move's waiters are woken whatever happened."""
        try:
            yield
        except Exception:  # logged, counted; the waiters below still run
            self._callback_errors += 1
            log.exception("a tier move's completion failed", extra={"key": move.entry.key.hex()})
        finally:
            self._wake(move)

    def _wake(self, move: Move) -> None:
        """Run each waiter of a finished move; one that raises is logged and counted, and
        the others still run (else their reads would hang until the client times out)."""
        waiters, move.waiters = move.waiters, []
        for waiter in waiters:
            try:
                waiter()
            except Exception:  # logged, counted; the other waiters still run
                self._callback_errors += 1
                log.exception("a reader waiting for a tier move failed")

    @property
    def num_moving(self) -> int:
        """Blocks in flight to or from a file tier."""
        return len(self._moves)
