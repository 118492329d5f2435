"""``BlockStore.snapshot_columns``: what a peer's resync is sent, in one fast pass."""

from __future__ import annotations

from kvcache.keys import KEY_BYTES
from kvcache.store import ReserveStatus
from tests.unit.test_store import BLOCK, key, make_store, put


def test_the_columns_hold_every_committed_block_and_its_tier_in_one_order() -> None:
    store, tiers = make_store(shm_blocks=2, dram_blocks=4)
    put(store, tiers, [1, 2])
    put(store, tiers, [3, 4])  # 1 and 2 down to DRAM
    (result,) = store.reserve(1, [key(9)], [BLOCK])  # reserved: not in a snapshot
    assert result.status is ReserveStatus.OK
    keys, tiers_bytes = store.snapshot_columns()
    pairs = [(keys[i * KEY_BYTES : (i + 1) * KEY_BYTES], tiers_bytes[i])
             for i in range(len(tiers_bytes))]  # fmt: skip
    assert pairs == [(k, int(t)) for k, t in store.snapshot()]
    assert {k for k, _ in pairs} == {key(i) for i in (1, 2, 3, 4)}
