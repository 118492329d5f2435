"""Daemon-to-daemon messages round-trip, and every bad frame is a ProtocolError, nothing else."""

from __future__ import annotations

import contextlib
from typing import Any

import hypothesis.strategies as st
import msgpack
import pytest
from hypothesis import given, settings

from kvcache.cluster import messages as cm
from kvcache.errors import ProtocolError

KEYS = bytes(range(32))  # two keys


def batch(**overrides: Any) -> cm.EventBatch:
    fields: dict[str, Any] = {
        "node": "a",
        "address": "tcp://10.0.0.1:7000",
        "epoch": 1_700_000_000_000_000_000,
        "seq": 3,
        "ts": 12.5,
        "ops": bytes([cm.op_for_tier(0), cm.OP_REMOVED]),
        "keys": KEYS,
    }
    return cm.EventBatch(**{**fields, **overrides})


def heartbeat(**overrides: Any) -> cm.Heartbeat:
    fields: dict[str, Any] = {
        "node": "a",
        "epoch": 7,
        "seq": 3,
        "address": "tcp://10.0.0.1:7000",
        "state": "active",
        "ts": 12.5,
        "interval_s": 1.0,
        "stats": {"tiers": [{"tier": 0, "blocks": 2}], "misses": 1},
    }
    return cm.Heartbeat(**{**fields, **overrides})


def body_of(message: cm.EventBatch | cm.Heartbeat | cm.Request) -> dict[str, Any]:
    decoded: dict[str, Any] = msgpack.unpackb(message.encode())
    return decoded


def packed(body: Any) -> bytes:
    frame: bytes = msgpack.packb(body, use_bin_type=True)
    return frame


REQUESTS = [
    cm.SyncRequest(id=1, stream="a", epoch=7, after_seq=0),
    cm.SyncRequest(id=2, stream="a/gpu0", epoch=2**63, after_seq=1 << 62),
    cm.FetchRequest(id=3, node="b", keys=KEYS),
    cm.FetchRequest(id=4, node="b", keys=b""),
    cm.OfferRequest(id=5, source="c", keys=KEYS),
    cm.StatusRequest(id=6),
    cm.EvictRequest(id=7, namespace="", key_prefix="ab"),
    cm.FlushRequest(id=8),
    cm.DrainRequest(id=9),
]


class TestRoundTrips:
    @pytest.mark.parametrize(
        "message",
        [
            batch(),
            batch(ops=b"", keys=b""),
            batch(ops=bytes([cm.OP_CLEARED]), keys=cm.CLEARED_KEY),
            heartbeat(),
            heartbeat(state="leaving", stats={}),
        ],
    )
    def test_stream_messages(self, message: cm.EventBatch | cm.Heartbeat) -> None:
        assert cm.decode_stream(message.topic, message.encode()) == message
        assert cm.decode_stream(message.topic, memoryview(message.encode())) == message

    def test_each_stream_message_has_its_topic(self) -> None:
        assert (cm.EventBatch.topic, cm.Heartbeat.topic) == (b"shoal.ev", b"shoal.hb")

    def test_an_events_map_embedded_in_a_replay(self) -> None:
        assert cm.decode_batch_map(batch().to_map()) == batch()

    @pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
    def test_requests(self, request_: cm.Request) -> None:
        assert cm.decode_request(request_.encode()) == request_

    def test_every_request_kind_is_covered(self) -> None:
        assert {r.op for r in REQUESTS} == {
            "sync", "fetch", "offer", "status", "evict", "flush", "drain",
        }  # fmt: skip

    def test_replies_carry_ok_and_values_or_a_coded_error(self) -> None:
        assert cm.decode_reply(cm.encode_reply(4, seq=2, keys=KEYS)) == {
            "v": cm.VERSION, "id": 4, "ok": True, "seq": 2, "keys": KEYS,
        }  # fmt: skip
        assert cm.decode_reply(cm.encode_error(4, "malformed", "bad")) == {
            "v": cm.VERSION, "id": 4, "ok": False, "code": "malformed", "error": "bad",
        }  # fmt: skip

    def test_op_codes(self) -> None:
        assert (cm.OP_REMOVED, cm.op_for_tier(0), cm.op_for_tier(2), cm.OP_CLEARED) == (
            0, 1, 3, 255,
        )  # fmt: skip


class TestMalformed:
    def test_ops_and_keys_of_different_lengths_are_refused_even_when_built_locally(self) -> None:
        with pytest.raises(ProtocolError, match="2 ops but 1 keys"):
            batch(keys=KEYS[:16])

    @pytest.mark.parametrize(
        ("topic", "frame", "message"),
        [
            (cm.TOPIC_EVENTS, b"\xc1", "not valid msgpack"),
            (cm.TOPIC_EVENTS, batch().encode()[:-5], "not valid msgpack"),
            (cm.TOPIC_HEARTBEAT, heartbeat().encode() + b"\x00", "not valid msgpack"),
            (cm.TOPIC_EVENTS, packed([1, 2]), "must be a msgpack map"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "v": 1}), "protocol version 1"),
            (cm.TOPIC_EVENTS, packed({k: v for k, v in body_of(batch()).items() if k != "v"}),
             "protocol version None"),
            (b"shoal.xx", batch().encode(), "unknown stream topic"),
            (cm.TOPIC_EVENTS, heartbeat().encode(), "does not match the topic"),
            (cm.TOPIC_HEARTBEAT, batch().encode(), "does not match the topic"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "t": 7}), "type tag 7"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "seq": "3"}), "'seq' must be int"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "seq": -1}), "'seq' must be int"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "epoch": True}), "'epoch' must be int"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "ts": None}), "'ts' must be float"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "ops": "ab"}), "'ops' must be bytes"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "keys": KEYS[:17]}), "multiple of 16"),
            (cm.TOPIC_EVENTS, packed({**body_of(batch()), "keys": KEYS[:16]}), "2 ops but 1 keys"),
            (cm.TOPIC_EVENTS, packed({k: v for k, v in body_of(batch()).items() if k != "node"}),
             "missing field 'node'"),
            (cm.TOPIC_HEARTBEAT, packed({**body_of(heartbeat()), "stats": []}),
             "'stats' must be dict"),
            (cm.TOPIC_HEARTBEAT, packed({**body_of(heartbeat()), "interval_s": "1"}),
             "'interval_s' must be float"),
        ],
    )  # fmt: skip
    def test_stream_frames(self, topic: bytes, frame: bytes, message: str) -> None:
        with pytest.raises(ProtocolError, match=message):
            cm.decode_stream(topic, frame)

    def test_a_wrong_version_is_coded_version(self) -> None:
        with pytest.raises(ProtocolError) as raised:
            cm.decode_request(packed({**body_of(REQUESTS[0]), "v": 0}))
        assert raised.value.code == "version"

    @pytest.mark.parametrize(
        ("frame", "message", "code"),
        [
            (b"", "not valid msgpack", "malformed"),
            (REQUESTS[0].encode()[:-1], "not valid msgpack", "malformed"),
            (packed({"v": cm.VERSION, "id": 1, "op": "nope"}), "unknown cluster op 'nope'", "unknown_op"),
            (packed({"v": cm.VERSION, "id": 1, "op": 3}), "unknown cluster op 3", "unknown_op"),
            (packed({"v": cm.VERSION, "id": 1}), "unknown cluster op None", "unknown_op"),
            (packed({"v": cm.VERSION, "id": 1, "op": "sync", "stream": "a", "epoch": 1}),
             "missing field 'after_seq'", "malformed"),
            (packed({"v": cm.VERSION, "id": 1, "op": "sync", "stream": "a", "epoch": 1, "after_seq": 1.0}),
             "'after_seq' must be int", "malformed"),
            (packed({"v": cm.VERSION, "id": 1, "op": "sync", "epoch": 1, "after_seq": 1}),
             "missing field 'stream'", "malformed"),
            (packed({"v": cm.VERSION, "id": "1", "op": "status"}), "'id' must be int", "malformed"),
            (packed({"v": cm.VERSION, "id": 1, "op": "fetch", "node": "b", "keys": b"x" * 15}),
             "multiple of 16", "malformed"),
            (packed({"v": cm.VERSION, "id": 1, "op": "offer", "source": "c", "keys": "text"}),
             "'keys' must be bytes", "malformed"),
            (packed({"v": cm.VERSION, "id": 1, "op": "evict", "namespace": None, "key_prefix": ""}),
             "'namespace' must be str", "malformed"),
        ],
    )  # fmt: skip
    def test_requests(self, frame: bytes, message: str, code: str) -> None:
        with pytest.raises(ProtocolError, match=message) as raised:
            cm.decode_request(frame)
        assert raised.value.code == code

    @pytest.mark.parametrize(
        ("frame", "message"),
        [
            (b"\x93", "not valid msgpack"),
            (packed({"v": 1, "id": 1, "ok": True}), "protocol version 1"),
            (packed({"v": cm.VERSION, "ok": True}), "'id'"),
            (packed({"v": cm.VERSION, "id": "1", "ok": True}), "'id'"),
            (packed({"v": cm.VERSION, "id": 1}), "'ok'"),
            (packed({"v": cm.VERSION, "id": 1, "ok": 1}), "'ok'"),
        ],
    )
    def test_replies(self, frame: bytes, message: str) -> None:
        with pytest.raises(ProtocolError, match=message):
            cm.decode_reply(frame)

    @pytest.mark.parametrize("body", [[], "map", {"v": 1}, {"node": "a"}])
    def test_an_embedded_batch_that_is_not_an_events_map(self, body: Any) -> None:
        with pytest.raises(ProtocolError):
            cm.decode_batch_map(body)

    @pytest.mark.parametrize("op", [cm.op_for_tier(3), 128, cm.OP_CLEARED - 1])
    def test_an_op_that_names_no_operation(self, op: int) -> None:
        # Applied as a store, "tier + 1" would overflow the member's 2-bit slot in the
        # ClusterIndex and corrupt its neighbour's.
        frame = packed({**body_of(batch()), "ops": bytes([cm.OP_REMOVED, op])})
        with pytest.raises(ProtocolError, match="an op is not"):
            cm.decode_stream(cm.TOPIC_EVENTS, frame)
        with pytest.raises(ProtocolError, match="an op is not"):
            cm.decode_batch_map({**batch().to_map(), "ops": bytes([op, cm.OP_REMOVED])})


# -- anything off the wire: only ProtocolError may escape ----------------------------------

TOPICS = st.sampled_from([cm.TOPIC_EVENTS, cm.TOPIC_HEARTBEAT]) | st.binary(max_size=10)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=40)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
FIELD_NAMES = st.sampled_from(
    ["v", "t", "op", "id", "ok", "node", "address", "epoch", "seq", "ts", "ops", "keys",
     "state", "interval_s", "stats", "after_seq", "source", "namespace", "key_prefix",
     "stream"]
)  # fmt: skip
VALID_FRAMES = st.sampled_from(
    [batch().encode(), heartbeat().encode(), cm.encode_reply(1, seq=1)]
    + [r.encode() for r in REQUESTS]
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid frame with a few bytes overwritten, cut short or extended."""
    frame = bytearray(draw(VALID_FRAMES))
    for _ in range(draw(st.integers(1, 3))):
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(frame)))
    return bytes(frame[:cut]) + draw(st.binary(max_size=4))


@st.composite
def plausible_maps(draw: st.DrawFn) -> bytes:
    """A msgpack map that is often nearly right: version 1, real field names, wild values."""
    body = draw(st.dictionaries(FIELD_NAMES, VALUES, max_size=10))
    if draw(st.booleans()):
        body["v"] = 1
    if draw(st.booleans()):
        body["t"] = draw(st.sampled_from(["events", "heartbeat", "sync"]))
    if draw(st.booleans()):
        body["op"] = draw(st.sampled_from(sorted({r.op for r in REQUESTS})))
    return packed(body)


FRAMES = st.binary(max_size=64) | mutated() | plausible_maps()


@settings(max_examples=400, deadline=None)
@given(topic=TOPICS, frame=FRAMES)
def test_only_protocol_errors_escape_the_decoders(topic: bytes, frame: bytes) -> None:
    for decode in (
        lambda: cm.decode_stream(topic, frame),
        lambda: cm.decode_request(frame),
        lambda: cm.decode_reply(frame),
        lambda: cm.decode_stream(topic, memoryview(frame)),
    ):
        with contextlib.suppress(ProtocolError):
            decode()
