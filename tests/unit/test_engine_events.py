"""vLLM KV-event payloads in both encodings, and the sequence bookkeeping of one stream.

The current (tagged-map) form is produced by vLLM's own classes and encoder; the older
positional form by array_like copies of the structs as vLLM defined them before 0.33.
"""

from __future__ import annotations

import contextlib

import msgpack
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.cluster.engine_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EngineSequence,
    Reset,
    Step,
    decode_batch,
    decode_seq,
)
from kvcache.errors import ProtocolError

try:  # the current encoding is made by vLLM's own classes; the rest needs no vLLM
    from vllm.distributed import kv_events
except ImportError:  # pragma: no cover - CI installs vLLM (scripts/setup-vllm)
    kv_events = None

needs_vllm = pytest.mark.skipif(kv_events is None, reason="vLLM is not installed")

ENCODER = msgspec.msgpack.Encoder()
HASH_A = bytes(range(32))  # vLLM's default: a sha256 digest
HASH_B = bytes(range(1, 33))


# -- the older positional form (vLLM < 0.33): array_like tagged structs ----------------


class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, tag=True):  # type: ignore[call-arg]
    pass


class OldBlockStored(OldEvent, tag="BlockStored"):  # type: ignore[call-arg]
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class OldBlockRemoved(OldEvent, tag="BlockRemoved"):  # type: ignore[call-arg]
    block_hashes: list[int | bytes]
    medium: str | None = None


class OldAllBlocksCleared(OldEvent, tag="AllBlocksCleared"):  # type: ignore[call-arg]
    pass


class OldBatch(msgspec.Struct, array_like=True, omit_defaults=True):  # type: ignore[call-arg]
    ts: float
    events: list[OldBlockStored | OldBlockRemoved | OldAllBlocksCleared]


def stored(**overrides: object) -> object:
    values: dict[str, object] = {
        "block_hashes": [HASH_A, HASH_B],
        "parent_block_hash": None,
        "token_ids": list(range(32)),
        "block_size": 16,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        **overrides,
    }
    return kv_events.BlockStored(**values)


@needs_vllm
class TestCurrentEncoding:
    def test_a_batch_of_every_event_kind_decodes_to_typed_events(self) -> None:
        batch = kv_events.KVEventBatch(
            ts=12.5,
            events=[
                stored(group_idx=0),
                kv_events.BlockRemoved(block_hashes=[HASH_B], medium="GPU"),
                kv_events.AllBlocksCleared(),
            ],
            data_parallel_rank=1,
        )
        decoded = decode_batch(ENCODER.encode(batch))
        assert decoded.ts == 12.5 and decoded.data_parallel_rank == 1
        first, second, third = decoded.events
        assert first == BlockStored(
            block_hashes=[HASH_A, HASH_B],
            parent_block_hash=None,
            token_ids=list(range(32)),
            block_size=16,
            lora=False,
            medium="GPU",
            extra_keyed=(),
            group_idx=0,
        )
        assert second == BlockRemoved([HASH_B], "GPU", None)
        assert third == AllBlocksCleared()

    def test_int_hashes_lora_and_extra_keys_are_carried(self) -> None:
        event = stored(
            block_hashes=[7, 8],
            parent_block_hash=6,
            lora_id=3,
            lora_name="adapter",
            extra_keys=[("salt",), None],
        )
        batch = kv_events.KVEventBatch(ts=0.0, events=[event])
        (decoded,) = decode_batch(ENCODER.encode(batch)).events
        assert isinstance(decoded, BlockStored)
        assert decoded.block_hashes == [7, 8] and decoded.parent_block_hash == 6
        assert decoded.lora and decoded.extra_keyed == (True, False)

    def test_fields_vllm_adds_later_are_ignored(self) -> None:
        event = stored(session_id="s1", locality="LOCAL", lookahead_token_ids=[[1], [2]])
        batch = kv_events.KVEventBatch(ts=0.0, events=[event])
        (decoded,) = decode_batch(ENCODER.encode(batch)).events
        assert isinstance(decoded, BlockStored) and decoded.block_hashes == [HASH_A, HASH_B]


class TestPositionalEncoding:
    def test_the_old_array_form_decodes_to_the_same_events(self) -> None:
        batch = OldBatch(
            ts=3.0,
            events=[
                OldBlockStored([1, 2], None, list(range(32)), 16, None, "GPU"),
                OldBlockRemoved([2]),
                OldAllBlocksCleared(),
            ],
        )
        raw = ENCODER.encode(batch)
        assert msgpack.unpackb(raw)[1][1][:2] == ["BlockRemoved", [2]], "a tagged array"
        decoded = decode_batch(raw)
        assert decoded.data_parallel_rank is None
        first, second, third = decoded.events
        assert isinstance(first, BlockStored)
        assert (first.block_hashes, first.parent_block_hash, first.block_size) == ([1, 2], None, 16)
        assert first.medium == "GPU" and not first.lora and first.group_idx is None
        assert second == BlockRemoved([2], None, None)
        assert third == AllBlocksCleared()

    def test_an_old_event_without_medium_is_read_as_unspecified(self) -> None:
        raw = msgpack.packb([1.0, [["BlockStored", [5], None, [1, 2], 2, None]]])
        (event,) = decode_batch(raw).events
        assert isinstance(event, BlockStored) and event.medium is None


class TestMalformed:
    @pytest.mark.parametrize(
        ("payload", "message", "code"),
        [
            (b"\xc1", "not valid msgpack", "malformed"),
            (msgpack.packb({"ts": 1}), "must be an array", "malformed"),
            (msgpack.packb([1.0]), "must be an array", "malformed"),
            (msgpack.packb(["x", []]), "numeric ts", "malformed"),
            (msgpack.packb([1.0, [["Pinned", [1]]]]), "unknown vLLM event type", "unknown_event"),
            (msgpack.packb([1.0, [{"type": "Nope"}]]), "unknown vLLM event type", "unknown_event"),
            (msgpack.packb([1.0, [7]]), "tagged map or array", "malformed"),
            (msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1]}]]), "lacks",
             "malformed"),
            (msgpack.packb([1.0, [["BlockStored", [1.5], None, [1], 1]]]), "block_hashes",
             "malformed"),
            (msgpack.packb([1.0, [["BlockStored", [1], None, [-1], 1]]]), "token_ids",
             "malformed"),
            (msgpack.packb([1.0, [["BlockStored", [1], None, [1], 0]]]), "block_size",
             "malformed"),
            (msgpack.packb([1.0, [["BlockStored", [1], "p", [1], 1]]]), "parent_block_hash",
             "malformed"),
            (msgpack.packb([1.0, [["BlockRemoved", [1], 5]]]), "medium", "malformed"),
            (msgpack.packb([1.0, [["BlockRemoved", [True]]]]), "block_hashes", "malformed"),
            (msgpack.packb([1.0, [["BlockRemoved", [b""]]]]), "block_hashes", "malformed"),
        ],
    )  # fmt: skip
    def test_is_rejected_with_a_specific_error(
        self, payload: bytes, message: str, code: str
    ) -> None:
        with pytest.raises(ProtocolError, match=message) as info:
            decode_batch(payload)
        assert info.value.code == code

    def test_one_bad_event_rejects_the_whole_batch(self) -> None:
        good = ["BlockRemoved", [1]]
        with pytest.raises(ProtocolError):
            decode_batch(msgpack.packb([1.0, [good, ["BlockRemoved", "x"], good]]))

    @pytest.mark.parametrize("frame", [b"", b"\x00" * 7, b"\x00" * 9])
    def test_a_seq_frame_must_be_eight_bytes(self, frame: bytes) -> None:
        with pytest.raises(ProtocolError, match="8 bytes"):
            decode_seq(frame)

    @settings(max_examples=300, deadline=None)
    @given(payload=st.binary(max_size=64))
    def test_fuzzed_bytes_decode_or_raise_protocol_error(self, payload: bytes) -> None:
        with contextlib.suppress(ProtocolError):
            decode_batch(payload)

    @settings(max_examples=300, deadline=None)
    @given(
        events=st.lists(
            st.one_of(
                st.lists(
                    st.one_of(
                        st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"]),
                        st.none(), st.integers(-2, 2**64 - 1), st.binary(max_size=40),
                        st.lists(st.integers(-1, 3), max_size=3), st.text(max_size=3),
                    ),
                    max_size=7,
                ),
                st.dictionaries(
                    st.sampled_from(["type", "block_hashes", "parent_block_hash", "token_ids",
                                     "block_size", "medium", "lora_id", "extra_keys"]),
                    st.one_of(st.none(), st.integers(-1, 5), st.text(max_size=12),
                              st.lists(st.integers(0, 5), max_size=3)),
                ),
            ),
            max_size=4,
        )
    )  # fmt: skip
    def test_fuzzed_structures_decode_or_raise_protocol_error(self, events: list[object]) -> None:
        try:
            batch = decode_batch(msgpack.packb([1.0, events]))
        except ProtocolError:
            return
        for event in batch.events:
            assert isinstance(event, BlockStored | BlockRemoved | AllBlocksCleared)


# -- sequencing -------------------------------------------------------------------------


def b(seq: int) -> bytes:
    return f"batch {seq}".encode()


def applied(*seqs: int) -> tuple[tuple[int, bytes], ...]:
    return tuple((s, b(s)) for s in seqs)


class TestSequence:
    def test_batches_in_order_are_applied_one_by_one(self) -> None:
        sequence = EngineSequence(can_replay=True)
        assert sequence.on_batch(0, b(0), now=0) == Step(batches=applied(0))
        assert sequence.on_batch(1, b(1), now=0) == Step(batches=applied(1))
        assert sequence.last == 1

    def test_a_gap_asks_a_replay_and_buffers_live_batches_until_it_ends(self) -> None:
        sequence = EngineSequence(can_replay=True)
        sequence.on_batch(0, b(0), now=0)
        assert sequence.on_batch(3, b(3), now=0) == Step(replay_from=1)
        assert sequence.on_batch(4, b(4), now=0) == Step()
        for seq in (1, 2, 3):
            sequence.on_replayed(seq, b(seq))
        assert sequence.on_replay_end() == Step(batches=applied(1, 2, 3, 4))
        assert sequence.num_gaps == 1 and not sequence.replaying and sequence.last == 4

    def test_a_replay_that_comes_back_short_is_a_hole_and_resets(self) -> None:
        sequence = EngineSequence(can_replay=True)
        sequence.on_batch(0, b(0), now=0)
        sequence.on_batch(5, b(5), now=0)
        sequence.on_replayed(3, b(3))  # 1 and 2 no longer kept by the publisher
        sequence.on_replayed(4, b(4))
        assert sequence.on_replay_end() == Step(Reset.HOLE, applied(3, 4, 5))

    def test_a_replay_that_never_ends_times_out_into_a_hole(self) -> None:
        sequence = EngineSequence(can_replay=True, replay_timeout_s=2.0)
        sequence.on_batch(0, b(0), now=0)
        sequence.on_batch(2, b(2), now=10)
        assert sequence.expire(now=11) is None
        assert sequence.expire(now=12) == Step(Reset.HOLE, applied(2))
        assert sequence.expire(now=13) is None

    def test_without_replay_a_gap_resets_and_continues_from_the_new_batch(self) -> None:
        sequence = EngineSequence(can_replay=False)
        sequence.on_batch(0, b(0), now=0)
        assert sequence.on_batch(2, b(2), now=0) == Step(Reset.HOLE, applied(2))

    def test_joining_late_replays_everything_the_publisher_kept(self) -> None:
        sequence = EngineSequence(can_replay=True)
        assert sequence.on_batch(7, b(7), now=0) == Step(replay_from=0)
        for seq in (4, 5, 6, 7):  # the publisher's buffer starts at 4: that is where we start
            sequence.on_replayed(seq, b(seq))
        assert sequence.on_replay_end() == Step(batches=applied(4, 5, 6, 7))

    def test_joining_late_without_replay_starts_at_the_first_batch_heard(self) -> None:
        sequence = EngineSequence(can_replay=False)
        assert sequence.on_batch(7, b(7), now=0) == Step(batches=applied(7))

    def test_seq_going_back_is_a_restarted_publisher(self) -> None:
        sequence = EngineSequence(can_replay=True)
        for seq in range(4):
            sequence.on_batch(seq, b(seq), now=0)
        assert sequence.on_batch(0, b(0), now=0) == Step(Reset.RESTART, applied(0))
        assert sequence.on_batch(2, b(2), now=0) == Step(replay_from=1)

    def test_a_restart_heard_mid_stream_replays_the_new_publisher_from_zero(self) -> None:
        sequence = EngineSequence(can_replay=True)
        for seq in range(6):
            sequence.on_batch(seq, b(seq), now=0)
        assert sequence.on_batch(2, b(2), now=0) == Step(Reset.RESTART, replay_from=0)

    def test_a_disconnect_resets_once_and_starts_over(self) -> None:
        sequence = EngineSequence(can_replay=True)
        assert sequence.on_disconnect() == Step(), "nothing known: nothing to reset"
        sequence.on_batch(0, b(0), now=0)
        assert sequence.on_disconnect() == Step(Reset.DISCONNECT)
        assert sequence.last is None
        assert sequence.on_batch(0, b(0), now=0) == Step(batches=applied(0))

    def test_replayed_batches_after_the_replay_ended_are_ignored(self) -> None:
        sequence = EngineSequence(can_replay=True)
        sequence.on_batch(0, b(0), now=0)
        sequence.on_replayed(1, b(1))
        assert sequence.on_replay_end() == Step()
        assert sequence.on_batch(1, b(1), now=0) == Step(batches=applied(1))

    def test_a_buffer_overflow_during_replay_ends_it(self) -> None:
        sequence = EngineSequence(can_replay=True, max_buffered=2)
        sequence.on_batch(0, b(0), now=0)
        sequence.on_batch(2, b(2), now=0)
        sequence.on_batch(3, b(3), now=0)
        assert sequence.on_batch(4, b(4), now=0) == Step(Reset.HOLE, applied(2, 3, 4))
        assert not sequence.replaying
