"""The daemon's batch calls (``reserve_columns``, ``acquire_columns``) answer exactly what
the per-block calls answer, as the wire carries it; a store without listeners keeps no
events (issue 17: the daemon's hot path)."""

from __future__ import annotations

import pytest

from kvcache.allocator import SlabAllocator
from kvcache.store import BlockStore, EventKind, ReserveStatus
from kvcache.tiers import MemoryBacking, Tier, TierStore, block_checksum
from tests.unit.test_store import BLOCK, data, key, make_store, put

OK, EXISTS, NO_SPACE = ReserveStatus.OK, ReserveStatus.EXISTS, ReserveStatus.NO_SPACE


def test_reserve_columns_answer_a_status_byte_and_an_offset_per_key() -> None:
    columns, _ = make_store(shm_blocks=4, dram_blocks=0)
    objects, _ = make_store(shm_blocks=4, dram_blocks=0)
    for store in (columns, objects):
        store.reserve(1, [key(1)], [BLOCK])
        store.commit(1, [key(1)], [0])
        store.acquire(1, [key(1)])  # leased, so pinned
        store.reserve(1, [key(2), key(3)], [BLOCK, BLOCK])  # reserved, so pinned
    keys = [key(i) for i in (1, 4, 5, 6, 7)]  # exists, ok, no space, no space, no space
    statuses, offsets = columns.reserve_columns(1, keys, [BLOCK] * 5, key(0))
    results = objects.reserve(1, keys, [BLOCK] * 5, key(0))
    assert list(statuses) == [EXISTS, OK, NO_SPACE, NO_SPACE, NO_SPACE]
    assert [r.status for r in results] == list(statuses)
    assert offsets[1] == results[1].offset and offsets[1] >= 0
    assert [offsets[i] for i in (0, 2, 3, 4)] == [0, 0, 0, 0]  # the wire's "no slot"
    assert columns.statistics().no_space == objects.statistics().no_space == 3


@pytest.mark.parametrize(("sizes", "message"), [([BLOCK, 0], "block size 0 is outside"),
                                                ([BLOCK + 1, BLOCK], f"block size {BLOCK + 1}")])  # fmt: skip
def test_reserve_columns_name_the_first_size_out_of_range(sizes: list[int], message: str) -> None:
    store, _ = make_store()
    with pytest.raises(ValueError, match=message):
        store.reserve_columns(1, [key(1), key(2)], sizes)
    assert store.statistics().num_reservations == 0, "a refused batch reserves nothing"


@pytest.mark.parametrize("keys", [[key(1), key(1)], [key(0), key(2)]])
def test_a_key_repeated_in_its_chain_is_refused(keys: list[bytes]) -> None:
    store, _ = make_store()
    with pytest.raises(ValueError, match="its own parent"):
        store.reserve_columns(1, keys, [BLOCK, BLOCK], parent=key(0))


def test_acquire_columns_lease_a_prefix_and_mark_its_end_with_one_miss() -> None:
    store, tiers = make_store(shm_blocks=4, dram_blocks=0)
    put(store, tiers, [1, 2, 4])
    offsets, sizes, checksums = store.acquire_columns(1, [key(i) for i in (1, 2, 3, 4)])
    assert offsets[2] == -1 and len(offsets) == 3, "the answer ends at the first miss"
    assert sizes == [BLOCK, BLOCK, 0]
    assert checksums == [block_checksum(data(1)), block_checksum(data(2)), 0]
    shm = tiers[0].backing
    assert isinstance(shm, MemoryBacking)
    assert bytes(shm.view(offsets[1], BLOCK)) == data(2)
    stats = store.statistics()
    assert (stats.num_leases, stats.misses, stats.tiers[0].hits) == (2, 1, 2)
    assert stats.tiers[0].bytes_out == 2 * BLOCK
    assert store.release(1, [key(1), key(2)]) == 2


def test_acquire_columns_without_prefix_answer_every_key() -> None:
    store, tiers = make_store(shm_blocks=4, dram_blocks=0)
    put(store, tiers, [1, 3])
    offsets, sizes, _ = store.acquire_columns(1, [key(i) for i in (1, 2, 3)], prefix=False)
    assert offsets[1] == -1 and offsets[0] >= 0 and offsets[2] >= 0
    assert sizes == [BLOCK, 0, BLOCK]
    assert store.statistics().num_leases == 2


def test_acquire_columns_promote_a_warm_block_into_the_arena() -> None:
    store, tiers = make_store(shm_blocks=1, dram_blocks=2)
    put(store, tiers, [1])
    put(store, tiers, [2])  # demotes block 1 to DRAM
    assert dict(store.snapshot())[key(1)] is Tier.DRAM
    store.release(1, [])
    offsets, _, checksums = store.acquire_columns(1, [key(1)])
    shm = tiers[0].backing
    assert isinstance(shm, MemoryBacking)
    assert bytes(shm.view(offsets[0], BLOCK)) == data(1)
    assert checksums == [block_checksum(data(1))]
    assert dict(store.snapshot())[key(1)] is Tier.SHM
    assert store.statistics().tiers[1].hits == 1, "the hit is the warm tier's"


def test_a_store_without_listeners_keeps_no_events() -> None:
    tiers = [TierStore(Tier.SHM, SlabAllocator(4 * BLOCK, slab_bytes=BLOCK),
                       MemoryBacking.anonymous(4 * BLOCK))]  # fmt: skip
    quiet = BlockStore(tiers, policy="lru", record_events=False)
    quiet.open_session(1)
    put(quiet, tiers, [1, 2])
    quiet.delete([key(1)])
    quiet.clear()
    assert quiet.take_events() == []
    loud, loud_tiers = make_store()
    put(loud, loud_tiers, [1])
    assert [e.kind for e in loud.take_events()] == [EventKind.STORED]
