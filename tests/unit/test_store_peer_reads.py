"""``BlockStore.acquire(promote=False)``: a read for a peer leaves every block where it lies
(review m7), while the lease still pins it; and pins its slot: a local get that promotes
the block meanwhile copies it, the old slot is freed when the peer's lease ends."""

from __future__ import annotations

from pathlib import Path

from kvcache.allocator import SlabAllocator
from kvcache.io_workers import QueuedIo
from kvcache.store import BlockStore, Lease
from kvcache.tiers import FileBacking, MemoryBacking, Tier, TierStore, padded
from tests.unit.test_store import BLOCK, data, key, make_store, put


def tiers_of(store: BlockStore) -> dict[bytes, Tier]:
    return dict(store.snapshot())


def test_a_lease_without_promotion_reads_a_dram_block_in_place_and_keeps_shm_as_it_was() -> None:
    store, tiers = make_store(shm_blocks=2, dram_blocks=4)
    put(store, tiers, [1, 2])
    put(store, tiers, [3, 4])  # pushes 1 and 2 down into DRAM
    before = tiers_of(store)
    assert before[key(1)] is Tier.DRAM and before[key(3)] is Tier.SHM

    (lease,) = store.acquire(1, [key(1)], promote=False)
    assert lease is not None and lease.tier is Tier.DRAM
    backing = store.backing(lease.tier)
    assert isinstance(backing, MemoryBacking)
    assert bytes(backing.view(lease.offset, lease.nbytes)) == data(1)
    assert tiers_of(store) == before, "nothing moved between tiers"
    assert store.take_events()[-1].key == key(4), "no event: no block changed tier"

    # Leased in DRAM, the block is pinned there: DRAM pressure cannot drop it.
    for i in range(5, 10):
        put(store, tiers, [i])
    assert tiers_of(store).get(key(1)) is Tier.DRAM
    assert bytes(backing.view(lease.offset, lease.nbytes)) == data(1)
    assert store.release(1, [key(1)]) == 1


def test_the_default_acquire_still_promotes() -> None:
    store, tiers = make_store(shm_blocks=2, dram_blocks=4)
    put(store, tiers, [1, 2])
    put(store, tiers, [3, 4])
    (lease,) = store.acquire(1, [key(1)])
    assert lease is not None and lease.tier is Tier.SHM
    assert tiers_of(store)[key(1)] is Tier.SHM


def test_a_block_leased_in_place_and_then_promoted_keeps_its_old_slot_until_released() -> None:
    """/tmp/peer_lease_probe.py: the promotion freed the DRAM slot a peer was sending from,
    and the next demotion overwrote it mid-send."""
    store, tiers = make_store(shm_blocks=2, dram_blocks=4)
    put(store, tiers, [1, 2])
    put(store, tiers, [3, 4])  # 1 and 2 -> DRAM
    store.open_session(9)  # the peer's session
    (peer,) = store.acquire(9, [key(1)], promote=False)
    assert peer is not None and peer.tier is Tier.DRAM
    dram = store.backing(peer.tier)
    assert isinstance(dram, MemoryBacking)
    view = dram.view(peer.offset, peer.nbytes)

    (local,) = store.acquire(1, [key(1)])  # a local get: the engine needs it in SHM
    assert local is not None and local.tier is Tier.SHM
    shm = tiers[0].backing
    assert isinstance(shm, MemoryBacking)
    assert bytes(shm.view(local.offset, local.nbytes)) == data(1)
    store.release(1, [key(1)])
    for i in range(5, 14):  # demotions into DRAM, which is full but for the retired slot
        put(store, tiers, [i])
    assert bytes(view) == data(1), "the peer's bytes were overwritten while leased"
    dram_blocks = store.statistics().tiers[1].num_blocks
    assert dram_blocks == tiers[1].statistics().num_allocations - 1, "retired: no block"

    assert store.release(9, [key(1)]) == 1
    assert tiers[1].statistics().num_allocations == dram_blocks, "freed on release"
    assert store.statistics().num_leases == 0


class TestSsdBlockLeasedInPlace:
    """The same on the file tier: a promotion lands while a peer reads the file slot."""

    def make(self, tmp_path: Path) -> tuple[BlockStore, QueuedIo, list[TierStore]]:
        tiers = [
            TierStore(Tier.SHM, SlabAllocator(2 * BLOCK, slab_bytes=BLOCK),
                      MemoryBacking.anonymous(2 * BLOCK)),
            TierStore(Tier(1), SlabAllocator(4 * BLOCK, slab_bytes=BLOCK),
                      FileBacking(tmp_path / "spill", 4 * BLOCK)),
        ]  # fmt: skip
        io = QueuedIo()
        store = BlockStore(tiers, policy="lru", io=io)
        store.open_session(1)
        store.open_session(9)
        put(store, tiers, [1, 2])
        put(store, tiers, [3, 4])  # 1 and 2 are written to the file
        io.run_all()
        return store, io, tiers

    def read_file(self, tiers: list[TierStore], lease: Lease) -> bytes:
        out = bytearray(padded(lease.nbytes))
        tiers[1].backing.read_into(lease.offset, memoryview(out))
        return bytes(out[: lease.nbytes])

    def test_the_file_slot_outlives_the_promotion(self, tmp_path: Path) -> None:
        store, io, tiers = self.make(tmp_path)
        (peer,) = store.acquire(9, [key(1)], promote=False)
        assert peer is not None and peer.tier == 1
        assert not store.prepare([key(1)], lambda: None)
        io.run_all()  # the promotion lands
        (local,) = store.acquire(1, [key(1)])
        assert local is not None and local.tier is Tier.SHM
        store.release(1, [key(1)])
        for i in range(5, 12):
            put(store, tiers, [i])
            io.run_all()
        assert self.read_file(tiers, peer) == data(1), "the file slot was reused while leased"
        assert store.release(9, [key(1)]) == 1
        io.run_all()
        allocated = sum(t.statistics().num_allocations for t in tiers)
        assert allocated == len(store.snapshot())

    def test_deleting_it_mid_promotion_frees_the_file_slot_once(self, tmp_path: Path) -> None:
        store, io, tiers = self.make(tmp_path)
        (peer,) = store.acquire(9, [key(1)], promote=False)
        assert peer is not None
        assert not store.prepare([key(1)], lambda: None)
        assert store.delete([key(1)]) == 1
        io.run_all()  # the promotion finds the block gone: its SHM slot is freed
        ssd_blocks = store.statistics().tiers[1].num_blocks
        assert tiers[1].statistics().num_allocations == ssd_blocks + 1, "the peer reads it"
        assert store.release(9, [key(1)]) == 1  # frees it, once (a double free asserts)
        assert tiers[1].statistics().num_allocations == ssd_blocks
        assert sum(t.statistics().num_allocations for t in tiers) == len(store.snapshot())
