"""The simulator's KV-event payloads decode with Shoal's decoder and with vLLM's own
msgspec classes, field for field."""

from __future__ import annotations

import msgpack
import pytest

from kvcache.cluster.engine_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    decode_batch,
)
from shoal.errors import ConfigError
from sim.blocks import AllCleared, Removed, Stored, block_hash, external_hash
from sim.events import encode_batch, parse_kv_events_config

H0 = block_hash(None, list(range(16)), None)
H1 = block_hash(H0, list(range(16, 32)), None)
STORED = Stored((H0, H1), None, tuple(range(32)), 16, None, None)
LORA = Stored((H1,), H0, tuple(range(16, 32)), 16, 3, "ad")


def test_shoals_decoder_reads_every_event_kind() -> None:
    batch = decode_batch(encode_batch([STORED, LORA, Removed((H1,)), AllCleared()], 12.5))
    assert batch.ts == 12.5 and batch.data_parallel_rank == 0
    stored, lora, removed, cleared = batch.events
    assert isinstance(stored, BlockStored)
    assert stored.block_hashes == [external_hash(H0), external_hash(H1)]
    assert stored.parent_block_hash is None and stored.token_ids == list(range(32))
    assert (stored.block_size, stored.lora, stored.medium, stored.group_idx) == (
        16,
        False,
        "GPU",
        0,
    )
    assert isinstance(lora, BlockStored) and lora.lora and lora.extra_keyed == (True,)
    assert lora.parent_block_hash == external_hash(H0)
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == [external_hash(H1)]
    assert isinstance(cleared, AllBlocksCleared)


def test_the_payload_is_msgspecs_encoding_of_vllms_structs() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    msgspec = pytest.importorskip("msgspec")
    ours = encode_batch([STORED, LORA, Removed((H1,)), AllCleared()], 12.5)
    theirs = kv.KVEventBatch(
        ts=12.5,
        events=[
            kv.BlockStored(
                block_hashes=[external_hash(H0), external_hash(H1)],
                parent_block_hash=None,
                token_ids=list(range(32)),
                block_size=16,
                lora_id=None,
                medium="GPU",
                lora_name=None,
                group_idx=0,
            ),
            kv.BlockStored(
                block_hashes=[external_hash(H1)],
                parent_block_hash=external_hash(H0),
                token_ids=list(range(16, 32)),
                block_size=16,
                lora_id=3,
                medium="GPU",
                lora_name="ad",
                extra_keys=[("ad",)],
                group_idx=0,
            ),
            kv.BlockRemoved(block_hashes=[external_hash(H1)], medium="GPU", group_idx=0),
            kv.AllBlocksCleared(),
        ],
        data_parallel_rank=0,
    )
    vllm_bytes = msgspec.msgpack.Encoder().encode(theirs)
    assert msgpack.unpackb(ours) == msgpack.unpackb(vllm_bytes)
    decoded = msgspec.msgpack.Decoder(kv.KVEventBatch).decode(ours)
    assert decoded.events[1].lora_name == "ad" and decoded.events[0].block_size == 16


def test_the_config_flag_takes_vllms_json() -> None:
    config = parse_kv_events_config(
        '{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557",'
        ' "replay_endpoint": "tcp://*:5558", "topic": "kv"}'
    )
    assert config.publisher == "zmq" and config.replay_endpoint == "tcp://*:5558"
    assert parse_kv_events_config('{"enable_kv_cache_events": true}').publisher == "zmq"
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_kv_events_config('{"enable_kv_cache_event": true}')
    with pytest.raises(ConfigError, match="publisher"):
        parse_kv_events_config('{"enable_kv_cache_events": true, "publisher": "nats"}')
