"""vLLM's KV-event stream, read: one payload decoded, and the stream's sequence kept whole.

vLLM (``--kv-events-config``, ``vllm/distributed/kv_events.py``) publishes what its block
pool does on a ZeroMQ PUB socket, one multipart message per batch::

    [topic, seq (8 bytes, big-endian, from 0 per publisher process), payload (msgpack)]

    payload = [ts, events]  or  [ts, events, data_parallel_rank]      (KVEventBatch)
    event   = {"type": "BlockStored", "block_hashes": [...], ...}     tagged map (0.33 on)
            | ["BlockStored", block_hashes, parent_block_hash, ...]   tagged array (older)

    BlockStored      block_hashes, parent_block_hash, token_ids, block_size, lora_id,
                     medium, lora_name, extra_keys, group_idx, (later fields ignored)
    BlockRemoved     block_hashes, medium, group_idx
    AllBlocksCleared (no fields)

A block hash is an int (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``) or bytes (sha256, the
default since vLLM's ``ExternalBlockHash``). The publisher keeps its last batches and
answers a replay request on a ROUTER: a DEALER sends ``[b"", start_seq (8 bytes)]`` and
gets ``[b"", topic, seq, payload]`` for every kept batch with ``seq >= start_seq``, then
the end marker ``[b"", b"", (-1 as 8 signed bytes), b""]``.

Two pure pieces live here; ``engine_feed.py`` owns the sockets:

* ``decode_batch``: both encodings into typed events. Unknown *fields* are ignored (vLLM
  adds fields at the end of both forms); an unknown *event type* or a wrong field type is
  a ``ProtocolError``, and the whole batch is rejected: a batch read in part might have
  lost a removal, and a missed removal is the one loss that makes an index lie.
* ``EngineSequence``: the seq bookkeeping of one publisher, a state machine::

      fresh ──seq 0, or no replay endpoint──► apply ──seq = last+1──► apply
        │  └─seq > 0 (joined late)───────────► replay from 0 ─┐
      apply ──seq > last+1 (gap)─────────────► replay from last+1 ─┤ live batches buffered
            ──seq <= last (publisher restarted)──► reset, fresh    │
            ──disconnected──────────────────────► reset, fresh    ▼
      replay ──end marker or timeout──► apply replayed + buffered in seq order

Why a reset is always safe and a hole never is: starting from nothing and applying any
contiguous *suffix* of the stream only ever under-reports (a block stored before the
suffix is unknown, and its later removal is ignored). A hole in the middle may hide the
removal of a block we know, so every hole that replay does not fill (no replay endpoint,
a replay that comes back short or not at all, a batch that cannot be decoded) resets the
engine's entries and continues from after the hole. A publisher restart is seen either as
seq going back or as the connection dropping; both reset.

Rejected: decoding with vLLM's own msgspec classes (it would tie the daemon to one vLLM
version's field layout and to vLLM's import time, seconds); trusting a replay to have
come from the same publisher process (a restart between gap and replay is caught by the
disconnect it implies).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from kvcache.errors import ProtocolError

__all__ = [
    "END_SEQ",
    "AllBlocksCleared",
    "BlockHash",
    "BlockRemoved",
    "BlockStored",
    "EngineBatch",
    "EngineEvent",
    "EngineSequence",
    "Reset",
    "Step",
    "decode_batch",
    "decode_seq",
]

BlockHash = int | bytes
END_SEQ = (-1).to_bytes(8, "big", signed=True)  # a replay's end-of-sequence marker
_MAX_HASH_BYTES = 64


@dataclass(frozen=True, slots=True)
class BlockStored:
    """``block_hashes[i]`` holds ``token_ids[i*block_size:(i+1)*block_size]``; its parent
    is ``block_hashes[i-1]`` (``parent_block_hash`` for the first)."""

    block_hashes: Sequence[BlockHash]
    parent_block_hash: BlockHash | None
    token_ids: Sequence[int]  # as decoded, not copied
    block_size: int
    lora: bool  # lora_id or lora_name set: the KV depends on an adapter
    medium: str | None  # "GPU" (None in vLLM before the field existed), "CPU", ...
    extra_keyed: tuple[bool, ...]  # per block: multimodal / cache-salt keys; () = none
    group_idx: int | None


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: Sequence[BlockHash]
    medium: str | None
    group_idx: int | None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


EngineEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EngineBatch:
    ts: float
    events: tuple[EngineEvent, ...]
    data_parallel_rank: int | None


# -- decoding -------------------------------------------------------------------------


def decode_seq(frame: bytes) -> int:
    """The 8-byte big-endian sequence number of a stream or replay message."""
    if len(frame) != 8:
        raise ProtocolError(f"vLLM event seq must be 8 bytes, got {len(frame)}")
    return int.from_bytes(frame, "big")


def decode_batch(payload: bytes | memoryview) -> EngineBatch:
    """One vLLM ``KVEventBatch`` payload; ``ProtocolError`` names what is wrong."""
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"vLLM event batch is not valid msgpack: {exc}") from None
    if not isinstance(body, list) or len(body) not in (2, 3):
        raise ProtocolError("vLLM event batch must be an array [ts, events, dp_rank?]")
    ts, events = body[0], body[1]
    rank = body[2] if len(body) == 3 else None
    if not _is_number(ts) or not isinstance(events, list) or not _is_optional_count(rank):
        raise ProtocolError("vLLM event batch needs a numeric ts, an event list, an int rank")
    return EngineBatch(float(ts), tuple(_decode_event(e) for e in events), rank)


# Positional field order of the tagged-array form, after the tag (trailing defaults omitted).
_ARRAY_FIELDS = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}  # fmt: skip
_REQUIRED = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
    "BlockRemoved": ("block_hashes",),
    "AllBlocksCleared": (),
}


def _decode_event(raw: Any) -> EngineEvent:
    if isinstance(raw, dict):
        tag = raw.get("type")
        fields = raw
    elif isinstance(raw, list) and raw:
        tag = raw[0]
        names = _ARRAY_FIELDS.get(tag) if isinstance(tag, str) else None
        fields = dict(zip(names or (), raw[1:], strict=False))
    else:
        raise ProtocolError(f"a vLLM event must be a tagged map or array, got {raw!r:.60}")
    if not isinstance(tag, str) or tag not in _REQUIRED:
        raise ProtocolError(f"unknown vLLM event type {tag!r:.40}", "unknown_event")
    missing = [name for name in _REQUIRED[tag] if name not in fields]
    if missing:
        raise ProtocolError(f"vLLM {tag} lacks {', '.join(missing)}")
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    hashes = _hashes(fields["block_hashes"], tag)
    medium = _optional(fields.get("medium"), str, tag, "medium")
    group = fields.get("group_idx")
    if not _is_optional_count(group):
        raise ProtocolError(f"vLLM {tag}: group_idx must be a non-negative int or nil")
    if tag == "BlockRemoved":
        return BlockRemoved(hashes, medium, group)
    parent = fields["parent_block_hash"]
    if parent is not None and not _is_hash(parent):
        raise ProtocolError("vLLM BlockStored: parent_block_hash must be an int, bytes or nil")
    tokens = fields["token_ids"]
    if not isinstance(tokens, list) or not all(_is_count(t) for t in tokens):
        raise ProtocolError("vLLM BlockStored: token_ids must be a list of non-negative ints")
    block_size = fields["block_size"]
    if not _is_count(block_size) or block_size == 0:
        raise ProtocolError("vLLM BlockStored: block_size must be a positive int")
    lora_id = _optional(fields.get("lora_id"), int, tag, "lora_id")
    lora_name = _optional(fields.get("lora_name"), str, tag, "lora_name")
    extra = fields.get("extra_keys")
    if extra is not None and not isinstance(extra, list):
        raise ProtocolError("vLLM BlockStored: extra_keys must be a list or nil")
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=block_size,
        lora=lora_id is not None or lora_name is not None,
        medium=medium,
        extra_keyed=tuple(bool(k) for k in extra) if extra else (),
        group_idx=group,
    )


def _hashes(value: Any, tag: str) -> list[BlockHash]:
    if not isinstance(value, list) or not all(_is_hash(h) for h in value):
        raise ProtocolError(f"vLLM {tag}: block_hashes must be a list of ints or bytes")
    return value


def _optional(value: Any, kind: type, tag: str, name: str) -> Any:
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise ProtocolError(f"vLLM {tag}: {name} must be {kind.__name__} or nil")
    return value


def _is_hash(value: Any) -> bool:
    if isinstance(value, bytes):
        return 0 < len(value) <= _MAX_HASH_BYTES
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_optional_count(value: Any) -> bool:
    return value is None or _is_count(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- sequencing -----------------------------------------------------------------------


class Reset(enum.Enum):
    """Why an engine's entries were forgotten (a metric label)."""

    RESTART = "restart"  # seq went back: a new publisher process
    DISCONNECT = "disconnect"  # the connection to the publisher dropped
    HOLE = "hole"  # batches lost that replay did not bring back


@dataclass(frozen=True, slots=True)
class Step:
    """What the feed does next: forget the engine first (``reset``), then apply
    ``batches`` ((seq, payload), in order), then ask a replay from ``replay_from``."""

    reset: Reset | None = None
    batches: tuple[tuple[int, bytes], ...] = ()
    replay_from: int | None = None


@dataclass(slots=True)
class EngineSequence:
    """The seq bookkeeping of one vLLM publisher (see the module docstring).

    ``can_replay``: the publisher has a replay endpoint. Time is injected (``now``).
    """

    can_replay: bool
    replay_timeout_s: float = 2.0
    max_buffered: int = 10_000
    last: int | None = None  # seq of the last batch applied; None = fresh
    replay_deadline: float | None = None  # set while a replay is outstanding
    num_gaps: int = 0
    num_replays: int = 0
    _replayed: dict[int, bytes] = field(default_factory=dict)
    _buffered: dict[int, bytes] = field(default_factory=dict)

    @property
    def replaying(self) -> bool:
        return self.replay_deadline is not None

    def on_batch(self, seq: int, payload: bytes, now: float) -> Step:
        """A batch from the live stream."""
        if self.replaying:
            self._buffered[seq] = payload
            if len(self._buffered) <= self.max_buffered:
                return Step()
            return self._finish_replay()  # a replay that slow is as good as lost
        reset = None
        if self.last is not None and seq <= self.last:
            reset, self.last = Reset.RESTART, None
        if self.last is None:
            if seq == 0 or not self.can_replay:
                self.last = seq
                return Step(reset, ((seq, payload),))
            return self._ask_replay(0, seq, payload, now, reset)  # joined late: get it all
        if seq == self.last + 1:
            self.last = seq
            return Step(batches=((seq, payload),))
        self.num_gaps += 1
        if self.can_replay:
            return self._ask_replay(self.last + 1, seq, payload, now, None)
        self.last = seq
        return Step(Reset.HOLE, ((seq, payload),))

    def on_replayed(self, seq: int, payload: bytes) -> None:
        """A batch of the outstanding replay (ignored when none is outstanding)."""
        if self.replaying and len(self._replayed) < self.max_buffered:
            self._replayed[seq] = payload

    def on_replay_end(self) -> Step:
        """The publisher's end marker: apply what the replay and the live stream brought."""
        return self._finish_replay() if self.replaying else Step()

    def on_disconnect(self) -> Step:
        """The connection dropped: the publisher may be gone or restarted; start over."""
        had_state = self.last is not None or self.replaying
        self.last = None
        self.replay_deadline = None
        self._replayed.clear()
        self._buffered.clear()
        return Step(Reset.DISCONNECT) if had_state else Step()

    def expire(self, now: float) -> Step | None:
        """A replay not finished by its deadline ends with what arrived; None if none due."""
        if self.replay_deadline is None or now < self.replay_deadline:
            return None
        return self._finish_replay()

    def _ask_replay(
        self, start: int, seq: int, payload: bytes, now: float, reset: Reset | None
    ) -> Step:
        self.num_replays += 1
        self.replay_deadline = now + self.replay_timeout_s
        self._buffered = {seq: payload}
        self._replayed = {}
        return Step(reset, replay_from=start)

    def _finish_replay(self) -> Step:
        """Apply the replayed and buffered batches from ``last + 1``; a hole resets."""
        arrived = {**self._replayed, **self._buffered}
        self._replayed, self._buffered = {}, {}
        self.replay_deadline = None
        after = -1 if self.last is None else self.last
        seqs = sorted(s for s in arrived if s > after)
        reset = None
        out: list[tuple[int, bytes]] = []
        for seq in seqs:
            expected = after + 1 if not out else out[-1][0] + 1
            if seq != expected and (out or self.last is not None):
                # A hole: what came before it is unusable. (Before anything is applied
                # in a fresh stream, the first batch kept is simply where it starts.)
                reset, out = Reset.HOLE, []
            out.append((seq, arrived[seq]))
        if out:
            self.last = out[-1][0]
        return Step(reset, tuple(out))
