"""Moves to and from a file tier run on I/O workers; the store stays consistent meanwhile.

``QueuedIo`` holds every file read and write until the test runs it: a disk as slow as
the test wants, so each test checks what the store answers *while* bytes are in flight
(review finding M3). The invariants are those of ``kvcache.moves``.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.allocator import SlabAllocator
from kvcache.io_workers import QueuedIo
from kvcache.store import BlockStore, EventKind, Lease, ReserveStatus
from kvcache.tiers import FileBacking, MemoryBacking, Tier, TierStore, block_checksum, padded

KiB = 1 << 10
BLOCK = 64 * KiB
SSD = Tier(1)  # the store names a tier by its level: SSD is level 1 without a DRAM tier
PEER = 9  # the session of a cluster peer's reads (leases in place) in the state machine


class CountingFile(FileBacking):
    """The spill file, counting the I/O done on it (to show the loop did none)."""

    def __init__(self, path: Path, nbytes: int) -> None:
        super().__init__(path, nbytes)
        self.reads = self.writes = 0

    def write(self, offset: int, data: memoryview) -> None:
        self.writes += 1
        super().write(offset, data)

    def read_into(self, offset: int, out: memoryview) -> None:
        self.reads += 1
        super().read_into(offset, out)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def data(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK


class Fixture:
    """SHM of 2 blocks over an SSD file of 8 blocks, moves held in a queue."""

    def __init__(self, tmp_path: Path) -> None:
        self.ssd = CountingFile(tmp_path / "spill", 8 * BLOCK)
        self.tiers = [
            TierStore(Tier.SHM, SlabAllocator(2 * BLOCK, slab_bytes=BLOCK),
                      MemoryBacking.anonymous(2 * BLOCK)),
            TierStore(Tier.SSD, SlabAllocator(8 * BLOCK, slab_bytes=BLOCK), self.ssd),
        ]  # fmt: skip
        self.io = QueuedIo()
        self.store = BlockStore(self.tiers, policy="lru", io=self.io)
        self.store.open_session(1)
        self.store.open_session(2)

    def put(self, i: int) -> None:
        (result,) = self.store.reserve(1, [key(i)], [BLOCK])
        assert result.status is ReserveStatus.OK
        shm = self.tiers[0].backing
        assert isinstance(shm, MemoryBacking)
        shm.write(result.offset, memoryview(data(i)))
        assert self.store.commit(1, [key(i)], [block_checksum(data(i))]) == 1

    def read(self, i: int) -> bytes | None:
        (lease,) = self.store.acquire(2, [key(i)])
        if lease is None:
            return None
        shm = self.tiers[0].backing
        assert isinstance(shm, MemoryBacking)
        out = bytes(shm.view(lease.offset, lease.nbytes))
        self.store.release(2, [key(i)])
        return out

    def tier_of(self, i: int) -> Tier:
        return next(tier for k, tier in self.store.snapshot() if k == key(i))

    def num_blocks(self) -> dict[str, int]:
        return {t.tier: t.num_blocks for t in self.store.statistics().tiers}

    def free_bytes(self) -> list[int]:
        return [t.statistics().free_bytes for t in self.tiers]


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def test_a_demotion_to_the_file_tier_does_no_io_on_the_loop(fx: Fixture) -> None:
    for i in range(3):  # the third evicts block 0 from SHM to the SSD
        fx.put(i)
    assert fx.io.num_pending == 1 and fx.ssd.writes == 0, "the write waits for a worker"
    assert fx.tier_of(0) is SSD
    assert fx.num_blocks() == {"shm": 2, "ssd": 1}
    fx.io.run_all()
    assert fx.ssd.writes == 1
    assert fx.tier_of(0) is SSD


def test_a_block_being_demoted_is_served_from_its_staging_copy(fx: Fixture) -> None:
    for i in range(3):
        fx.put(i)
    assert fx.read(0) == data(0), "visible and intact while its write is in flight"
    assert fx.tier_of(0) is Tier.SHM
    assert fx.ssd.reads == 0, "a memory copy, not a file read"
    before = fx.free_bytes()[1]
    fx.io.run_all()  # block 1, evicted to make room, has its own write in the queue
    assert fx.free_bytes()[1] == before + BLOCK, "the abandoned file slot freed by the write"
    assert fx.read(0) == data(0)


def test_a_read_of_an_ssd_block_waits_for_a_worker_and_then_leases(fx: Fixture) -> None:
    for i in range(3):
        fx.put(i)
    fx.io.run_all()
    ready: list[bool] = []
    assert not fx.store.prepare([key(0)], lambda: ready.append(True))
    assert fx.ssd.reads == 0 and not ready, "the read is queued, not done on the loop"
    assert fx.store.lookup([key(0), key(1), key(2)]) == 3, "others are answered meanwhile"
    assert not fx.store.prepare([key(0)], lambda: ready.append(True)), "a second reader joins"
    fx.io.run_all()
    assert ready == [True, True] and fx.ssd.reads == 1
    assert fx.store.prepare([key(0)], lambda: ready.append(False)), "in SHM now"
    assert fx.read(0) == data(0)
    assert fx.store.statistics().tiers[1].hits == 1


def test_without_prepare_an_ssd_block_is_a_miss_until_its_promotion_lands(fx: Fixture) -> None:
    for i in range(3):
        fx.put(i)
    fx.io.run_all()
    assert fx.read(0) is None, "a peer's acquire does not wait for the disk"
    fx.io.run_all()
    assert fx.read(0) == data(0)


def test_deleting_a_block_mid_promotion_frees_both_slots_when_the_read_ends(
    fx: Fixture,
) -> None:
    for i in range(3):
        fx.put(i)
    fx.io.run_all()
    fx.store.take_events()
    assert not fx.store.prepare([key(0)], lambda: None)  # (its room in SHM demotes one)
    free_before = fx.free_bytes()
    assert fx.store.delete([key(0)]) == 1
    assert fx.store.lookup([key(0)]) == 0
    assert fx.free_bytes()[1] == free_before[1], "the worker still reads the file slot"
    fx.io.run_all()
    assert fx.free_bytes()[1] == free_before[1] + BLOCK
    assert fx.num_blocks() == {"shm": 1, "ssd": 1}  # 2 in SHM, 1 (evicted for 0) on SSD
    stored = [e for e in fx.store.take_events() if e.kind is EventKind.STORED and e.key == key(0)]
    assert all(e.tier is SSD for e in stored), "never published in SHM"


def test_deleting_a_block_mid_demotion_frees_its_file_slot_after_the_write(fx: Fixture) -> None:
    for i in range(3):
        fx.put(i)
    free_before = fx.free_bytes()[1]
    assert fx.store.delete([key(0)]) == 1
    assert fx.free_bytes()[1] == free_before, "the worker still writes the file slot"
    fx.io.run_all()
    assert fx.free_bytes()[1] == free_before + BLOCK


def test_a_corrupt_ssd_block_is_a_miss_and_its_shm_slot_is_freed(fx: Fixture) -> None:
    for i in range(3):
        fx.put(i)
    fx.io.run_all()
    offset = fx.store._entries[key(0)].offset
    fx.ssd.write(offset, memoryview(b"\xff" * 4096))
    woken: list[bool] = []
    assert not fx.store.prepare([key(0)], lambda: woken.append(True))
    fx.io.run_all()
    assert woken == [True]
    assert fx.store.lookup([key(0)]) == 0
    stats = fx.store.statistics()
    assert stats.checksum_failures == 1
    assert fx.num_blocks()["shm"] == stats.tiers[0].used_bytes // BLOCK


def test_an_io_error_writing_the_spill_file_drops_the_block_and_counts(fx: Fixture) -> None:
    for i in range(3):
        fx.put(i)

    def broken(offset: int, data: memoryview) -> None:
        raise OSError(28, "No space left on device")

    fx.ssd.write = broken  # type: ignore[method-assign]
    fx.io.run_all()
    assert fx.store.lookup([key(0)]) == 0
    assert fx.store.statistics().io_errors == 1
    assert fx.free_bytes()[1] == 8 * BLOCK, "the slot is not leaked"


def test_demotions_past_the_staging_budget_are_dropped_not_queued(tmp_path: Path) -> None:
    fx = Fixture(tmp_path)
    fx.store = BlockStore(fx.tiers, policy="lru", io=fx.io, max_staging_bytes=BLOCK)
    fx.store.open_session(1)
    fx.store.open_session(2)
    for i in range(4):  # the third and fourth each evict one: only one fits the budget
        fx.put(i)
    assert fx.io.num_pending == 1
    assert fx.store.lookup([key(0)]) == 1 and fx.store.lookup([key(1)]) == 0
    assert fx.store.statistics().dropped == 1
    fx.io.run_all()
    fx.put(4)  # the budget is free again once the write landed: staged
    assert fx.io.num_pending == 1 and fx.store.statistics().dropped == 1


class MovesMachine(RuleBasedStateMachine):
    """Random interleavings of puts, reads, deletes and disk completions (SHM, DRAM, SSD).

    Invariants: a block read is always its own bytes; a deleted block is never found;
    every allocated slot is a resident block or held by a move in flight, and once the
    disk is idle every slot is a resident block; a peer's lease taken in place (DRAM or
    SSD, ``promote=False``) keeps its bytes intact until released, whatever moves meanwhile.
    """

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp())
        memory = [
            TierStore(tier, SlabAllocator(3 * BLOCK, slab_bytes=BLOCK),
                      MemoryBacking.anonymous(3 * BLOCK))
            for tier in (Tier.SHM, Tier.DRAM)
        ]  # fmt: skip
        ssd = TierStore(Tier.SSD, SlabAllocator(4 * BLOCK, slab_bytes=BLOCK),
                        FileBacking(self.directory / "spill", 4 * BLOCK))  # fmt: skip
        self.tiers = [*memory, ssd]
        self.io = QueuedIo()
        self.store = BlockStore(self.tiers, policy="lru", io=self.io, max_staging_bytes=2 * BLOCK)
        self.store.open_session(1)
        self.store.open_session(PEER)
        self.peer_leases: list[tuple[int, Lease]] = []
        self.deleted: set[int] = set()

    @rule(i=st.integers(0, 11))
    def put(self, i: int) -> None:
        (result,) = self.store.reserve(1, [key(i)], [BLOCK])
        if result.status is ReserveStatus.OK:
            shm = self.tiers[0].backing
            assert isinstance(shm, MemoryBacking)
            shm.write(result.offset, memoryview(data(i)))
            self.store.commit(1, [key(i)], [block_checksum(data(i))])
            self.deleted.discard(i)

    @rule(i=st.integers(0, 11), wait=st.booleans())
    def read(self, i: int, wait: bool) -> None:
        if wait and not self.store.prepare([key(i)], lambda: None):
            self.io.run_all()
        (lease,) = self.store.acquire(1, [key(i)])
        if lease is not None:
            assert i not in self.deleted
            shm = self.tiers[0].backing
            assert isinstance(shm, MemoryBacking)
            assert bytes(shm.view(lease.offset, lease.nbytes)) == data(i)
            self.store.release(1, [key(i)])

    @rule(i=st.integers(0, 11))
    def peer_get(self, i: int) -> None:
        (lease,) = self.store.acquire(PEER, [key(i)], promote=False)
        if lease is not None:
            self.peer_leases.append((i, lease))

    @precondition(lambda self: self.peer_leases)
    @rule()
    def peer_release(self) -> None:
        i, _ = self.peer_leases.pop()
        assert self.store.release(PEER, [key(i)]) == 1

    @invariant()
    def peer_bytes_stay_intact_until_released(self) -> None:
        for i, lease in self.peer_leases:
            out = bytearray(padded(lease.nbytes))
            self.tiers[lease.tier].backing.read_into(lease.offset, memoryview(out))
            assert bytes(out[: lease.nbytes]) == data(i), f"block {i}'s leased slot was reused"

    @rule(i=st.integers(0, 11))
    def delete(self, i: int) -> None:
        self.store.delete([key(i)])
        self.deleted.add(i)

    @precondition(lambda self: self.io.num_pending > 0)
    @rule()
    def disk_finishes_one(self) -> None:
        self.io.run_next()

    @invariant()
    def deleted_blocks_are_never_found(self) -> None:
        for i in self.deleted:
            assert self.store.lookup([key(i)]) == 0

    @invariant()
    def every_slot_is_a_block_or_a_move(self) -> None:
        stats = self.store.statistics()
        assert sum(t.num_blocks for t in stats.tiers) == len(self.store._entries)
        assert all(t.num_blocks >= 0 for t in stats.tiers)

    def teardown(self) -> None:
        self.store.close_session(PEER)
        self.io.run_all()
        allocated = sum(t.statistics().num_allocations for t in self.tiers)
        assert allocated == len(self.store._entries), "a slot leaked past its move"
        for tier in self.tiers:
            tier.close()
        shutil.rmtree(self.directory, ignore_errors=True)


TestMovesMachine = MovesMachine.TestCase
TestMovesMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
