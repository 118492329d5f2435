"""Leases expire on their own TTL, renewed by the reading calls, never by liveness alone."""

from __future__ import annotations

from kvcache.store import ReserveStatus
from tests.unit.test_store import BLOCK, FakeClock, key, make_store, put


def test_a_readers_leases_expire_lease_ttl_after_its_last_reading_call() -> None:
    clock = FakeClock()
    store, tiers = make_store(shm_blocks=2, dram_blocks=0, clock=clock)
    store.open_session(2, lease_ttl_s=5.0)
    put(store, tiers, [1, 2])
    assert all(store.acquire(2, [key(1), key(2)]))
    clock.now = 4.9
    assert store.expire_leases() == 0
    assert store.reserve(1, [key(3)], [BLOCK])[0].status is ReserveStatus.NO_SPACE, "pinned"
    clock.now = 5.0
    assert store.expire_leases() == 2
    stats = store.statistics()
    assert (stats.num_leases, stats.expired_leases, stats.num_sessions) == (0, 2, 2)
    # Unpinned: the blocks are evictable again, and the session itself lives on.
    assert store.reserve(1, [key(3)], [BLOCK])[0].status is ReserveStatus.OK
    store.release(2, [key(1), key(2)])  # a late release of expired leases is a no-op
    assert store.statistics().num_leases == 0


def test_every_get_or_release_renews_all_the_sessions_leases() -> None:
    clock = FakeClock()
    store, tiers = make_store(shm_blocks=4, dram_blocks=0, clock=clock)
    store.open_session(2, lease_ttl_s=5.0)
    put(store, tiers, [1, 2, 3])
    assert all(store.acquire(2, [key(1)]))
    clock.now = 4.0
    assert all(store.acquire(2, [key(2)]))  # renews the lease on key(1) too
    clock.now = 8.0
    assert store.expire_leases() == 0
    store.release(2, [key(2)])  # renews again
    clock.now = 12.9
    assert store.expire_leases() == 0
    clock.now = 13.0
    assert store.expire_leases() == 1
    assert store.statistics().num_leases == 0


def test_sessions_opened_without_a_lease_ttl_keep_their_leases() -> None:
    clock = FakeClock()
    store, tiers = make_store(clock=clock)  # session 1: no TTL (the cluster's peer session)
    put(store, tiers, [1])
    assert all(store.acquire(1, [key(1)]))
    clock.now = 1e9
    assert store.expire_leases() == 0
    assert store.statistics().num_leases == 1
