"""Daemon ↔ daemon wire protocol, version 3 (speaks and reads version 2): msgpack maps
over ZeroMQ TCP.

Every daemon binds two TCP sockets on its cluster address ``host:port``:

* ``PUB`` on ``port + 1``: its block-event stream and heartbeats, each sent as two frames
  ``[topic, msgpack map]``. Subscribers (peer daemons, routers) connect a ``SUB``.
* ``ROUTER`` on ``port``: requests from peers and operators. Peers connect a ``DEALER``;
  every request is one frame, every reply is one frame, except a fetch reply, which is a
  header frame followed by one frame per block found (zero-copy payloads).

(Who may connect, with which keys, and which verbs each may send: ``security.py``.)

Stream (PUB, topic ``shoal.ev`` / ``shoal.hb``)::

    events     node, address, epoch, seq, ts, ops (bin: 1 B per event), keys (bin: 16 B each)
    heartbeat  node, epoch, seq, address, state, ts, interval_s, stats (map), proto (v3)

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
    offer    id, source, keys, node (v3)   -> fetched (the receiver fetches from the
                                              draining member ``node``, at its known address)
    status   id                            -> node, epoch, seq, state, members, stats
    evict    id, namespace, key_prefix, token (v3)   -> evicted      (operator verbs)
    flush    id, token (v3)                -> flushed
    drain    id, token (v3)                -> handed_off, peers (replies when drained)

Replies are ``{"v": ..., "id": ..., "ok": true, ...}`` or ``{"ok": false, "code",
"error"}`` exactly as in the engine protocol. A receiver drops (and counts) any frame it
cannot decode, never raising past its loop.

Versions (a rolling upgrade keeps N and N-1 in one cluster): every map carries ``v``;
a decoder accepts ``MIN_VERSION`` .. ``VERSION``, and a field a version added (``since``
in its metadata) takes its default when an older sender left it out. v3 only *adds*
fields, so the stream is sent as v2 (a v2 subscriber reads it and ignores ``proto``); a
heartbeat's ``proto`` says which version the member speaks, a request to a member is
encoded in ``min(VERSION, its proto)`` (``encode(version)`` drops the newer fields), and
a reply is sent in the version of its request. v1 peers (no ``stream`` in ``sync``) are
refused as ``version``. Rejected: one version number compared for equality (v1 → v2
partitioned every rolling upgrade, review M12).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from kvcache import wire
from kvcache.errors import ProtocolError
from kvcache.keys import KEY_BYTES
from kvcache.wire import check_field, pack

__all__ = [
    "ENGINE_SEPARATOR",
    "MIN_VERSION",
    "OPERATOR_OPS",
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
    "decode_request_versioned",
    "decode_stream",
    "encode_error",
    "encode_reply",
    "engine_stream",
    "is_engine_stream",
    "op_for_tier",
]

VERSION = 3  # 3: heartbeat proto, offer node, operator token; 2: sync names the stream
MIN_VERSION = 2  # the oldest version read and spoken (v1 peers are refused as "version")
TOPIC_EVENTS = b"shoal.ev"
TOPIC_HEARTBEAT = b"shoal.hb"
OP_REMOVED = 0
OP_CLEARED = 255
OP_ON_GPU = 1  # in an engine stream: the key is on the engine's GPU
CLEARED_KEY = bytes(KEY_BYTES)
ENGINE_SEPARATOR = "/"
STREAM_VERSION = MIN_VERSION  # the stream format is unchanged since v2: every member reads it
_VALID_OPS = bytes([OP_REMOVED, 1, 2, 3, OP_CLEARED])  # 1 + Tier.SHM / DRAM / SSD


def op_for_tier(tier: int) -> int:
    return 1 + tier


def engine_stream(node: str, engine: str) -> str:
    """The member name of ``engine``'s GPU stream, published by ``node``."""
    return f"{node}{ENGINE_SEPARATOR}{engine}"


def is_engine_stream(member: str) -> bool:
    return ENGINE_SEPARATOR in member


def _since(version: int, default: Any) -> Any:
    """A field added in ``version``; older senders leave it out and it reads ``default``."""
    return field(default=default, metadata={"since": version})


def _encode(obj: Any, extra: dict[str, Any], version: int, *, newer: bool = False) -> bytes:
    """``obj`` as version ``version``; ``newer`` keeps the fields later versions added
    (the stream: a v2 reader ignores a field it does not know)."""
    assert MIN_VERSION <= version <= VERSION, f"cannot speak cluster protocol v{version}"
    body: dict[str, Any] = {"v": version, **extra}
    for f in fields(obj):
        if newer or f.metadata.get("since", MIN_VERSION) <= version:
            body[f.name] = getattr(obj, f.name)
    return pack(body)


def _unpack(frame: bytes | memoryview, what: str) -> tuple[dict[str, Any], int]:
    """One msgpack map and its version, which must be one this module speaks."""
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise ProtocolError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(body).__name__}")
    version = body.get("v")
    if type(version) is not int or not MIN_VERSION <= version <= VERSION:  # not True, not 2.0
        raise ProtocolError(
            f"{what} has protocol version {version!r}; expected {MIN_VERSION} to {VERSION}",
            "version",
        )
    return body, version


def _decode_fields(cls: type[Any], body: dict[str, Any], what: str) -> dict[str, Any]:
    """Validated constructor arguments; a missing field added later takes its default."""
    values = {}
    for f in fields(cls):
        if f.name in body:
            values[f.name] = check_field(body[f.name], str(f.type), f.name, what)
        elif f.default is MISSING or "since" not in f.metadata:
            raise ProtocolError(f"{what}: missing field {f.name!r}")
    return values


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
        return _encode(self, {"t": "events"}, STREAM_VERSION)


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
    proto: int = _since(3, MIN_VERSION)  # the newest version the member speaks

    topic: ClassVar[bytes] = TOPIC_HEARTBEAT

    def __post_init__(self) -> None:
        if self.state not in ("active", "draining", "leaving"):
            raise ProtocolError(f"heartbeat: unknown state {self.state!r}")

    def encode(self) -> bytes:
        return _encode(self, {"t": "heartbeat"}, STREAM_VERSION, newer=True)


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
    body, _ = _unpack(frame, name)
    if body.get("t") != name:
        raise ProtocolError(f"{name}: type tag {body.get('t')!r} does not match the topic")
    return cls(**_decode_fields(cls, body, name))


def decode_batch_map(body: Any) -> EventBatch:
    """An events map embedded in a replay reply."""
    if not isinstance(body, dict):
        raise ProtocolError(f"replay: a batch must be a map, got {type(body).__name__}")
    return EventBatch(**_decode_fields(EventBatch, body, "replay batch"))


# -- requests on the cluster ROUTER -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    op: ClassVar[str]
    id: int

    def encode(self, version: int = VERSION) -> bytes:
        """This request as a member speaking ``version`` reads it."""
        return _encode(self, {"op": self.op}, version)


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
    """A draining member asks the receiver to fetch ``keys`` from it.

    The receiver fetches only from a member its view shows draining, at the address its
    view holds: ``node`` (v3; with CurveZMQ the sender's authenticated name) or, from a
    v2 sender, the draining member whose address is ``source``. Never from an address
    taken from the message (review C4: an offer made the node dial anyone).
    """

    op: ClassVar[str] = "offer"
    source: str
    keys: bytes
    node: str = _since(3, "")


@dataclass(frozen=True, slots=True)
class StatusRequest(Request):
    op: ClassVar[str] = "status"


@dataclass(frozen=True, slots=True)
class EvictRequest(Request):
    """Remove blocks of ``namespace`` (if set) whose hex key starts with ``key_prefix``."""

    op: ClassVar[str] = "evict"
    namespace: str
    key_prefix: str
    token: str = _since(3, "")  # the local operator token (without CurveZMQ)


@dataclass(frozen=True, slots=True)
class FlushRequest(Request):
    op: ClassVar[str] = "flush"
    token: str = _since(3, "")


@dataclass(frozen=True, slots=True)
class DrainRequest(Request):
    op: ClassVar[str] = "drain"
    token: str = _since(3, "")


_REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        SyncRequest, FetchRequest, OfferRequest, StatusRequest, EvictRequest, FlushRequest,
        DrainRequest,
    )
}  # fmt: skip


OPERATOR_OPS = frozenset({"evict", "flush", "drain"})  # authorised apart from peer verbs


def decode_request_versioned(frame: bytes | memoryview) -> tuple[Request, int]:
    """A request and the version its sender speaks (the reply is sent in it)."""
    body, version = _unpack(frame, "cluster request")
    op = body.get("op")
    cls = _REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise ProtocolError(f"unknown cluster op {op!r}; known: {sorted(_REQUESTS)}", "unknown_op")
    return cls(**_decode_fields(cls, body, str(op))), version


def decode_request(frame: bytes | memoryview) -> Request:
    return decode_request_versioned(frame)[0]


def encode_reply(request_id: int, /, *, version: int = VERSION, **values: Any) -> bytes:
    return wire.encode_reply(version, request_id, **values)


def encode_error(request_id: int, code: str, message: str, *, version: int = VERSION) -> bytes:
    return wire.encode_error(version, request_id, code, message)


def decode_reply(frame: bytes | memoryview) -> dict[str, Any]:
    """Parse a reply frame (any version spoken) into its map; the caller checks ``ok``."""
    body, _ = _unpack(frame, "cluster reply")
    if type(body.get("id")) is not int or not isinstance(body.get("ok"), bool):  # not a bool id
        raise ProtocolError("cluster reply lacks an integer 'id' or a boolean 'ok'")
    return body
