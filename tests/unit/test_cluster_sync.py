"""Metadata sync between daemons: the publisher's log, the subscriber's per-peer stream states.

The property the design rests on (``kvcache.cluster.sync`` docstring): whatever the
publishers do and whatever the network drops, delays or repeats, once a heartbeat gets
through after the last change every view equals the publishers' truth. ``SyncMachine``
at the end checks it over random schedules; the classes before it pin each transition.
"""

from __future__ import annotations

from collections import deque

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from kvcache.cluster import messages as cm
from kvcache.cluster.index import ClusterIndex, Holder
from kvcache.cluster.sync import (
    ClusterView,
    EventLog,
    StreamState,
    SyncNeed,
    SyncReply,
    apply_ops,
    encode_events,
)
from kvcache.errors import ProtocolError
from kvcache.tiers import Tier

SHM, DRAM, SSD = int(Tier.SHM), int(Tier.DRAM), int(Tier.SSD)
MEMBER_TIMEOUT_S = 3.0
SYNC_TIMEOUT_S = 1.0


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def keys(*ids: int) -> list[bytes]:
    return [key(i) for i in ids]


class Publisher:
    """One daemon's publishing side, as ``kvcache.cluster.node`` drives an ``EventLog``.

    ``truth`` is its store (key -> tier), ``pending`` the store events not yet published,
    ``history[epoch][seq]`` the truth right after batch ``seq`` (so any applied seq can be
    checked), ``outbox`` its PUB socket: FIFO, but a subscriber may miss any message.
    """

    def __init__(self, node: str, epoch: int, *, keep_batches: int = 4096) -> None:
        self.node = node
        self.address = f"tcp://{node}:7000"
        self.keep_batches = keep_batches
        self.truth: dict[bytes, int] = {}
        self.pending: list[tuple[int, bytes]] = []
        self.outbox: deque[cm.EventBatch | cm.Heartbeat] = deque()
        self.history: dict[int, list[dict[bytes, int]]] = {}
        self.log = self._start(epoch)

    def _start(self, epoch: int) -> EventLog:
        self.history[epoch] = [{}]
        return EventLog(self.node, self.address, epoch, keep_batches=self.keep_batches)

    @property
    def epoch(self) -> int:
        return self.log.epoch

    # -- the store changes ------------------------------------------------------------------

    def store(self, ids: list[int], tier: int = SHM) -> None:
        for k in keys(*ids):
            self.truth[k] = tier
            self.pending.append((cm.op_for_tier(tier), k))

    def remove(self, ids: list[int]) -> None:
        for k in keys(*ids):
            self.truth.pop(k, None)
            self.pending.append((cm.OP_REMOVED, k))

    def clear(self) -> None:
        self.truth.clear()
        self.pending.append((cm.OP_CLEARED, cm.CLEARED_KEY))

    def restart(self, epoch: int) -> None:
        """A new process: a larger epoch, an empty store, a fresh log."""
        assert epoch > self.epoch, "a restart has a larger epoch"
        self.truth.clear()
        self.pending.clear()
        self.log = self._start(epoch)

    # -- what it sends --------------------------------------------------------------------

    def publish(self, ts: float = 0.0) -> cm.EventBatch | None:
        """One loop turn's events as the next batch (nothing when there were none)."""
        if not self.pending:
            return None
        batch = self.log.append(*encode_events(self.pending), ts)
        self.pending.clear()
        self.history[self.epoch].append(dict(self.truth))
        assert len(self.history[self.epoch]) == batch.seq + 1
        self.outbox.append(batch)
        return batch

    def heartbeat(self, state: str = "active") -> cm.Heartbeat:
        beat = cm.Heartbeat(
            node=self.node,
            epoch=self.epoch,
            seq=self.log.seq,
            address=self.address,
            state=state,
            ts=0.0,
            interval_s=1.0,
            stats={},
        )
        self.outbox.append(beat)
        return beat

    def snapshot(self) -> tuple[bytes, bytes]:
        return b"".join(self.truth), bytes(self.truth.values())

    def answer(self, need: SyncNeed) -> SyncReply:
        """As the daemon serves ``sync``: publish undrained events first, then answer."""
        assert (need.node, need.address) == (self.node, self.address)
        self.publish()
        return self.log.answer(need.epoch, need.after_seq, self.snapshot)


def make_view() -> ClusterView:
    return ClusterView("me", member_timeout_s=MEMBER_TIMEOUT_S, sync_timeout_s=SYNC_TIMEOUT_S)


def held(view: ClusterView, node: str) -> dict[bytes, int]:
    """What ``view`` believes ``node`` holds: key -> tier."""
    return {
        k: h.tier for k in view.index.keys_of(node) for h in view.index.holders(k) if h.node == node
    }


def stream_of(view: ClusterView, node: str, now: float = 0.0) -> tuple[str, int, int]:
    """(stream state, epoch, applied seq) of ``node`` in ``view``."""
    (status,) = [m for m in view.members(now) if m.node == node]
    return status.stream, status.epoch, status.applied_seq


def receive(
    view: ClusterView, message: cm.EventBatch | cm.Heartbeat, now: float = 0.0
) -> SyncNeed | None:
    if isinstance(message, cm.EventBatch):
        return view.on_batch(message, now)
    return view.on_heartbeat(message, now)


def published(pub: Publisher, *changes: list[int]) -> list[cm.EventBatch]:
    """Publish one batch per list of key ids stored in SHM."""
    batches = []
    for ids in changes:
        pub.store(ids)
        batch = pub.publish()
        assert batch is not None
        batches.append(batch)
    pub.outbox.clear()
    return batches


def reply_to(
    view: ClusterView, pub: Publisher, need: SyncNeed | None, now: float = 0.0
) -> SyncNeed | None:
    assert need is not None, "expected the view to ask for a sync"
    return view.on_sync_reply(pub.node, pub.answer(need), now)


class TestEventLog:
    def test_batches_are_numbered_from_one_within_an_epoch(self) -> None:
        log = EventLog("a", "tcp://a:7000", 5)
        ops, packed = encode_events([(cm.op_for_tier(DRAM), key(1))])
        first = log.append(ops, packed, 12.5)
        assert first == cm.EventBatch("a", "tcp://a:7000", 5, 1, 12.5, ops, packed)
        assert log.append(ops, packed, 13.0).seq == 2
        assert log.seq == 2

    def test_a_subscriber_that_missed_kept_batches_gets_them_replayed(self) -> None:
        pub = Publisher("a", 1)
        batches = published(pub, [1], [2], [3])
        reply = pub.log.answer(1, 1, pub.snapshot)
        assert reply == SyncReply(epoch=1, seq=3, batches=tuple(batches[1:]))

    def test_a_subscriber_that_is_up_to_date_gets_an_empty_replay(self) -> None:
        pub = Publisher("a", 1)
        published(pub, [1], [2])
        assert pub.log.answer(1, 2, pub.snapshot) == SyncReply(1, 2, ())
        assert Publisher("b", 1).log.answer(1, 0, pub.snapshot) == SyncReply(1, 0, ())

    def test_once_the_log_has_rotated_past_the_gap_the_answer_is_a_snapshot(self) -> None:
        pub = Publisher("a", 1, keep_batches=2)
        batches = published(pub, [1], [2], [3], [4], [5])
        snapshot = pub.log.answer(1, 2, pub.snapshot)
        assert snapshot == SyncReply(1, 5, snapshot=(b"".join(keys(1, 2, 3, 4, 5)), bytes(5)))
        assert pub.log.answer(1, 3, pub.snapshot) == SyncReply(1, 5, tuple(batches[3:]))

    def test_another_epoch_or_an_unknown_seq_gets_a_snapshot_of_this_epoch(self) -> None:
        pub = Publisher("a", 7)
        published(pub, [1])
        expected = SyncReply(7, 1, snapshot=(key(1), bytes([SHM])))
        assert pub.log.answer(6, 0, pub.snapshot) == expected, "the subscriber knew a past life"
        assert pub.log.answer(7, 2, pub.snapshot) == expected, "a seq never published"

    def test_the_snapshot_is_taken_only_when_a_replay_cannot_answer(self) -> None:
        pub = Publisher("a", 1)
        published(pub, [1])

        def no_snapshot() -> tuple[bytes, bytes]:
            raise AssertionError("a replay was possible")

        assert pub.log.answer(1, 0, no_snapshot).batches[0].seq == 1


class TestSyncReplyWire:
    @pytest.mark.parametrize(
        "reply",
        [
            SyncReply(3, 2, tuple(published(Publisher("a", 3), [1, 2], [3]))),
            SyncReply(3, 0, ()),
            SyncReply(3, 9, snapshot=(b"".join(keys(1, 2)), bytes([SHM, SSD]))),
            SyncReply(3, 9, snapshot=(b"", b"")),
        ],
        ids=["replay", "empty replay", "snapshot", "empty snapshot"],
    )
    def test_a_reply_round_trips_through_the_wire(self, reply: SyncReply) -> None:
        body = cm.decode_reply(cm.encode_reply(4, **reply.to_map()))
        assert SyncReply.from_map(body) == reply

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            ({"kind": "replay", "epoch": "1", "seq": 1, "batches": []}, "integer epoch"),
            ({"kind": "replay", "epoch": 1, "batches": []}, "integer epoch or seq"),
            ({"kind": "replay", "epoch": 1, "seq": 1, "batches": [{}]}, "missing field"),
            ({"kind": "replay", "epoch": 1, "seq": 1, "batches": [3]}, "must be a map"),
            ({"kind": "snapshot", "epoch": 1, "seq": 1, "keys": key(1), "tiers": b""}, "length"),
            ({"kind": "snapshot", "epoch": 1, "seq": 1, "keys": "k"}, "missing fields"),
            ({"kind": "diff", "epoch": 1, "seq": 1}, "unknown kind 'diff'"),
        ],
    )
    def test_a_malformed_reply_is_a_protocol_error(
        self, body: dict[str, object], message: str
    ) -> None:
        with pytest.raises(ProtocolError, match=message):
            SyncReply.from_map(body)


class TestFirstContact:
    def test_a_first_batch_with_seq_one_is_applied_at_once(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        pub.store([1, 2], DRAM)
        batch = pub.publish()
        assert batch is not None
        assert view.on_batch(batch, 0.0) is None
        assert held(view, "a") == {key(1): DRAM, key(2): DRAM}
        assert stream_of(view, "a") == ("in_sync", 1, 1)
        assert view.address_of("a") == pub.address

    def test_a_first_batch_past_seq_one_asks_for_everything_and_is_kept_meanwhile(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        late = published(pub, [1], [2], [3])[-1]
        need = view.on_batch(late, 0.0)
        assert need == SyncNeed("a", pub.address, 1, after_seq=0)
        assert held(view, "a") == {}
        assert stream_of(view, "a") == ("awaiting_sync", 1, 0)
        assert reply_to(view, pub, need) is None
        assert held(view, "a") == pub.truth
        assert stream_of(view, "a") == ("in_sync", 1, 3)

    def test_a_first_heartbeat_past_seq_zero_asks_for_everything(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        published(pub, [1], [2])
        need = view.on_heartbeat(pub.heartbeat(), 0.0)
        assert need == SyncNeed("a", pub.address, 1, after_seq=0)
        reply_to(view, pub, need)
        assert held(view, "a") == pub.truth

    def test_a_first_heartbeat_at_seq_zero_makes_an_empty_member(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        assert view.on_heartbeat(pub.heartbeat(), 0.0) is None
        assert view.nodes == ["a"]
        assert view.member_state("a") == "active"
        assert stream_of(view, "a") == ("in_sync", 1, 0)

    def test_the_views_own_messages_are_ignored(self) -> None:
        view, me = make_view(), Publisher("me", 1)
        (batch,) = published(me, [1])
        assert view.on_batch(batch, 0.0) is None
        assert view.on_heartbeat(me.heartbeat(), 0.0) is None
        assert (view.nodes, view.index.members) == ([], [])


class TestGaps:
    def test_a_gap_asks_from_the_last_applied_seq_and_buffers_what_follows(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        b1, _, b3, b4 = published(pub, [1], [2], [3], [4])
        view.on_batch(b1, 0.0)
        need = view.on_batch(b3, 0.0)
        assert need == SyncNeed("a", pub.address, 1, after_seq=1)
        assert view.on_batch(b4, 0.0) is None, "one request per gap"
        assert held(view, "a") == {key(1): SHM}, "nothing past the gap is applied yet"
        assert view.num_gaps == 1
        assert reply_to(view, pub, need) is None
        assert held(view, "a") == pub.truth
        assert stream_of(view, "a") == ("in_sync", 1, 4)

    def test_buffered_batches_past_the_reply_are_applied_after_it(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        b1, _, b3 = published(pub, [1], [2], [3])
        view.on_batch(b1, 0.0)
        reply = pub.log.answer(1, 1, pub.snapshot)  # answered before b4 and b5 exist
        b4, b5 = published(pub, [4], [5])
        need = view.on_batch(b3, 0.0)
        view.on_batch(b5, 0.0)
        view.on_batch(b4, 0.0)
        assert need is not None
        assert view.on_sync_reply("a", reply, 0.0) is None
        assert held(view, "a") == pub.truth
        assert stream_of(view, "a") == ("in_sync", 1, 5)

    def test_a_hole_left_after_the_reply_asks_again(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        b1, _, b3 = published(pub, [1], [2], [3])
        view.on_batch(b1, 0.0)
        reply = pub.log.answer(1, 1, pub.snapshot)
        _, b5 = published(pub, [4], [5])
        view.on_batch(b3, 0.0)
        view.on_batch(b5, 0.0)  # b4 is lost
        need = view.on_sync_reply("a", reply, 0.0)
        assert need == SyncNeed("a", pub.address, 1, after_seq=3)
        assert stream_of(view, "a") == ("awaiting_sync", 1, 3)
        assert reply_to(view, pub, need) is None
        assert held(view, "a") == pub.truth

    def test_a_heartbeat_past_the_applied_seq_reveals_a_lost_trailing_batch(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        b1, _ = published(pub, [1], [2])
        view.on_batch(b1, 0.0)
        need = view.on_heartbeat(pub.heartbeat(), 0.0)
        assert need == SyncNeed("a", pub.address, 1, after_seq=1)
        assert view.on_heartbeat(pub.heartbeat(), 0.5) is None, "already asked"
        reply_to(view, pub, need)
        assert held(view, "a") == pub.truth
        assert view.on_heartbeat(pub.heartbeat(), 1.0) is None, "in sync: nothing to ask"

    def test_a_heartbeat_heard_while_awaiting_is_remembered_past_an_older_reply(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        _, b2 = published(pub, [1], [2])
        need = view.on_batch(b2, 0.0)
        reply = pub.answer(need)  # type: ignore[arg-type]
        published(pub, [3])
        assert view.on_heartbeat(pub.heartbeat(), 0.0) is None, "already asked"
        again = view.on_sync_reply("a", reply, 0.0)
        assert again == SyncNeed("a", pub.address, 1, after_seq=2), "the heartbeat said seq 3"
        reply_to(view, pub, again)
        assert held(view, "a") == pub.truth

    def test_a_batch_already_applied_is_stale(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        (b1,) = published(pub, [1])
        view.on_batch(b1, 0.0)
        assert view.on_batch(b1, 0.0) is None
        assert (view.num_stale, view.num_gaps) == (1, 0)

    def test_a_replay_that_falls_short_of_its_seq_asks_for_a_snapshot(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        b1, _, b3 = published(pub, [1], [2], [3])
        view.on_batch(b1, 0.0)
        view.on_batch(b3, 0.0)
        need = view.on_sync_reply("a", SyncReply(1, 3, (b3,)), 0.0)  # b2 missing
        assert need is not None and need.epoch == 1
        assert pub.answer(need).snapshot is not None, "no log can replay that after_seq"
        assert reply_to(view, pub, need) is None
        assert held(view, "a") == pub.truth

    def test_a_snapshot_replaces_everything_the_member_announced(self) -> None:
        view, pub = make_view(), Publisher("a", 1, keep_batches=1)
        (b1,) = published(pub, [1, 2])
        view.on_batch(b1, 0.0)
        pub.remove([1])
        pub.store([3], SSD)
        pub.publish()
        pub.store([4])
        pub.publish()
        need = view.on_heartbeat(pub.heartbeat(), 0.0)
        reply = pub.answer(need)  # type: ignore[arg-type]
        assert reply.snapshot is not None
        assert view.on_sync_reply("a", reply, 0.0) is None
        assert held(view, "a") == {key(2): SHM, key(3): SSD, key(4): SHM}
        assert stream_of(view, "a") == ("in_sync", 1, 3)

    def test_buffering_is_bounded_and_the_next_heartbeat_asks_for_what_it_dropped(self) -> None:
        view, pub = ClusterView("me", max_buffered=2), Publisher("a", 1)
        b1, _, b3 = published(pub, [1], [2], [3])
        view.on_batch(b1, 0.0)
        reply = pub.log.answer(1, 1, pub.snapshot)  # replays b2 and b3
        b4, b5, b6 = published(pub, [4], [5], [6])
        for batch in (b3, b4, b5, b6):  # only b3 and b4 fit
            view.on_batch(batch, 0.0)
        assert view.on_sync_reply("a", reply, 0.0) is None
        assert stream_of(view, "a") == ("in_sync", 1, 4)
        assert held(view, "a") == pub.history[1][4]
        need = view.on_heartbeat(pub.heartbeat(), 0.0)
        assert need == SyncNeed("a", pub.address, 1, after_seq=4)
        reply_to(view, pub, need)
        assert held(view, "a") == pub.truth

    def test_every_applied_batch_is_reported_in_order(self) -> None:
        applied: list[int] = []
        view, pub = ClusterView("me", on_applied=lambda b: applied.append(b.seq)), Publisher("a", 1)
        b1, _, b3 = published(pub, [1], [2], [3])
        view.on_batch(b1, 0.0)
        reply_to(view, pub, view.on_batch(b3, 0.0))
        assert applied == [1, 2, 3]


class TestEpochs:
    def test_a_larger_epoch_is_a_restart_that_drops_the_old_entries(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        (b1,) = published(pub, [1, 2])
        view.on_batch(b1, 0.0)
        pub.restart(2)
        (fresh,) = published(pub, [3])
        assert view.on_batch(fresh, 0.0) is None, "seq 1 of the new epoch applies at once"
        assert held(view, "a") == {key(3): SHM}
        assert stream_of(view, "a") == ("in_sync", 2, 1)

    def test_a_restart_heard_by_heartbeat_drops_at_once_and_resyncs(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        (b1,) = published(pub, [1, 2])
        view.on_batch(b1, 0.0)
        pub.restart(2)
        assert view.on_heartbeat(pub.heartbeat(), 0.0) is None, "a new epoch at seq 0 is empty"
        assert held(view, "a") == {}
        published(pub, [5])
        reply_to(view, pub, view.on_heartbeat(pub.heartbeat(), 0.0))
        assert held(view, "a") == {key(5): SHM}

    def test_messages_of_an_older_epoch_are_stale(self) -> None:
        view, old = make_view(), Publisher("a", 1)
        (old_batch,) = published(old, [1])
        old_beat = old.heartbeat()
        new = Publisher("a", 2)
        (new_batch,) = published(new, [2])
        view.on_batch(new_batch, 0.0)
        assert view.on_batch(old_batch, 0.0) is None
        assert view.on_heartbeat(old_beat, 0.0) is None
        assert view.on_sync_reply("a", old.log.answer(1, 0, old.snapshot), 0.0) is None
        assert view.on_heartbeat(old.heartbeat("leaving"), 0.0) is None
        assert view.num_stale == 4
        assert held(view, "a") == {key(2): SHM}

    def test_a_reply_from_a_restarted_publisher_waits_for_its_new_stream(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        _, b2 = published(pub, [1], [2])
        need = view.on_batch(b2, 0.0)
        pub.restart(2)
        published(pub, [9])
        assert reply_to(view, pub, need) is None
        assert held(view, "a") == {}, "a reply of another epoch than the stream's is ignored"
        reply_to(view, pub, view.on_heartbeat(pub.heartbeat(), 0.0))
        assert held(view, "a") == {key(9): SHM}


class TestMembership:
    def test_a_leaving_heartbeat_drops_the_member_at_once(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        (b1,) = published(pub, [1])
        view.on_batch(b1, 0.0)
        assert view.on_heartbeat(pub.heartbeat("leaving"), 0.0) is None
        assert (view.nodes, view.is_live("a"), view.index.holders(key(1))) == ([], False, [])

    def test_a_draining_member_stays_and_says_so(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        view.on_heartbeat(pub.heartbeat("draining"), 0.0)
        assert (view.is_live("a"), view.member_state("a")) == (True, "draining")
        assert view.member_state("b") is None

    def test_expire_drops_silent_members_and_asks_unanswered_syncs_again(self) -> None:
        view, quiet, behind = make_view(), Publisher("quiet", 1), Publisher("behind", 1)
        view.on_heartbeat(quiet.heartbeat(), 0.0)
        published(behind, [1], [2])
        first = view.on_heartbeat(behind.heartbeat(), 0.0)
        assert view.expire(SYNC_TIMEOUT_S) == ([], []), "not yet past the sync timeout"
        assert view.expire(SYNC_TIMEOUT_S + 0.5) == ([], [first])
        view.on_heartbeat(behind.heartbeat(), 2.0)  # keeps it alive; its sync is still out
        dead, retries = view.expire(MEMBER_TIMEOUT_S + 0.5)
        assert (dead, retries) == (["quiet"], [first])
        assert view.nodes == ["behind"]
        assert [m.num_syncs for m in view.members(4.0)] == [3]

    def test_a_dropped_member_is_rebuilt_from_its_next_message(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        (b1,) = published(pub, [1])
        view.on_batch(b1, 0.0)
        view.expire(MEMBER_TIMEOUT_S + 1)
        assert view.index.holders(key(1)) == []
        (b2,) = published(pub, [2])
        reply_to(view, pub, view.on_batch(b2, 10.0), 10.0)
        assert held(view, "a") == pub.truth

    def test_a_late_reply_to_a_superseded_request_is_ignored(self) -> None:
        view, pub = make_view(), Publisher("a", 1, keep_batches=1)
        b1, _, _ = published(pub, [1], [2], [3])
        view.on_batch(b1, 0.0)
        early = pub.log.answer(1, 1, pub.snapshot)  # a snapshot at seq 3
        _, b5 = published(pub, [4], [5])
        reply_to(view, pub, view.on_batch(b5, 0.0))
        assert stream_of(view, "a") == ("in_sync", 1, 5)
        stale = view.num_stale
        assert view.on_sync_reply("a", early, 1.0) is None
        assert held(view, "a") == pub.truth, "the older snapshot did not roll the view back"
        assert view.num_stale == stale + 1

    def test_a_reply_for_a_member_not_known_is_ignored(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        published(pub, [1])
        assert view.on_sync_reply("a", pub.log.answer(1, 0, pub.snapshot), 0.0) is None
        assert (view.nodes, view.num_stale) == ([], 1)

    def test_member_status(self) -> None:
        view, pub = make_view(), Publisher("a", 1)
        b1, _ = published(pub, [1, 2], [3])
        view.on_batch(b1, 1.0)
        view.on_heartbeat(pub.heartbeat(), 2.0)
        (status,) = view.members(2.5)
        assert (status.node, status.address, status.epoch, status.state) == (
            "a", pub.address, 1, "active",
        )  # fmt: skip
        assert (status.applied_seq, status.published_seq, status.stream) == (1, 2, "awaiting_sync")
        assert (status.last_heard_s, status.num_blocks, status.num_syncs) == (0.5, 2, 1)


class TestApplyOps:
    def test_ops_apply_in_order_with_clear_forgetting_everything_before_it(self) -> None:
        index = ClusterIndex()
        index.store("a", keys(9), [SSD])
        ops, packed = encode_events(
            [
                (cm.op_for_tier(SHM), key(1)),
                (cm.op_for_tier(DRAM), key(2)),
                (cm.OP_REMOVED, key(1)),
                (cm.OP_CLEARED, b"ignored"),
                (cm.op_for_tier(SSD), key(3)),
                (cm.OP_REMOVED, key(9)),
                (cm.op_for_tier(SHM), key(4)),
                (cm.op_for_tier(DRAM), key(4)),
            ]
        )
        assert packed[3 * 16 : 4 * 16] == cm.CLEARED_KEY, "a clear carries the zero key"
        apply_ops(index, "a", ops, packed)
        assert sorted(index.keys_of("a")) == keys(3, 4)
        assert index.holders(key(3)) == [Holder("a", SSD)]
        assert index.holders(key(4)) == [Holder("a", DRAM)], "the last op on a key wins"

    def test_no_ops_change_nothing(self) -> None:
        index = ClusterIndex()
        apply_ops(index, "a", b"", b"")
        assert (index.members, len(index)) == ([], 0)


# -- the convergence property ----------------------------------------------------------------

NODES = ["p0", "p1"]
PICK = st.integers(0, 1 << 16)  # an index into a pending list, taken modulo its length
SYNC_TRAFFIC = [
    "request answered",
    "request answered, asked again later",
    "request lost",
    "reply arrives",
    "reply arrives, a duplicate later",
    "reply lost",
]


class SyncMachine(RuleBasedStateMachine):
    """Publishers change, heartbeat and restart; the network drops stream messages and loses,
    repeats and reorders sync requests and replies; time passes and members time out.
    Whatever happened, the view only ever shows a member as it was after some batch it
    published, never moves back in its history, and once a heartbeat of every publisher
    gets through after the last change, equals every publisher's truth.

    Few rules, each doing something every step: Hypothesis disables random subsets of the
    rules per example (swarm testing), and each rule left out must not starve the others.
    """

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.view = ClusterView(
            "me", member_timeout_s=MEMBER_TIMEOUT_S, sync_timeout_s=SYNC_TIMEOUT_S, max_buffered=3
        )
        self.epochs = iter(range(len(NODES), 1 << 30))
        self.publishers = {  # a short log, so that answers are often snapshots
            node: Publisher(node, epoch, keep_batches=2) for epoch, node in enumerate(NODES)
        }
        self.needs: list[SyncNeed] = []  # requests sent, not yet answered
        self.replies: list[tuple[str, SyncReply]] = []  # answers in flight
        self.seen: dict[str, tuple[int, int]] = {}  # node -> (epoch, applied) last checked

    def _asked(self, need: SyncNeed | None) -> None:
        if need is not None:
            self.needs.append(need)

    @initialize(queued_lost=st.booleans(), late_replies_first=st.booleans())
    def how_the_network_heals(self, queued_lost: bool, late_replies_first: bool) -> None:
        """Drawn up front for the final ``quiesce``: whether the stream messages still queued
        then are lost or arrive, and whether late replies arrive before or after the
        answers to the requests still open."""
        self.queued_lost = queued_lost
        self.late_replies_first = late_replies_first

    # -- publishers -------------------------------------------------------------------------

    @rule(
        node=st.sampled_from(NODES),
        kind=st.sampled_from(["store", "remove", "clear"]),
        ids=st.lists(st.integers(0, 5), min_size=1, max_size=3),
        tier=st.sampled_from([SHM, DRAM, SSD]),
        turn_ends=st.booleans(),
    )
    def change(self, node: str, kind: str, ids: list[int], tier: int, turn_ends: bool) -> None:
        """A store change; a daemon publishes its events at the end of each loop turn, so
        ``turn_ends`` says whether this change is published now or joins the next batch."""
        pub = self.publishers[node]
        if kind == "store":
            pub.store(ids, tier)
        elif kind == "remove":
            pub.remove(ids)
        else:
            pub.clear()
        if turn_ends:
            pub.publish(self.now)

    @rule(node=st.sampled_from(NODES), leaving=st.booleans())
    def restart(self, node: str, leaving: bool) -> None:
        pub = self.publishers[node]
        if leaving:  # a drained daemon says goodbye before it goes
            pub.heartbeat("leaving")
        pub.restart(next(self.epochs))

    @rule(
        seconds=st.sampled_from([0.4, SYNC_TIMEOUT_S + 0.1, MEMBER_TIMEOUT_S + 0.1]),
        beating=st.lists(st.sampled_from(NODES), unique=True),
        sweep_limit=st.integers(1, 4),
    )
    def tick(self, seconds: float, beating: list[str], sweep_limit: int) -> None:
        """Time passes: some publishers heartbeat; the view expires and retries, and sweeps."""
        self.now += seconds
        for node in beating:
            self.publishers[node].heartbeat()
        self.needs.extend(self.view.expire(self.now)[1])
        self.view.index.sweep(sweep_limit)

    # -- the network ------------------------------------------------------------------------

    @precondition(lambda self: any(p.outbox for p in self.publishers.values()))
    @rule(pick=PICK, losses=st.lists(st.booleans(), min_size=1, max_size=4))
    def deliver(self, pick: int, losses: list[bool]) -> None:
        """The next messages of one publisher's stream arrive in order, or are lost."""
        outboxes = [p.outbox for p in self.publishers.values() if p.outbox]
        outbox = outboxes[pick % len(outboxes)]
        for lost in losses[: len(outbox)]:
            message = outbox.popleft()
            if not lost:
                self._asked(receive(self.view, message, self.now))

    @precondition(lambda self: self.needs or self.replies)
    @rule(pick=PICK, what=st.sampled_from(SYNC_TRAFFIC))
    def sync_traffic(self, pick: int, what: str) -> None:
        """One request or reply on the ROUTER/DEALER path: answered (also twice, as for a
        retransmission), lost, or a reply arriving in any order (also twice)."""
        if what.startswith("request") and self.needs:
            need = self.needs[pick % len(self.needs)]
            if what != "request answered, asked again later":
                self.needs.remove(need)
            if what != "request lost":
                self.replies.append((need.node, self.publishers[need.node].answer(need)))
        elif what.startswith("reply") and self.replies:
            node, reply = self.replies[-1 - pick % len(self.replies)]  # newest first: reordered
            if what != "reply arrives, a duplicate later":
                self.replies.remove((node, reply))
            if what != "reply lost":
                self._asked(self.view.on_sync_reply(node, reply, self.now))

    # -- the property -----------------------------------------------------------------------

    @invariant()
    def the_view_shows_each_member_as_of_a_seq_it_published(self) -> None:
        for node, pub in self.publishers.items():
            if not self.view.is_live(node):
                assert held(self.view, node) == {}
                continue
            _, epoch, applied = stream_of(self.view, node, self.now)
            assert held(self.view, node) == pub.history[epoch][applied]

    @invariant()
    def a_member_never_moves_back_in_its_history(self) -> None:
        for node in NODES:
            if not self.view.is_live(node):  # dropped: it may come back from seq 0
                self.seen.pop(node, None)
                continue
            _, epoch, applied = stream_of(self.view, node, self.now)
            assert (epoch, applied) >= self.seen.get(node, (epoch, 0))
            self.seen[node] = (epoch, applied)

    def quiesce(self) -> None:
        """Changes stop and the network heals; what was still queued arrives or is lost.

        Once a heartbeat of every publisher gets through, the syncs it sets off, the late
        answers to earlier requests and the retries of lost requests bring the view to
        every publisher's truth.
        """
        for pub in self.publishers.values():
            pub.publish(self.now)
            if self.queued_lost:
                pub.outbox.clear()
        for attempt in range(3):
            for pub in self.publishers.values():
                pub.heartbeat()
                while pub.outbox:
                    self._asked(receive(self.view, pub.outbox.popleft(), self.now))
            if attempt:  # the sync timeout passed: requests the network lost are asked again
                self.needs.extend(self.view.expire(self.now)[1])
            for _ in range(100):
                if not (self.replies or self.needs):
                    break
                if self.replies and (self.late_replies_first or not self.needs):
                    node, reply = self.replies.pop(0)
                    self._asked(self.view.on_sync_reply(node, reply, self.now))
                else:
                    need = self.needs.pop(0)
                    answer = self.publishers[need.node].answer(need)
                    self._asked(self.view.on_sync_reply(need.node, answer, self.now))
            assert not (self.replies or self.needs), "each answer asks again: a livelock"
            if all(m.stream == StreamState.IN_SYNC.value for m in self.view.members(self.now)):
                break
            self.now += SYNC_TIMEOUT_S + 0.1
        assert self.view.nodes == sorted(self.publishers)
        for node, pub in self.publishers.items():
            assert stream_of(self.view, node, self.now) == ("in_sync", pub.epoch, pub.log.seq)
            assert held(self.view, node) == pub.truth

    def teardown(self) -> None:
        self.quiesce()


TestSyncMachine = SyncMachine.TestCase
TestSyncMachine.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
