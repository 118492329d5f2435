"""``BlockStore.clear`` (an operator's flush): every block disappears at once, but the
loop pays O(reservations + moves), not O(blocks); the slots are freed in idle steps or
when an allocation needs them (review M3: no O(N) pass on the daemon's loop)."""

from __future__ import annotations

from kvcache.store import EventKind, ReserveStatus
from kvcache.tiers import MemoryBacking, Tier, TierStore, block_checksum
from tests.unit.test_store import data, key, make_store, put, read


def allocations(tiers: list[TierStore]) -> int:
    return sum(t.statistics().num_allocations for t in tiers)


def test_a_flush_hides_every_block_at_once_and_frees_the_slots_in_steps() -> None:
    store, tiers = make_store(shm_blocks=4, dram_blocks=4)
    assert put(store, tiers, [0, 1, 2, 3]) == 4
    assert put(store, tiers, [4, 5, 6, 7]) == 4  # 0..3 go down to DRAM
    store.take_events()
    assert store.clear() == 8
    assert store.lookup([key(i) for i in range(8)]) == 0
    assert [e.kind for e in store.take_events()] == [EventKind.CLEARED]
    assert allocations(tiers) == 8, "nothing freed on the loop yet"
    assert all(t.num_blocks == 0 for t in store.statistics().tiers)
    assert store.flush_policies(limit=3) is True  # 3 of 8 slots freed
    assert allocations(tiers) == 5
    while store.flush_policies(limit=3):
        pass
    assert allocations(tiers) == 0
    assert store.statistics().dropped == 8


def test_a_write_after_a_flush_takes_the_room_at_once_and_outlives_the_reclaim() -> None:
    store, tiers = make_store(shm_blocks=4, dram_blocks=0)
    assert put(store, tiers, [1, 2, 3, 4]) == 4
    store.clear()
    # SHM is still full of the flushed blocks' slots: the reserve reclaims them itself.
    assert put(store, tiers, [1, 5, 6, 7]) == 4, "same key 1 again, and three new ones"
    while store.flush_policies(limit=1):
        pass
    assert read(store, tiers, [1, 5, 6, 7]) == [data(1), data(5), data(6), data(7)]
    assert allocations(tiers) == 4
    assert [t.num_blocks for t in store.statistics().tiers] == [4]


def test_a_block_leased_during_a_flush_keeps_its_bytes_until_released() -> None:
    store, tiers = make_store(shm_blocks=2, dram_blocks=0)
    put(store, tiers, [1, 2])
    (lease,) = store.acquire(1, [key(1)])
    assert lease is not None
    store.clear()
    while store.flush_policies(limit=1):
        pass
    # Two reservations at once: the unleased block's slot is free again, the leased
    # one's is not (and reserved slots cannot be evicted to make room).
    assert put(store, tiers, [3, 4]) == 1
    shm = tiers[0].backing
    assert isinstance(shm, MemoryBacking)
    assert bytes(shm.view(lease.offset, lease.nbytes)) == data(1)
    assert store.release(1, [key(1)]) == 1
    assert put(store, tiers, [5, 6]) == 2, "3 evicted, and the leased slot free again"


def test_reservations_in_progress_survive_a_flush() -> None:
    store, tiers = make_store(shm_blocks=4, dram_blocks=0)
    put(store, tiers, [1])
    (result,) = store.reserve(1, [key(9)], [len(data(9))])
    assert result.status is ReserveStatus.OK
    assert store.clear() == 1
    shm = tiers[0].backing
    assert isinstance(shm, MemoryBacking)
    shm.write(result.offset, memoryview(data(9)))
    assert store.commit(1, [key(9)], [block_checksum(data(9))]) == 1
    while store.flush_policies():
        pass
    assert read(store, tiers, [9]) == [data(9)]
    assert dict(store.snapshot()) == {key(9): Tier.SHM}
