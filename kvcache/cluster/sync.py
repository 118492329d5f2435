"""Both ends of the asynchronous metadata sync, as pure state machines (no sockets).

Publisher (``EventLog``): the daemon drains its store's block events after every loop
turn and appends them as one numbered batch; the log keeps the most recent batches so a
subscriber that missed a few is answered with a *replay*, and one that missed more (or
joined late) with a *snapshot* of the store plus the seq it corresponds to.

Subscriber (``ClusterView``): one stream state per publisher, keyed by node name::

    unknown ──first batch seq 1──────────────────────────► in sync
       │  └──first message seq > 1 / heartbeat seq > 0──► awaiting sync ──reply──► in sync
    in sync ──batch seq = applied+1──► apply
            ──batch seq > applied+1 (gap) or heartbeat seq > applied──► awaiting sync
            ──larger epoch (restart)──► drop entries, treat as unknown
            ──no message for member_timeout_s / heartbeat "leaving"──► dead: entries dropped

While awaiting a sync reply, batches are buffered (bounded) and applied after the reply
in seq order; a request that is not answered in ``sync_timeout_s`` is sent again. Stale
messages (an older epoch, a seq already applied) are ignored. The property the tests
check: whatever the publishers do and whatever the network drops, once a heartbeat gets
through after the last change every view equals the publishers' truth.

A snapshot is sent and applied whole (its cost at 1M blocks is in ``node.py``); a CLEARED
op means "every block of this member is gone as of this batch", which a flush keeps even
though the publisher frees the slots afterwards, in steps (``BlockStore.clear``).

Time is injected (``now`` arguments); wall-clock ``ts`` only feeds the propagation metric.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcache.cluster.index import ClusterIndex
from kvcache.cluster.messages import (
    CLEARED_KEY,
    OP_CLEARED,
    OP_REMOVED,
    EventBatch,
    Heartbeat,
    decode_batch_map,
)
from kvcache.errors import ProtocolError
from kvcache.keys import KEY_BYTES

__all__ = ["ClusterView", "EventLog", "StreamState", "SyncNeed", "SyncReply"]


# -- publisher ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncReply:
    """What a publisher answers a ``sync`` request with: a replay or a snapshot."""

    epoch: int
    seq: int
    batches: tuple[EventBatch, ...] = ()
    snapshot: tuple[bytes, bytes] | None = None  # (keys, tiers) when not a replay

    def to_map(self) -> dict[str, Any]:
        if self.snapshot is None:
            return {"kind": "replay", "epoch": self.epoch, "seq": self.seq,
                    "batches": [b.to_map() for b in self.batches]}  # fmt: skip
        keys, tiers = self.snapshot
        return {"kind": "snapshot", "epoch": self.epoch, "seq": self.seq, "keys": keys,
                "tiers": tiers}  # fmt: skip

    @classmethod
    def from_map(cls, body: dict[str, Any]) -> SyncReply:
        kind, epoch, seq = body.get("kind"), body.get("epoch"), body.get("seq")
        if not isinstance(epoch, int) or not isinstance(seq, int):
            raise ProtocolError("sync reply lacks an integer epoch or seq")
        if kind == "replay" and isinstance(body.get("batches"), list):
            return cls(epoch, seq, tuple(decode_batch_map(b) for b in body["batches"]))
        keys, tiers = body.get("keys"), body.get("tiers")
        if kind == "snapshot" and isinstance(keys, bytes) and isinstance(tiers, bytes):
            if len(keys) != len(tiers) * KEY_BYTES:
                raise ProtocolError("sync snapshot: keys and tiers differ in length")
            return cls(epoch, seq, snapshot=(keys, tiers))
        raise ProtocolError(f"sync reply of unknown kind {kind!r} or with missing fields")


class EventLog:
    """A publisher's numbered batches, with the recent ones kept for replay."""

    def __init__(self, node: str, address: str, epoch: int, *, keep_batches: int = 4096) -> None:
        self.node = node
        self.address = address
        self.epoch = epoch
        self.seq = 0
        self._recent: deque[EventBatch] = deque(maxlen=keep_batches)

    def append(self, ops: bytes, keys: bytes, ts: float) -> EventBatch:
        self.seq += 1
        batch = EventBatch(self.node, self.address, self.epoch, self.seq, ts, ops, keys)
        self._recent.append(batch)
        return batch

    def answer(
        self, epoch: int, after_seq: int, snapshot: Callable[[], tuple[bytes, bytes]]
    ) -> SyncReply:
        """Replay the batches after ``after_seq`` if all are kept, else a snapshot."""
        oldest = self._recent[0].seq if self._recent else self.seq + 1
        if epoch == self.epoch and oldest <= after_seq + 1 <= self.seq + 1:
            batches = tuple(b for b in self._recent if b.seq > after_seq)
            return SyncReply(self.epoch, self.seq, batches)
        return SyncReply(self.epoch, self.seq, snapshot=snapshot())


# -- subscriber --------------------------------------------------------------------------


class StreamState(enum.Enum):
    IN_SYNC = "in_sync"
    AWAITING_SYNC = "awaiting_sync"


@dataclass(frozen=True, slots=True)
class SyncNeed:
    """Ask ``address`` (node ``node``) for what followed ``after_seq`` in ``epoch``."""

    node: str
    address: str
    epoch: int
    after_seq: int


@dataclass(slots=True)
class _Stream:
    node: str
    address: str
    epoch: int
    applied: int = 0
    state: StreamState = StreamState.IN_SYNC
    last_heard: float = 0.0
    sync_sent_at: float = 0.0
    buffered: dict[int, EventBatch] = field(default_factory=dict)
    heartbeat: Heartbeat | None = None
    num_syncs: int = 0


@dataclass(frozen=True, slots=True)
class MemberStatus:
    node: str
    address: str
    epoch: int
    applied_seq: int
    published_seq: int
    state: str  # the member's own state from its heartbeat
    stream: str  # in_sync / awaiting_sync
    last_heard_s: float  # seconds since the last message
    num_blocks: int
    num_syncs: int
    stats: dict[str, Any]


class ClusterView:
    """Every peer's announced blocks, applied from their streams into a ``ClusterIndex``."""

    def __init__(
        self,
        self_node: str,
        *,
        member_timeout_s: float = 3.0,
        sync_timeout_s: float = 2.0,
        max_buffered: int = 4096,
        on_applied: Callable[[EventBatch], None] | None = None,
    ) -> None:
        self.self_node = self_node
        self.index = ClusterIndex()
        self._streams: dict[str, _Stream] = {}
        self._member_timeout = member_timeout_s
        self._sync_timeout = sync_timeout_s
        self._max_buffered = max_buffered
        self._on_applied = on_applied
        self.num_stale = 0  # messages ignored as older than what was applied
        self.num_gaps = 0

    # -- inputs ---------------------------------------------------------------------------

    def on_batch(self, batch: EventBatch, now: float) -> SyncNeed | None:
        stream = self._stream_for(batch.node, batch.epoch, batch.address, now)
        if stream is None:
            return None
        stream.last_heard = now
        if batch.seq <= stream.applied:
            self.num_stale += 1
            return None
        if stream.state is StreamState.IN_SYNC and batch.seq == stream.applied + 1:
            self._apply(stream, batch)
            return None
        if len(stream.buffered) < self._max_buffered:
            stream.buffered[batch.seq] = batch
        if stream.state is StreamState.IN_SYNC:
            self.num_gaps += 1
            return self._need_sync(stream, now)
        return None

    def on_heartbeat(self, beat: Heartbeat, now: float) -> SyncNeed | None:
        if beat.state == "leaving":
            known = self._streams.get(beat.node)
            if known is not None and beat.epoch < known.epoch:
                # A goodbye from a past life is stale like any other message of an older
                # epoch: it must not drop the member's restarted self.
                self.num_stale += 1
                return None
            self.drop(beat.node)
            return None
        stream = self._stream_for(beat.node, beat.epoch, beat.address, now)
        if stream is None:
            return None
        stream.last_heard = now
        stream.heartbeat = beat
        stream.address = beat.address
        if stream.state is StreamState.IN_SYNC and beat.seq > stream.applied:
            self.num_gaps += 1  # the batches up to beat.seq were lost
            return self._need_sync(stream, now)
        return None

    def on_sync_reply(self, node: str, reply: SyncReply, now: float) -> SyncNeed | None:
        stream = self._streams.get(node)
        if stream is None or reply.epoch != stream.epoch:
            self.num_stale += 1
            return None
        stream.last_heard = now
        if reply.seq < stream.applied:  # a late answer to a request already superseded
            self.num_stale += 1
            return None
        if reply.snapshot is not None:
            keys, tiers = reply.snapshot
            self.index.clear(node)
            self.index.store(node, _split(keys), tiers)
            stream.applied = reply.seq
        else:
            for batch in reply.batches:
                if batch.seq == stream.applied + 1:
                    self._apply(stream, batch)
            if stream.applied < reply.seq:  # the replay did not cover the gap: snapshot
                return self._need_sync(stream, now, force_snapshot=True)
        stream.state = StreamState.IN_SYNC
        pending, stream.buffered = stream.buffered, {}
        for seq in sorted(pending):
            if seq == stream.applied + 1:
                self._apply(stream, pending[seq])
            elif seq > stream.applied + 1:  # still a hole: keep the rest, ask again
                stream.buffered = {s: b for s, b in pending.items() if s >= seq}
                return self._need_sync(stream, now)
        if stream.heartbeat is not None and stream.heartbeat.seq > stream.applied:
            # A heartbeat heard while awaiting (on_heartbeat asks nothing then) announced
            # batches this reply does not reach, e.g. it was answered before they existed:
            # ask again now rather than wait for the next heartbeat.
            return self._need_sync(stream, now)
        return None

    def expire(self, now: float) -> tuple[list[str], list[SyncNeed]]:
        """Members silent for too long are dropped; unanswered syncs are asked again."""
        dead = [s.node for s in self._streams.values()
                if now - s.last_heard > self._member_timeout]  # fmt: skip
        for node in dead:
            self.drop(node)
        retries = [
            self._need_sync(s, now)
            for s in self._streams.values()
            if s.state is StreamState.AWAITING_SYNC and now - s.sync_sent_at > self._sync_timeout
        ]
        return dead, retries

    def drop(self, node: str) -> None:
        self._streams.pop(node, None)
        self.index.drop_member(node)

    # -- reads ----------------------------------------------------------------------------

    def address_of(self, node: str) -> str | None:
        stream = self._streams.get(node)
        return None if stream is None else stream.address

    def member_state(self, node: str) -> str | None:
        """The state the member last announced ("active", "draining"), if heard."""
        stream = self._streams.get(node)
        return None if stream is None or stream.heartbeat is None else stream.heartbeat.state

    def is_live(self, node: str) -> bool:
        return node in self._streams

    @property
    def nodes(self) -> list[str]:
        return sorted(self._streams)

    def members(self, now: float) -> list[MemberStatus]:
        out = []
        for stream in sorted(self._streams.values(), key=lambda s: s.node):
            beat = stream.heartbeat
            out.append(
                MemberStatus(
                    node=stream.node,
                    address=stream.address,
                    epoch=stream.epoch,
                    applied_seq=stream.applied,
                    published_seq=max(stream.applied, beat.seq if beat else 0),
                    state=beat.state if beat else "unknown",
                    stream=stream.state.value,
                    last_heard_s=now - stream.last_heard,
                    num_blocks=self.index.num_blocks(stream.node),
                    num_syncs=stream.num_syncs,
                    stats=dict(beat.stats) if beat else {},
                )
            )
        return out

    # -- internals ------------------------------------------------------------------------

    def _stream_for(self, node: str, epoch: int, address: str, now: float) -> _Stream | None:
        if node == self.self_node:
            return None
        stream = self._streams.get(node)
        if stream is not None and epoch < stream.epoch:
            self.num_stale += 1
            return None
        if stream is None or epoch > stream.epoch:  # new member, or it restarted
            if stream is not None:
                self.index.drop_member(node)
            stream = _Stream(node, address, epoch, last_heard=now)
            self._streams[node] = stream
        return stream

    def _need_sync(self, stream: _Stream, now: float, *, force_snapshot: bool = False) -> SyncNeed:
        stream.state = StreamState.AWAITING_SYNC
        stream.sync_sent_at = now
        stream.num_syncs += 1
        # after_seq = -1 cannot be replayed from any log: the publisher sends a snapshot.
        after = stream.applied
        return SyncNeed(stream.node, stream.address, stream.epoch, after if not force_snapshot
                        else _NO_REPLAY)  # fmt: skip

    def _apply(self, stream: _Stream, batch: EventBatch) -> None:
        apply_ops(self.index, stream.node, batch.ops, batch.keys)
        stream.applied = batch.seq
        if self._on_applied is not None:
            self._on_applied(batch)


_NO_REPLAY = 1 << 62  # an after_seq no log holds: answered with a snapshot


def apply_ops(index: ClusterIndex, node: str, ops: bytes, keys: bytes) -> None:
    """Apply one batch's ops in order, grouping runs of the same kind."""
    start = 0
    count = len(ops)
    while start < count:
        op = ops[start]
        end = start + 1
        if op == OP_CLEARED:
            index.clear(node)
            start = end
            continue
        storing = op != OP_REMOVED
        while end < count and ops[end] != OP_CLEARED and (ops[end] != OP_REMOVED) == storing:
            end += 1
        run = _split(keys[start * KEY_BYTES : end * KEY_BYTES])
        if storing:
            index.store(node, run, [o - 1 for o in ops[start:end]])
        else:
            index.remove(node, run)
        start = end


def encode_events(events: Iterable[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """(op, key) pairs as the ``ops`` and ``keys`` fields of a batch."""
    ops = bytearray()
    keys = bytearray()
    for op, key in events:
        ops.append(op)
        keys += CLEARED_KEY if op == OP_CLEARED else key
    return bytes(ops), bytes(keys)


def _split(keys: bytes) -> Sequence[bytes]:
    return [keys[i : i + KEY_BYTES] for i in range(0, len(keys), KEY_BYTES)]
