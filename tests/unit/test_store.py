"""The block store's contract: two-phase put, leased get, tiering, integrity, reclamation."""

from __future__ import annotations

from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.allocator import SlabAllocator
from kvcache.store import BlockStore, EventKind, Lease, ReserveStatus
from kvcache.tiers import FileBacking, MemoryBacking, Tier, TierStore, block_checksum

KiB = 1 << 10
BLOCK = 64 * KiB
PEER = 3  # the session id of the cluster's peer reads in the state machine


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_store(
    shm_blocks: int = 4, dram_blocks: int = 4, clock: FakeClock | None = None
) -> tuple[BlockStore, list[TierStore]]:
    tiers = [
        TierStore(
            Tier.SHM,
            SlabAllocator(shm_blocks * BLOCK, slab_bytes=BLOCK),
            MemoryBacking.anonymous(shm_blocks * BLOCK),
        )
    ]
    if dram_blocks:
        tiers.append(
            TierStore(
                Tier.DRAM,
                SlabAllocator(dram_blocks * BLOCK, slab_bytes=BLOCK),
                MemoryBacking.anonymous(dram_blocks * BLOCK),
            )
        )
    store = BlockStore(tiers, policy="lru", reservation_ttl_s=10, clock=clock or FakeClock())
    store.open_session(1)
    return store, tiers


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def data(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK


def put(store: BlockStore, tiers: list[TierStore], ids: list[int], session: int = 1) -> int:
    """Reserve, write and commit blocks like a client would; returns how many committed."""
    keys = [key(i) for i in ids]
    results = store.reserve(session, keys, [BLOCK] * len(keys))
    written, sums = [], []
    for i, result in zip(ids, results, strict=True):
        if result.status is ReserveStatus.OK:
            assert isinstance(tiers[0].backing, MemoryBacking)
            tiers[0].backing.write(result.offset, memoryview(data(i)))
            written.append(key(i))
            sums.append(block_checksum(data(i)))
    return store.commit(session, written, sums)


def read(store: BlockStore, tiers: list[TierStore], ids: list[int]) -> list[bytes]:
    leases = store.acquire(1, [key(i) for i in ids])
    out = []
    for lease in leases:
        if lease is None:
            break
        assert isinstance(tiers[0].backing, MemoryBacking)
        out.append(bytes(tiers[0].backing.view(lease.offset, lease.nbytes)))
    store.release(1, [lease.key for lease in leases if lease is not None])
    return out


class TestTwoPhasePut:
    def test_reserved_blocks_are_invisible_until_committed(self) -> None:
        store, _ = make_store()
        results = store.reserve(1, [key(1)], [BLOCK])
        assert results[0].status is ReserveStatus.OK
        assert store.lookup([key(1)]) == 0
        assert store.acquire(1, [key(1)]) == [None]
        assert store.commit(1, [key(1)], [block_checksum(data(1))]) == 1
        assert store.lookup([key(1)]) == 1

    def test_a_second_reservation_of_the_same_key_reports_exists(self) -> None:
        store, _ = make_store()
        store.open_session(2)
        store.reserve(1, [key(1)], [BLOCK])
        assert store.reserve(2, [key(1)], [BLOCK])[0].status is ReserveStatus.EXISTS

    def test_only_the_reserving_session_can_commit(self) -> None:
        store, _ = make_store()
        store.open_session(2)
        store.reserve(1, [key(1)], [BLOCK])
        assert store.commit(2, [key(1)], [0]) == 0
        assert store.lookup([key(1)]) == 0

    def test_expired_reservations_are_reclaimed_and_never_served(self) -> None:
        clock = FakeClock()
        store, _ = make_store(clock=clock)
        store.reserve(1, [key(1), key(2)], [BLOCK, BLOCK])
        clock.now = 11
        assert store.expire() == 2
        assert store.commit(1, [key(1)], [0]) == 0
        assert store.statistics().num_reservations == 0
        assert store.lookup([key(1)]) == 0

    def test_closing_a_session_aborts_reservations_and_releases_leases(self) -> None:
        store, tiers = make_store()
        put(store, tiers, [1, 2])
        store.open_session(2)
        assert all(store.acquire(2, [key(1), key(2)]))
        store.reserve(2, [key(3)], [BLOCK])
        store.close_session(2)
        stats = store.statistics()
        assert (stats.num_leases, stats.num_reservations, stats.num_sessions) == (0, 0, 1)

    def test_bad_sizes_are_value_errors(self) -> None:
        store, _ = make_store()
        with pytest.raises(ValueError, match="outside"):
            store.reserve(1, [key(1)], [BLOCK + 1])
        with pytest.raises(ValueError, match="sizes"):
            store.reserve(1, [key(1)], [])


class TestTiers:
    def test_pressure_demotes_to_dram_and_a_hit_promotes_back_intact(self) -> None:
        store, tiers = make_store(shm_blocks=2, dram_blocks=4)
        assert sum(put(store, tiers, [i]) for i in [1, 2, 3, 4]) == 4
        stats = store.statistics()
        assert [t.num_blocks for t in stats.tiers] == [2, 2]
        # Blocks 1 and 2 were demoted; a get promotes them. Four leases cannot fit in two
        # SHM slots, so the answer is the prefix that fits, never a block past a gap.
        assert read(store, tiers, [1, 2, 3, 4]) == [data(1), data(2)]
        assert store.statistics().tiers[1].hits == 2
        assert read(store, tiers, [3, 4]) == [data(3), data(4)]

    def test_without_a_lower_tier_eviction_drops_and_emits_an_event(self) -> None:
        store, tiers = make_store(shm_blocks=2, dram_blocks=0)
        assert put(store, tiers, [1, 2, 3]) == 2, "reserved slots are not evictable"
        put(store, tiers, [3])
        assert store.lookup([key(1)]) == 0
        events = store.take_events()
        assert [e.kind for e in events].count(EventKind.STORED) == 3
        assert any(e.kind is EventKind.REMOVED and e.key == key(1) for e in events)
        assert store.take_events() == []

    def test_leased_blocks_are_never_evicted_full_is_no_space(self) -> None:
        store, tiers = make_store(shm_blocks=2, dram_blocks=0)
        put(store, tiers, [1, 2])
        leases = store.acquire(1, [key(1), key(2)])
        results = store.reserve(1, [key(3), key(4)], [BLOCK, BLOCK])
        assert [r.status for r in results] == [ReserveStatus.NO_SPACE, ReserveStatus.NO_SPACE]
        assert store.lookup([key(1), key(2)]) == 2
        store.release(1, [lease.key for lease in leases if lease])
        assert store.reserve(1, [key(3)], [BLOCK])[0].status is ReserveStatus.OK

    def test_a_corrupt_block_is_dropped_when_it_crosses_a_tier(self) -> None:
        store, tiers = make_store(shm_blocks=1, dram_blocks=2)
        put(store, tiers, [1])
        assert isinstance(tiers[0].backing, MemoryBacking)
        tiers[0].backing.write(0, memoryview(b"rot!"))  # bit rot after commit
        put(store, tiers, [2])  # demotes block 1: the checksum catches the rot
        assert store.lookup([key(1)]) == 0
        assert store.statistics().checksum_failures == 1
        assert read(store, tiers, [2]) == [data(2)]

    def test_an_io_error_moving_a_block_is_a_miss_and_leaks_no_slot(self, tmp_path: Path) -> None:
        shm = TierStore(
            Tier.SHM, SlabAllocator(BLOCK, slab_bytes=BLOCK), MemoryBacking.anonymous(BLOCK)
        )
        ssd = TierStore(
            Tier.SSD,
            SlabAllocator(4 * BLOCK, slab_bytes=BLOCK),
            FileBacking(tmp_path / "spill", 4 * BLOCK),
        )
        store = BlockStore([shm, ssd], policy="lru")
        store.open_session(1)

        def disk_full(offset: int, data: memoryview) -> None:
            raise OSError(28, "No space left on device")

        ssd.backing.write = disk_full  # type: ignore[method-assign]
        put(store, [shm, ssd], [1])
        put(store, [shm, ssd], [2])  # demotes block 1: the spill write fails
        stats = store.statistics()
        assert store.lookup([key(1)]) == 0
        assert stats.io_errors == 1
        assert stats.tiers[1].used_bytes == 0, "the SSD slot taken for the move was given back"
        assert read(store, [shm, ssd], [2]) == [data(2)]
        ssd.close()

    def test_deleting_a_leased_block_hides_it_and_frees_it_on_release(self) -> None:
        store, tiers = make_store(shm_blocks=1, dram_blocks=0)
        put(store, tiers, [1])
        lease = store.acquire(1, [key(1)])[0]
        assert lease is not None
        assert store.delete([key(1)]) == 1
        assert store.lookup([key(1)]) == 0
        assert store.reserve(1, [key(2)], [BLOCK])[0].status is ReserveStatus.NO_SPACE
        store.release(1, [key(1)])
        assert store.reserve(1, [key(2)], [BLOCK])[0].status is ReserveStatus.OK

    def test_deleting_a_block_that_fails_its_checksum_counts_the_corruption(self) -> None:
        # A reader that finds a leased block corrupt deletes it; the daemon verifies the
        # bytes and counts what it confirms (the e2e corruption test found no count).
        store, tiers = make_store(shm_blocks=2, dram_blocks=0)
        put(store, tiers, [1, 2])
        leases = store.acquire(1, [key(1), key(2)])
        assert all(lease is not None for lease in leases)
        assert isinstance(tiers[0].backing, MemoryBacking)
        first = leases[0]
        assert first is not None
        tiers[0].backing.write(first.offset + 7, memoryview(b"\xff"))  # a flipped byte
        store.release(1, [key(1), key(2)])
        assert store.delete([key(2)]) == 1
        assert store.statistics().checksum_failures == 0, "a good block is no corruption"
        assert store.delete([key(1)]) == 1
        assert store.statistics().checksum_failures == 1
        assert store.lookup([key(1)]) == 0

    def test_get_stops_at_the_first_miss_of_a_chain(self) -> None:
        store, tiers = make_store()
        put(store, tiers, [1, 3])
        leases = store.acquire(1, [key(1), key(2), key(3)])
        assert [lease is not None for lease in leases] == [True, False]
        unordered = store.acquire(1, [key(1), key(2), key(3)], prefix=False)
        assert [lease is not None for lease in unordered] == [True, False, True]


class StoreMachine(RuleBasedStateMachine):
    """Random interleavings of two clients and a peer keep the store's invariant (module
    docstring): among them, the bytes of every outstanding lease stay intact until it is
    released, also for a peer's lease taken in place (``promote=False``) on a block that a
    client then promotes (review m15)."""

    def __init__(self) -> None:
        super().__init__()
        self.store, self.tiers = make_store(shm_blocks=3, dram_blocks=3)
        self.store.open_session(2)
        self.store.open_session(PEER)  # the cluster's: leases in place, no TTL
        self.reserved: dict[int, dict[int, int]] = {1: {}, 2: {}}  # session -> id -> offset
        self.leased: dict[int, list[int]] = {1: [], 2: [], PEER: []}
        self.lease_views: dict[int, list[tuple[int, Lease]]] = {1: [], 2: [], PEER: []}
        self.committed: set[int] = set()  # ids committed at some point (may be evicted)

    @rule(
        session=st.sampled_from([1, 2]),
        ids=st.lists(st.integers(0, 9), min_size=1, max_size=3, unique=True),
    )
    def reserve(self, session: int, ids: list[int]) -> None:
        results = self.store.reserve(session, [key(i) for i in ids], [BLOCK] * len(ids))
        for i, result in zip(ids, results, strict=True):
            if result.status is ReserveStatus.OK:
                self.reserved[session][i] = result.offset
                assert isinstance(self.tiers[0].backing, MemoryBacking)
                self.tiers[0].backing.write(result.offset, memoryview(data(i)))

    @rule(session=st.sampled_from([1, 2]))
    def commit(self, session: int) -> None:
        ids = list(self.reserved[session])
        self.store.commit(session, [key(i) for i in ids], [block_checksum(data(i)) for i in ids])
        self.committed.update(ids)
        self.reserved[session].clear()

    @rule(session=st.sampled_from([1, 2]), ids=st.lists(st.integers(0, 9), min_size=1, max_size=3))
    def get(self, session: int, ids: list[int]) -> None:
        for lease in self.store.acquire(session, [key(i) for i in ids], prefix=False):
            if lease is not None:
                i = int.from_bytes(lease.key, "little")
                assert isinstance(self.tiers[0].backing, MemoryBacking)
                view = self.tiers[0].backing.view(lease.offset, lease.nbytes)
                assert bytes(view) == data(i), "a leased block must hold exactly what was committed"
                self.leased[session].append(i)
                self.lease_views[session].append((i, lease))

    @rule(ids=st.lists(st.integers(0, 9), min_size=1, max_size=3))
    def peer_get(self, ids: list[int]) -> None:
        for lease in self.store.acquire(PEER, [key(i) for i in ids], prefix=False, promote=False):
            if lease is not None:
                i = int.from_bytes(lease.key, "little")
                self.leased[PEER].append(i)
                self.lease_views[PEER].append((i, lease))

    @precondition(lambda self: any(self.leased.values()))
    @rule(session=st.sampled_from([1, 2, PEER]))
    def release(self, session: int) -> None:
        self.store.release(session, [key(i) for i in self.leased[session]])
        self.leased[session].clear()
        self.lease_views[session].clear()

    @rule(ids=st.lists(st.integers(0, 9), min_size=1, max_size=3))
    def delete(self, ids: list[int]) -> None:
        self.store.delete([key(i) for i in ids])

    @rule(session=st.sampled_from([1, 2]))
    def crash(self, session: int) -> None:
        self.store.close_session(session)
        self.store.open_session(session)
        self.reserved[session].clear()
        self.leased[session].clear()
        self.lease_views[session].clear()

    @invariant()
    def leased_bytes_stay_intact_until_released(self) -> None:
        for views in self.lease_views.values():
            for i, lease in views:
                backing = self.store.backing(lease.tier)
                assert isinstance(backing, MemoryBacking)
                assert bytes(backing.view(lease.offset, lease.nbytes)) == data(i), (
                    f"block {i} leased in {lease.tier.label} was overwritten while leased"
                )

    @invariant()
    def leases_are_counted_exactly(self) -> None:
        stats = self.store.statistics()
        assert stats.num_leases == sum(len(held) for held in self.leased.values())
        assert stats.num_reservations == len(self.reserved[1]) + len(self.reserved[2])

    @invariant()
    def space_is_accounted(self) -> None:
        stats = self.store.statistics()
        shm = stats.tiers[0]
        # Every used SHM slot is a resident block, a reservation, or a deleted-but-leased block.
        assert shm.used_bytes >= (shm.num_blocks + stats.num_reservations) * BLOCK
        assert shm.used_bytes <= shm.capacity_bytes
        visible = self.store.lookup([key(i) for i in range(10)])
        assert visible <= len(self.committed)
        # A retired slot (a promoted block's old one, still leased in place) is no block.
        assert sum(t.num_blocks for t in stats.tiers) == len(self.store.snapshot())

    def teardown(self) -> None:
        for session in (1, 2, PEER):
            self.store.close_session(session)
        allocated = sum(t.statistics().num_allocations for t in self.tiers)
        assert allocated == len(self.store.snapshot()), "a leased slot leaked past its leases"

    @invariant()
    def reserved_keys_are_invisible(self) -> None:
        for ids in self.reserved.values():
            for i in ids:
                assert self.store.lookup([key(i)]) == 0


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


class TestPolicySizing:
    """Policies are sized in the blocks a tier really holds (review finding M7)."""

    MiB = 1 << 20

    def make_tier_of_1gib(self, policy: str) -> BlockStore:
        # Anonymous memory is only touched where written; commits here write nothing.
        tier = TierStore(
            Tier.SHM,
            SlabAllocator(1 << 30, slab_bytes=64 * self.MiB),
            MemoryBacking.anonymous(1 << 30),
        )
        store = BlockStore([tier], policy=policy, clock=FakeClock())
        store.open_session(1)
        return store

    def commit(self, store: BlockStore, ids: list[int], nbytes: int) -> None:
        keys = [key(i) for i in ids]
        results = store.reserve(1, keys, [nbytes] * len(keys))
        assert all(r.status is ReserveStatus.OK for r in results)
        assert store.commit(1, keys, [0] * len(keys)) == len(keys)

    def test_32mib_blocks_in_a_1gib_tier_make_a_32_block_cache(self) -> None:
        from kvcache.eviction import S3FIFOPolicy

        store = self.make_tier_of_1gib("s3fifo")
        self.commit(store, [0], 32 * self.MiB)
        sizing = store._policies[0]
        assert sizing.capacity_blocks == 32, "1 GiB / 32 MiB, not 1 GiB / 256 KiB = 4096"
        policy = sizing.policy
        assert isinstance(policy, S3FIFOPolicy)
        assert policy.small_capacity == 3, "S3-FIFO's small queue is 10% of the real tier"

    def test_s3fifo_keeps_a_block_read_once_through_a_scan_of_the_real_tier(self) -> None:
        store = self.make_tier_of_1gib("s3fifo")
        self.commit(store, [0], 32 * self.MiB)
        assert store.acquire(1, [key(0)])[0] is not None  # read while in the small queue
        store.release(1, [key(0)])
        for start in range(1, 200, 8):  # a scan of one-hit blocks, 6x the tier
            self.commit(store, list(range(start, start + 8)), 32 * self.MiB)
        assert store.lookup([key(0)]) == 1, "the block read once went to main and stayed"

    def test_the_size_follows_the_blocks_when_they_change(self) -> None:
        store = self.make_tier_of_1gib("default")
        self.commit(store, [0], 32 * self.MiB)
        assert store._policies[0].capacity_blocks == 32
        self.commit(store, list(range(1, 200)), 1 * self.MiB)
        assert store._policies[0].capacity_blocks == 1024


class TestBlockSizeLimits:
    """A block too large for a tier is an answer, never a crash (review finding M8)."""

    def test_a_block_over_the_largest_slot_is_a_value_error_naming_both_sizes(self) -> None:
        store, _ = make_store()
        with pytest.raises(
            ValueError, match=r"block size 131072 is outside 1\.\.65536.*max_block_bytes"
        ):
            store.reserve(1, [key(0)], [2 * BLOCK])

    def test_demotion_skips_a_lower_tier_too_small_for_the_block(self) -> None:
        big = 4 * BLOCK
        tiers = [
            TierStore(Tier.SHM, SlabAllocator(2 * big, slab_bytes=big),
                      MemoryBacking.anonymous(2 * big)),
            TierStore(Tier.DRAM, SlabAllocator(BLOCK, slab_bytes=big),  # largest block: BLOCK
                      MemoryBacking.anonymous(BLOCK)),
        ]  # fmt: skip
        store = BlockStore(tiers, policy="lru", clock=FakeClock())
        store.open_session(1)
        for i in range(4):  # the third and fourth evict: DRAM cannot take a block this big
            results = store.reserve(1, [key(i)], [big])
            assert results[0].status is ReserveStatus.OK
            store.commit(1, [key(i)], [0])
        assert store.lookup([key(2)]) == 1 and store.lookup([key(3)]) == 1
        assert store.lookup([key(0)]) == 0, "dropped, as from a bottom tier"
        assert store.statistics().dropped == 2


class TestLongScans:
    """Operator scans run in bounded steps (review finding M3: no O(N) pass on the loop)."""

    def test_evict_in_steps_checks_a_bounded_number_of_blocks_per_step(self) -> None:
        store, tiers = make_store(shm_blocks=16, dram_blocks=0)
        assert put(store, tiers, list(range(10))) == 10
        steps = store.evict_steps(step=4)
        next(steps)  # blocks 0-3 checked and removed; 4-9 untouched so far
        assert store.lookup([key(i) for i in range(4)]) == 0
        assert store.lookup([key(i) for i in range(4, 10)]) == 6
        store.delete([key(5)])  # an engine's delete between two steps
        assert put(store, tiers, [20]) == 1  # stored after the scan began: not considered
        list(steps)  # the remaining steps
        assert store.lookup([key(20)]) == 1
        assert store.lookup([key(i) for i in range(10)]) == 0

    def test_evict_in_steps_returns_how_many_it_removed(self) -> None:
        store, tiers = make_store(shm_blocks=16, dram_blocks=0)
        put(store, tiers, list(range(10)))
        assert store.evict(key_prefix=key(3).hex()[:8]) == 1
        steps = store.evict_steps(step=3)
        with pytest.raises(StopIteration) as finished:
            while True:
                next(steps)
        assert finished.value.value == 9

    def test_hot_keys_are_shm_first_and_capped(self) -> None:
        store, tiers = make_store(shm_blocks=2, dram_blocks=4)
        for i in range(4):  # 0 and 1 are demoted to DRAM to make room
            assert put(store, tiers, [i]) == 1
        hot = store.hot_keys(3)
        assert hot[:2] == [key(2), key(3)] and hot[2] in (key(0), key(1))
        assert store.hot_keys(1) == [key(2)]
