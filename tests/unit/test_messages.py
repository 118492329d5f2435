"""Wire messages round-trip, and every malformed frame is a specific ProtocolError."""

from __future__ import annotations

import msgpack
import pytest

from kvcache import messages as m
from kvcache.errors import ProtocolError

KEYS = b"k" * 32


@pytest.mark.parametrize(
    "request_",
    [
        m.HelloRequest(
            id=1,
            session=0,
            epoch=0,
            pid=42,
            pid_ns=7,
            namespace="ns",
            client="engine",
            role="engine",
        ),
        m.LookupRequest(id=2, session=3, epoch=5, keys=KEYS),
        m.ReserveRequest(id=3, session=3, epoch=5, keys=KEYS, sizes=[4096, 4096], parent=b"p" * 16),
        m.ReserveRequest(id=3, session=3, epoch=5, keys=KEYS, sizes=[4096, 4096], parent=None),
        m.CommitRequest(id=4, session=3, epoch=5, keys=KEYS, checksums=[1, 2**64 - 1], reply=True),
        m.CommitRequest(id=4, session=3, epoch=5, keys=KEYS, checksums=[1, 2], reply=False),
        m.GetRequest(id=5, session=3, epoch=5, keys=KEYS, prefix=True),
        m.ReleaseRequest(id=6, session=3, epoch=5, keys=KEYS),
        m.StatsRequest(id=7, session=3, epoch=5),
    ],
)
def test_requests_round_trip(request_: m.Request) -> None:
    assert m.decode_request(request_.encode()) == request_


def test_release_and_a_no_reply_commit_are_one_way() -> None:
    assert not m.ReleaseRequest(id=1, session=1, epoch=5, keys=KEYS).expects_reply
    assert not m.CommitRequest(
        id=1, session=1, epoch=5, keys=KEYS, checksums=[1, 2], reply=False
    ).expects_reply
    assert m.CommitRequest(
        id=1, session=1, epoch=5, keys=KEYS, checksums=[1, 2], reply=True
    ).expects_reply
    assert m.GetRequest(id=1, session=1, epoch=5, keys=KEYS, prefix=True).expects_reply


def frame(**body: object) -> bytes:
    return msgpack.packb({"v": m.VERSION, "id": 9, "session": 1, "epoch": 1, **body})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb("hello"), "must be a msgpack map"),
        (msgpack.packb({"v": 1, "op": "lookup"}), "protocol version 1; expected 2"),
        (frame(op="nope"), "unknown op"),
        (frame(op="lookup"), "missing field 'keys'"),
        (frame(op="lookup", keys="text"), "'keys' must be bytes"),
        (frame(op="lookup", keys=b"x" * 15), "multiple of 16"),
        (frame(op="reserve", keys=KEYS, sizes=[1, -1], parent=None), "'sizes' must be list"),
        (frame(op="reserve", keys=KEYS, sizes=[1, True], parent=None), "'sizes' must be list"),
        (frame(op="reserve", keys=KEYS, sizes=[1, 1.0], parent=None), "'sizes' must be list"),
        (frame(op="reserve", keys=KEYS, sizes=[1, "1"], parent=None), "'sizes' must be list"),
        (frame(op="reserve", keys=KEYS, sizes=[1, 1], parent=b"short"), "'parent'"),
        (frame(op="get", keys=KEYS, prefix=1), "'prefix' must be bool"),
        (frame(op="stats", session=-1), "'session'"),
        (frame(op="stats", epoch=None), "'epoch'"),
    ],
)
def test_malformed_requests_name_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        m.decode_request(raw)


def test_replies_carry_ok_or_a_coded_error() -> None:
    assert m.decode_reply(m.encode_reply(5, length=3)) == {
        "v": m.VERSION,
        "id": 5,
        "ok": True,
        "length": 3,
    }
    error = m.decode_reply(m.encode_error(5, m.ErrorCode.TOO_LARGE, "big"))
    assert (error["ok"], error["code"], error["error"]) == (False, "too_large", "big")
    with pytest.raises(ProtocolError, match="'ok'"):
        m.decode_reply(msgpack.packb({"v": m.VERSION, "id": 1}))


def test_the_id_of_a_broken_request_is_recovered_when_possible() -> None:
    assert m.peek_id(frame(op="nope")) == 9
    assert m.peek_id(b"\xc1") == 0
