"""Daemon ↔ daemon wire protocol, version 1: msgpack maps over ZeroMQ TCP.

Every daemon binds two TCP sockets on its cluster address ``host:port``:

* ``PUB`` on ``port + 1``: its block-event stream and heartbeats, each sent as two frames
  ``[topic, msgpack map]``. Subscribers (peer daemons, routers) connect a ``SUB``.
* ``ROUTER`` on ``port``: requests from peers and operators. Peers connect a ``DEALER``;
  every request is one frame, every reply is one frame, except a fetch reply, which is a
  header frame followed by one frame per block found (zero-copy payloads).

Stream (PUB, topic ``shoal.ev`` / ``shoal.hb``)::

    events     node, address, epoch, seq, ts, ops (bin: 1 B per event), keys (bin: 16 B each)
    heartbeat  node, epoch, seq, address, state, ts, interval_s, stats (map)

``epoch`` is the publisher's start time in ns (a restart has a larger one); ``seq`` counts
event batches from 1 within an epoch, and a heartbeat carries the seq of the last batch
sent, so a lost trailing batch is noticed too. Event ops: ``OP_REMOVED`` (0), ``1 + tier``
for "stored in tier" (a move between tiers is a store in the new tier) and
``OP_CLEARED`` (255: forget everything this node announced; its key is 16 zero bytes).

Engine streams: a daemon also publishes, for each inference engine beside it, which
chunk keys that engine holds on its GPU (learned from vLLM's KV events), as a stream of
its own named ``<node>/<engine>`` (``engine_stream``) with its own seq, heartbeats and
snapshots served by the daemon's ROUTER (``sync`` names the ``stream``). Such a stream
uses ``OP_ON_GPU`` for "on the engine's GPU"; a ``/`` in a member name marks it, which is
why node names may not contain one. Subscribers treat it as a member whose holdings can
be located but never fetched.

Requests (ROUTER)::

    sync     id, stream, epoch, after_seq  -> replay: seq, batches (list of events maps)
                                              snapshot: seq, keys, tiers (bin, 1 B each)
    fetch    id, node, keys                -> header {found: [index...], sizes, checksums,
                                              namespaces} + one frame per found block
    offer    id, source, keys              -> accepted (the receiver fetches from source)
    status   id                            -> node, epoch, seq, state, members, stats
    evict    id, namespace, key_prefix     -> evicted
    flush    id                            -> flushed
    drain    id                            -> handed_off, peers (replies when drained)

Replies are ``{"v": 1, "id": ..., "ok": true, ...}`` or ``{"ok": false, "code",
"error"}`` exactly as in the engine protocol. A receiver drops (and counts) any frame it
cannot decode, never raising past its loop.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from kvcache import wire
from kvcache.errors import ProtocolError
from kvcache.keys import KEY_BYTES
from kvcache.wire import decode_fields, pack, unpack_map

__all__ = [
    "ENGINE_SEPARATOR",
    "OP_CLEARED",
    "OP_ON_GPU",
    "OP_REMOVED",
    "TOPIC_EVENTS",
    "TOPIC_HEARTBEAT",
    "VERSION",
    "DrainRequest",
    "EventBatch",
    "EvictRequest",
    "FetchRequest",
    "FlushRequest",
    "Heartbeat",
    "OfferRequest",
    "Request",
    "StatusRequest",
    "SyncRequest",
    "decode_reply",
    "decode_request",
    "decode_stream",
    "encode_error",
    "encode_reply",
    "engine_stream",
    "is_engine_stream",
    "op_for_tier",
]

VERSION = 2  # 2: sync names the stream (engine streams); v1 peers are dropped as "version"
TOPIC_EVENTS = b"shoal.ev"
TOPIC_HEARTBEAT = b"shoal.hb"
OP_REMOVED = 0
OP_CLEARED = 255
OP_ON_GPU = 1  # in an engine stream: the key is on the engine's GPU
CLEARED_KEY = bytes(KEY_BYTES)
ENGINE_SEPARATOR = "/"
_VALID_OPS = bytes([OP_REMOVED, 1, 2, 3, OP_CLEARED])  # 1 + Tier.SHM / DRAM / SSD


def op_for_tier(tier: int) -> int:
    return 1 + tier


def engine_stream(node: str, engine: str) -> str:
    """The member name of ``engine``'s GPU stream, published by ``node``."""
    return f"{node}{ENGINE_SEPARATOR}{engine}"


def is_engine_stream(member: str) -> bool:
    return ENGINE_SEPARATOR in member


def _encode(obj: Any, extra: dict[str, Any]) -> bytes:
    body: dict[str, Any] = {"v": VERSION, **extra}
    for f in fields(obj):
        body[f.name] = getattr(obj, f.name)
    return pack(body)


# -- the event stream ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventBatch:
    node: str
    address: str  # where the publisher answers sync and fetch requests
    epoch: int
    seq: int
    ts: float  # wall time the first event of the batch was recorded (propagation metric)
    ops: bytes
    keys: bytes

    topic: ClassVar[bytes] = TOPIC_EVENTS

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.ops) * KEY_BYTES:
            raise ProtocolError(
                f"events: {len(self.ops)} ops but {len(self.keys) // KEY_BYTES} keys"
            )
        if self.ops.translate(None, _VALID_OPS):  # any byte left names no operation
            raise ProtocolError(
                "events: an op is not removed (0), stored in a tier (1-3) or cleared"
            )

    def __len__(self) -> int:
        return len(self.ops)

    def to_map(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def encode(self) -> bytes:
        return _encode(self, {"t": "events"})


@dataclass(frozen=True, slots=True)
class Heartbeat:
    node: str
    epoch: int
    seq: int
    address: str
    state: str  # "active", "draining" or "leaving" (drop my entries now)
    ts: float
    interval_s: float
    stats: dict[str, Any]

    topic: ClassVar[bytes] = TOPIC_HEARTBEAT

    def __post_init__(self) -> None:
        if self.state not in ("active", "draining", "leaving"):
            raise ProtocolError(f"heartbeat: unknown state {self.state!r}")

    def encode(self) -> bytes:
        return _encode(self, {"t": "heartbeat"})


_STREAM: dict[bytes, tuple[str, type[EventBatch] | type[Heartbeat]]] = {
    TOPIC_EVENTS: ("events", EventBatch),
    TOPIC_HEARTBEAT: ("heartbeat", Heartbeat),
}


def decode_stream(topic: bytes, frame: bytes | memoryview) -> EventBatch | Heartbeat:
    """One published message; ``ProtocolError`` for a bad topic, version or field."""
    entry = _STREAM.get(bytes(topic))
    if entry is None:
        raise ProtocolError(f"unknown stream topic {bytes(topic)[:32]!r}")
    name, cls = entry
    body = unpack_map(frame, name, VERSION)
    if body.get("t") != name:
        raise ProtocolError(f"{name}: type tag {body.get('t')!r} does not match the topic")
    return cls(**decode_fields(cls, body, name))


def decode_batch_map(body: Any) -> EventBatch:
    """An events map embedded in a replay reply."""
    if not isinstance(body, dict):
        raise ProtocolError(f"replay: a batch must be a map, got {type(body).__name__}")
    return EventBatch(**decode_fields(EventBatch, body, "replay batch"))


# -- requests on the cluster ROUTER -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    op: ClassVar[str]
    id: int

    def encode(self) -> bytes:
        return _encode(self, {"op": self.op})


@dataclass(frozen=True, slots=True)
class SyncRequest(Request):
    """Replay batches after ``after_seq`` of ``epoch``, or a snapshot if they are gone.

    ``stream``: the member whose stream is asked, the serving node or one of its engines.
    """

    op: ClassVar[str] = "sync"
    stream: str
    epoch: int
    after_seq: int


@dataclass(frozen=True, slots=True)
class FetchRequest(Request):
    op: ClassVar[str] = "fetch"
    node: str  # the requester, for logs and metrics
    keys: bytes


@dataclass(frozen=True, slots=True)
class OfferRequest(Request):
    """A draining node asks the receiver to fetch ``keys`` from ``source``."""

    op: ClassVar[str] = "offer"
    source: str
    keys: bytes


@dataclass(frozen=True, slots=True)
class StatusRequest(Request):
    op: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class EvictRequest(Request):
    """Remove blocks of ``namespace`` (if set) whose hex key starts with ``key_prefix``."""

    op: ClassVar[str] = "evict"
    namespace: str
    key_prefix: str


@dataclass(frozen=True, slots=True)
class FlushRequest(Request):
    op: ClassVar[str] = "flush"


@dataclass(frozen=True, slots=True)
class DrainRequest(Request):
    op: ClassVar[str] = "drain"


_REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        SyncRequest, FetchRequest, OfferRequest, StatusRequest, EvictRequest, FlushRequest,
        DrainRequest,
    )
}  # fmt: skip


def decode_request(frame: bytes | memoryview) -> Request:
    body = unpack_map(frame, "cluster request", VERSION)
    op = body.get("op")
    cls = _REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown cluster op {op!r}; known: {sorted(_REQUESTS)}", "unknown_op")
    return cls(**decode_fields(cls, body, str(op)))


def encode_reply(request_id: int, **values: Any) -> bytes:
    return wire.encode_reply(VERSION, request_id, **values)


def encode_error(request_id: int, code: str, message: str) -> bytes:
    return wire.encode_error(VERSION, request_id, code, message)


def decode_reply(frame: bytes | memoryview) -> dict[str, Any]:
    return wire.decode_reply(frame, "cluster reply", VERSION)
