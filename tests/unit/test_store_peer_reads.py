"""``BlockStore.acquire(promote=False)``: a read for a peer leaves every block where it lies
(review m7), while the lease still pins it."""

from __future__ import annotations

from kvcache.store import BlockStore
from kvcache.tiers import MemoryBacking, Tier
from tests.unit.test_store import data, key, make_store, put


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
