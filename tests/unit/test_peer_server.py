"""``PeerServer``: a peer's fetch of SSD blocks reads them on the I/O workers, not on the
daemon's loop (review M3), with the lease held until the read lands, no promotion into
SHM (review m7), checksums verified, and no reply once the requester has given up.

``QueuedIo`` holds every file read until the test runs it: what the server answers (and
what the store holds) *while* the disk works is what these tests check.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import invariant, precondition, rule
from prometheus_client import CollectorRegistry

from kvcache.allocator import SlabAllocator
from kvcache.cluster import messages as cm
from kvcache.cluster.fetch import PEER_SESSION, PeerServer
from kvcache.cluster.metrics import ClusterMetrics
from kvcache.io_workers import QueuedIo
from kvcache.keys import join_keys
from kvcache.store import BlockStore, Lease, ReserveStatus
from kvcache.tiers import FileBacking, MemoryBacking, Tier, TierStore, block_checksum, padded
from tests.unit.test_store_moves import PEER, MovesMachine

KiB = 1 << 10
BLOCK = 64 * KiB


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def data(i: int) -> bytes:
    return bytes([i % 251]) * BLOCK


class Tracker:
    """Stands in for ZeroMQ's MessageTracker: the test says when the frames are sent."""

    done = False


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


class Fixture:
    """SHM of 2 blocks, DRAM of 2, an SSD file of 8; file I/O held in a queue."""

    def __init__(self, tmp_path: Path) -> None:
        self.tiers = [
            TierStore(tier, SlabAllocator(2 * BLOCK, slab_bytes=BLOCK),
                      MemoryBacking.anonymous(2 * BLOCK))
            for tier in (Tier.SHM, Tier.DRAM)
        ]  # fmt: skip
        self.tiers.append(TierStore(Tier.SSD, SlabAllocator(8 * BLOCK, slab_bytes=BLOCK),
                                    FileBacking(tmp_path / "spill", 8 * BLOCK)))  # fmt: skip
        self.io = QueuedIo()
        self.store = BlockStore(self.tiers, policy="lru", io=self.io)
        self.store.open_session(PEER_SESSION)
        self.store.open_session(1)
        self.sent: list[list[Any]] = []
        self.trackers: list[Tracker] = []
        self.clock = Clock()
        self.metrics = ClusterMetrics(CollectorRegistry())
        self.server = PeerServer(self.store, self.metrics, self.send, reply_timeout_s=5.0,
                                 clock=self.clock)  # fmt: skip

    def send(self, frames: list[Any], *, track: bool = False) -> Tracker:
        self.sent.append(frames)
        self.trackers.append(Tracker())
        return self.trackers[-1]

    def put(self, *ids: int) -> None:
        for i in ids:
            (result,) = self.store.reserve(1, [key(i)], [BLOCK])
            assert result.status is ReserveStatus.OK
            shm = self.tiers[0].backing
            assert isinstance(shm, MemoryBacking)
            shm.write(result.offset, memoryview(data(i)))
            assert self.store.commit(1, [key(i)], [block_checksum(data(i))]) == 1
        self.io.run_all()  # demotions to the SSD land

    def tier_of(self, i: int) -> Tier:
        return dict(self.store.snapshot())[key(i)]

    def fetch(self, *ids: int) -> None:
        request = cm.FetchRequest(7, "node-b", join_keys([key(i) for i in ids]))
        self.server.serve(b"peer-b", request, cm.VERSION)

    def reply(self, n: int = -1) -> tuple[dict[str, Any], list[bytes]]:
        frames = self.sent[n]
        assert frames[0] == b"peer-b"
        return cm.decode_reply(frames[1]), [bytes(f) for f in frames[2:]]

    def slots_match_blocks(self) -> bool:
        allocated = sum(t.statistics().num_allocations for t in self.tiers)
        return allocated == len(self.store.snapshot())


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    return Fixture(tmp_path)


def test_an_ssd_block_is_read_on_a_worker_and_sent_when_the_read_lands(fx: Fixture) -> None:
    fx.put(1, 2, 3, 4, 5, 6)  # 1 and 2 go down to the SSD
    assert fx.tier_of(1) is Tier.SSD and fx.tier_of(5) is Tier.SHM
    shm_before = {k: t for k, t in fx.store.snapshot() if t is Tier.SHM}

    fx.fetch(5, 1, 9)
    assert fx.sent == [], "no reply, and no disk read, on the loop"
    assert fx.io.num_pending == 1
    # Leased while its read is in flight: deleting the block does not free its slot.
    assert fx.store.delete([key(1)]) == 1
    ssd = fx.tiers[2].statistics().num_allocations
    assert ssd == 2

    fx.io.run_next()
    body, payloads = fx.reply()
    assert body["found"] == [0, 1] and payloads == [data(5), data(1)]
    assert body["checksums"] == [block_checksum(data(5)), block_checksum(data(1))]
    assert fx.tiers[2].statistics().num_allocations == 1, "released once read: freed"
    assert {k: t for k, t in fx.store.snapshot() if t is Tier.SHM} == shm_before, "m7"
    fx.trackers[-1].done = True
    fx.server.release_sent()
    assert fx.server.leased_bytes == 0 and fx.store.statistics().num_leases == 0
    assert fx.slots_match_blocks()


def test_a_corrupt_ssd_block_is_left_out_of_the_reply_and_dropped(fx: Fixture) -> None:
    fx.put(1, 2, 3, 4, 5, 6)
    (lease,) = fx.store.acquire(PEER_SESSION, [key(2)], promote=False)
    assert lease is not None and lease.tier is Tier.SSD
    fx.store.release_leases(PEER_SESSION, [lease])
    fx.tiers[2].backing.write(lease.offset, memoryview(b"\xff" * BLOCK))

    fx.fetch(1, 2)
    fx.io.run_all()
    body, payloads = fx.reply()
    assert body["found"] == [0] and payloads == [data(1)]
    assert fx.store.statistics().checksum_failures == 1
    assert fx.store.lookup([key(2)]) == 0, "a corrupt block is a miss from now on"
    fx.trackers[-1].done = True
    fx.server.release_sent()
    assert fx.store.statistics().num_leases == 0 and fx.slots_match_blocks()


def test_no_reply_once_the_requester_has_given_up(fx: Fixture) -> None:
    fx.put(1, 2, 3, 4, 5, 6)
    fx.fetch(1, 2)
    fx.clock.now += 6.0  # past the fetch timeout: the requester answered itself a miss
    fx.io.run_all()
    assert fx.sent == []
    assert fx.server.leased_bytes == 0 and fx.store.statistics().num_leases == 0
    assert fx.metrics.total("messages_dropped", reason="serve_late") == 1


def test_a_local_read_may_promote_a_block_a_peer_is_reading(fx: Fixture) -> None:
    fx.put(1, 2, 3, 4, 5, 6)
    fx.fetch(1)  # the peer's read of block 1 is queued
    # A local engine wants block 1 too: its promotion reads into SHM meanwhile.
    assert not fx.store.prepare([key(1)], lambda: None)
    fx.io.run_all()  # both reads land; the promotion frees nothing the peer still reads
    (lease,) = fx.store.acquire(1, [key(1)])
    assert lease is not None and lease.tier is Tier.SHM
    body, payloads = fx.reply()
    assert body["found"] == [0] and payloads == [data(1)]
    fx.store.release(1, [key(1)])
    fx.trackers[-1].done = True
    fx.server.release_sent()
    assert fx.store.statistics().num_leases == 0 and fx.slots_match_blocks()


@pytest.mark.parametrize("promotion_lands_first", [False, True])
def test_a_block_deleted_mid_promotion_while_a_peer_reads_it_is_freed_once(
    fx: Fixture, promotion_lands_first: bool
) -> None:
    fx.put(1, 2, 3, 4, 5, 6)
    fx.fetch(1)  # the peer's read is queued, its lease holds the SSD slot
    assert fx.store.acquire(1, [key(1)]) == [None]  # a miss now; its promotion starts
    assert fx.store.delete([key(1)]) == 1
    if promotion_lands_first:  # worker threads finish in any order
        fx.io._jobs.rotate(-1)
    fx.io.run_all()  # whichever lands last frees the SSD slot, exactly once
    body, payloads = fx.reply()
    assert body["found"] == [0] and payloads == [data(1)]
    fx.trackers[-1].done = True
    fx.server.release_sent()
    assert fx.store.statistics().num_leases == 0 and fx.slots_match_blocks()


def test_a_dram_frame_keeps_its_slot_while_a_local_read_promotes_the_block(
    fx: Fixture,
) -> None:
    fx.put(1, 2, 3, 4)  # 1 and 2 in DRAM
    assert fx.tier_of(1) is Tier.DRAM
    fx.fetch(1)  # zero-copy: a view of the DRAM slot, until ZeroMQ has sent it
    frame = fx.sent[-1][2]
    (lease,) = fx.store.acquire(1, [key(1)])  # promoted to SHM, in place of 3
    assert lease is not None and lease.tier is Tier.SHM
    fx.put(7, 8, 9)  # DRAM pressure: the peer's old slot must not be reused yet
    assert bytes(frame) == data(1), "the frame in flight still shows its own block"
    fx.store.release(1, [key(1)])
    fx.trackers[-1].done = True
    fx.server.release_sent()
    assert fx.store.statistics().num_leases == 0 and fx.slots_match_blocks()


class PeerReadsMachine(MovesMachine):
    """The moves state machine, plus a peer leasing blocks where they lie and reading
    SSD ones on the workers, while local reads promote and deletes remove them.

    Flushes detach every block at once and free their slots in idle steps.

    Invariants, besides the parent's: a peer's lease always reads its own block's bytes
    (in place for memory tiers, through ``read_leased`` for the SSD; a failed read only
    for a block that was corrupt, which never happens here); no slot leaks once every
    lease is released and the disk is idle.
    """

    def __init__(self) -> None:
        super().__init__()
        self.store.open_session(PEER_SESSION)
        self.peer: list[tuple[int, Lease]] = []
        self.results: list[tuple[int, mmap.mmap, list[bool]]] = []

    @rule(start=st.integers(0, 11))
    def fill_down_to_the_ssd(self, start: int) -> None:
        for i in range(start, start + 7):  # more than SHM and DRAM hold
            self.put(i % 12)
            self.io.run_all()

    @rule(pick=st.integers(0, 11))
    def peer_lease_an_ssd_block(self, pick: int) -> None:
        on_ssd = sorted(k for k, tier in self.store.snapshot() if tier is Tier.SSD)
        if on_ssd:
            self.peer_lease(int.from_bytes(on_ssd[pick % len(on_ssd)], "little"))

    @rule(i=st.integers(0, 11))
    def peer_lease(self, i: int) -> None:
        (lease,) = self.store.acquire(PEER_SESSION, [key(i)], promote=False)
        if lease is None:
            return
        self.peer.append((i, lease))
        if lease.tier is Tier.SSD:
            buffer = mmap.mmap(-1, padded(lease.nbytes))
            result: list[bool] = []
            self.store.read_leased(lease, memoryview(buffer), result.append)
            self.results.append((i, buffer, result))

    @precondition(lambda self: self.peer)
    @rule(first=st.booleans())
    def peer_release(self, first: bool) -> None:
        _, lease = self.peer.pop(0 if first else -1)
        assert self.store.release_leases(PEER_SESSION, [lease]) == 1

    @rule()
    def flush(self) -> None:
        self.store.clear()
        self.deleted.update(range(12))

    @rule(limit=st.integers(1, 4))
    def idle_step(self, limit: int) -> None:
        self.store.flush_policies(limit)

    @invariant()
    def peer_leases_read_their_own_bytes(self) -> None:
        for i, lease in self.peer:
            backing = self.store.backing(lease.tier)
            if isinstance(backing, MemoryBacking):
                assert bytes(backing.view(lease.offset, lease.nbytes)) == data(i)
        for i, buffer, result in self.results:
            if result:
                assert result == [True] and buffer[:BLOCK] == data(i)

    def teardown(self) -> None:
        self.io.run_all()
        self.store.flush_policies()  # a flush's detached slots
        for _, lease in self.peer:
            self.store.release_leases(PEER_SESSION, [lease])
        self.peer.clear()
        for _, lease in self.peer_leases:  # the parent machine's peer reads
            self.store.release_leases(PEER, [lease])
        self.peer_leases.clear()
        assert self.store.statistics().num_leases == 0
        super().teardown()


TestPeerReadsMachine = PeerReadsMachine.TestCase
TestPeerReadsMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)
