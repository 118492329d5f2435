"""Engine ↔ daemon wire protocol, version 2: msgpack maps over ZeroMQ DEALER/ROUTER.

Transport: the daemon binds a ROUTER socket on ``ipc://<socket>``; each client connects a
DEALER. Every frame is one msgpack map. Block payloads never travel here: they move
through the shared-memory arena, and messages carry arena offsets.

Request::  {"v": 2, "id": <u64>, "op": <name>, "session": <u64>, "epoch": <u64>, ...fields}
Reply::    {"v": 2, "id": <same>, "ok": true, ...reply fields}
           {"v": 2, "id": <same>, "ok": false, "code": <ErrorCode>, "error": <message>}

Sessions. ``hello`` (session 0, epoch 0) opens one and answers a random 64-bit ``session``
token and the daemon's ``epoch`` (derived from its arena's instance id, so it changes with
every daemon start). Every later request carries both, and the daemon honours a request
only if the token is live, the epoch is its own and the request came over the connection
(ROUTER identity) that said hello; anything else is ``unknown_session``, never an act on
another client's session. Two exceptions, both harmless without the secret token:
``heartbeat`` (keeps the session alive; the client sends it from its own thread and
socket) and ``bye`` (a client whose call failed ends its session over a fresh socket).
A client answered ``unknown_session`` says hello again and retries its call once.

Roles. ``hello`` declares ``role`` ``engine`` or ``operator``; ``evict``, ``flush`` and
``drain`` are operator verbs and an engine session is refused them with ``forbidden``.

Versions. 1: sequential session ids. 2: session tokens, ``epoch``, ``role``. A frame of
another version is answered with a ``version`` error naming both versions (and a client
reading a reply of another version raises ``ProtocolError`` saying so).

Key lists travel as one ``bin`` of concatenated 16-byte keys (a 1,000-key chain is one
16 KB string, not 1,000 msgpack objects). ``release`` is one-way (no reply), so a reader
can hand leases back without paying a round trip.

==========  =========================================  =====================================
op          request fields                             reply fields
==========  =========================================  =====================================
hello       pid, pid_ns, namespace, client, role       session, epoch, arena_path,
                                                       instance_id, arena_bytes,
                                                       max_block_bytes, heartbeat_s,
                                                       pid, pid_ns (the daemon's)
lookup      keys                                       length
reserve     keys, sizes, parent (bin or nil)           statuses (bin, 1 byte each), offsets
commit      keys, checksums, reply                     committed (none if reply is false)
abort       keys                                       -
get         keys, prefix                               offsets, sizes, checksums (-1: miss)
release     keys                                       (none: one-way)
delete      keys                                       deleted
stats       -                                          stats (map)
heartbeat   -                                          -
bye         -                                          -
locate      keys                                       length (local), remote_length, runs
                                                       ([node, address, upto] per peer)
fetch       keys                                       length (local prefix once peers'
                                                       blocks landed; replied when done)
cluster     samples                                    cluster (map: members, epochs, lag)
evict       namespace, key_prefix                      evicted
flush       -                                          flushed
drain       -                                          handed_off, peers (when drained)
==========  =========================================  =====================================

Every receiver rejects an unknown version, a non-map frame, an unknown op, a missing or
mistyped field and an oversized frame with a specific ``ProtocolError`` (the daemon
answers it with an error reply and stays up).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from kvcache import wire
from kvcache.errors import ProtocolError
from kvcache.wire import decode_fields, pack, peek_id, unpack_map

__all__ = [
    "ENGINE",
    "OPERATOR",
    "OPERATOR_VERBS",
    "ROLES",
    "VERSION",
    "AbortRequest",
    "ByeRequest",
    "ClusterRequest",
    "CommitRequest",
    "DeleteRequest",
    "DrainRequest",
    "ErrorCode",
    "EvictRequest",
    "FetchRequest",
    "FlushRequest",
    "GetRequest",
    "HeartbeatRequest",
    "HelloRequest",
    "LocateRequest",
    "LookupRequest",
    "ReleaseRequest",
    "Request",
    "ReserveRequest",
    "StatsRequest",
    "decode_reply",
    "decode_request",
    "encode_error",
    "encode_reply",
    "peek_id",
]

VERSION = 2

ENGINE = "engine"  # hello role of a data-plane client (engines, connectors, tools that read)
OPERATOR = "operator"  # hello role that may also evict, flush and drain
ROLES = (ENGINE, OPERATOR)


class ErrorCode(enum.StrEnum):
    MALFORMED = "malformed"  # not msgpack, not a map, missing/mistyped field
    VERSION = "version"  # unknown protocol version
    UNKNOWN_OP = "unknown_op"
    TOO_LARGE = "too_large"  # frame over the daemon's limit
    BAD_REQUEST = "bad_request"  # well formed but invalid (size out of range, ...)
    UNKNOWN_SESSION = "unknown_session"  # say hello first (or again, after a restart)
    FORBIDDEN = "forbidden"  # an operator verb on an engine session
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Request:
    op: ClassVar[str]
    one_way: ClassVar[bool] = False
    id: int
    session: int  # the token hello answered (0 in hello itself)
    epoch: int  # the daemon epoch hello answered (0 in hello itself)

    @property
    def expects_reply(self) -> bool:
        return not self.one_way

    def encode(self) -> bytes:
        body: dict[str, Any] = {"v": VERSION, "op": self.op}
        for f in fields(self):
            body[f.name] = getattr(self, f.name)
        return pack(body)


@dataclass(frozen=True, slots=True)
class HelloRequest(Request):
    op: ClassVar[str] = "hello"
    pid: int
    pid_ns: int
    namespace: str
    client: str
    role: str  # ENGINE or OPERATOR


@dataclass(frozen=True, slots=True)
class LookupRequest(Request):
    op: ClassVar[str] = "lookup"
    keys: bytes


@dataclass(frozen=True, slots=True)
class ReserveRequest(Request):
    op: ClassVar[str] = "reserve"
    keys: bytes
    sizes: list[int]
    parent: bytes | None


@dataclass(frozen=True, slots=True)
class CommitRequest(Request):
    """``reply=False`` makes it one-way: a writer that need not wait pipelines its commit."""

    op: ClassVar[str] = "commit"
    keys: bytes
    checksums: list[int]
    reply: bool

    @property
    def expects_reply(self) -> bool:
        return self.reply


@dataclass(frozen=True, slots=True)
class AbortRequest(Request):
    op: ClassVar[str] = "abort"
    keys: bytes


@dataclass(frozen=True, slots=True)
class GetRequest(Request):
    op: ClassVar[str] = "get"
    keys: bytes
    prefix: bool


@dataclass(frozen=True, slots=True)
class ReleaseRequest(Request):
    op: ClassVar[str] = "release"
    one_way: ClassVar[bool] = True
    keys: bytes


@dataclass(frozen=True, slots=True)
class DeleteRequest(Request):
    op: ClassVar[str] = "delete"
    keys: bytes


@dataclass(frozen=True, slots=True)
class StatsRequest(Request):
    op: ClassVar[str] = "stats"


@dataclass(frozen=True, slots=True)
class HeartbeatRequest(Request):
    op: ClassVar[str] = "heartbeat"


@dataclass(frozen=True, slots=True)
class ByeRequest(Request):
    op: ClassVar[str] = "bye"


@dataclass(frozen=True, slots=True)
class LocateRequest(Request):
    """Longest prefix held locally and, beyond it, by peers (cluster lookup)."""

    op: ClassVar[str] = "locate"
    keys: bytes


@dataclass(frozen=True, slots=True)
class FetchRequest(Request):
    """Bring peers' blocks of a chain into this node; answered once they landed."""

    op: ClassVar[str] = "fetch"
    keys: bytes


@dataclass(frozen=True, slots=True)
class ClusterRequest(Request):
    op: ClassVar[str] = "cluster"
    samples: bool  # include (and reset) the propagation samples, for benchmarks


@dataclass(frozen=True, slots=True)
class EvictRequest(Request):
    op: ClassVar[str] = "evict"
    namespace: str
    key_prefix: str


@dataclass(frozen=True, slots=True)
class FlushRequest(Request):
    op: ClassVar[str] = "flush"


@dataclass(frozen=True, slots=True)
class DrainRequest(Request):
    op: ClassVar[str] = "drain"


# Refused to engine sessions: they drop or move every engine's blocks, or stop the daemon.
OPERATOR_VERBS: tuple[type[Request], ...] = (EvictRequest, FlushRequest, DrainRequest)

_REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        HelloRequest, LookupRequest, ReserveRequest, CommitRequest, AbortRequest, GetRequest,
        ReleaseRequest, DeleteRequest, StatsRequest, HeartbeatRequest, ByeRequest,
        LocateRequest, FetchRequest, ClusterRequest, EvictRequest, FlushRequest, DrainRequest,
    )
}  # fmt: skip


def decode_request(frame: bytes) -> Request:
    """Parse and validate one request frame; raises ``ProtocolError`` naming the problem."""
    body = unpack_map(frame, "request", VERSION)
    op = body.get("op")
    cls = _REQUESTS.get(op) if isinstance(op, str) else None
    if cls is None or not isinstance(op, str):
        raise ProtocolError(
            f"unknown op {op!r}; known ops: {sorted(_REQUESTS)}", ErrorCode.UNKNOWN_OP
        )
    return cls(**decode_fields(cls, body, op))


def encode_reply(request_id: int, **values: Any) -> bytes:
    return wire.encode_reply(VERSION, request_id, **values)


def encode_error(request_id: int, code: ErrorCode, message: str) -> bytes:
    return wire.encode_error(VERSION, request_id, str(code), message)


def decode_reply(frame: bytes) -> dict[str, Any]:
    """Parse a reply frame into its map; the caller checks ``ok`` and its fields."""
    return wire.decode_reply(frame, "reply", VERSION)
