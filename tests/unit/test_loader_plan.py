"""Safetensors header validation, index parsing, tensor-parallel slicing, read ordering and
the rate limiter (pure: headers are built in memory)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from loader.errors import AccessDenied, CheckpointError, LoaderError
from loader.plan import (
    MAX_HEADER_BYTES,
    TensorSlice,
    parse_header,
    parse_index,
    plan_tensors,
    tp_slice_rule,
)
from loader.sources.base import check_relative_path
from loader.stream import RateLimiter, order_plans


def blob(header: dict[str, object], data_bytes: int, pad: int = 0) -> bytes:
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + bytes(data_bytes)


def parse(data: bytes, path: str = "m.safetensors") -> object:
    return parse_header(path, len(data), lambda offset, length: data[offset : offset + length])


GOOD = {
    "a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
    "b": {"dtype": "F32", "shape": [4], "data_offsets": [12, 28]},
    "__metadata__": {"format": "pt"},
}


def test_a_valid_header_gives_absolute_offsets_in_file_order() -> None:
    data = blob(GOOD, 28, pad=5)
    header = parse(data)
    start = len(data) - 28
    assert header.data_start == start  # type: ignore[attr-defined]
    assert [(t.name, t.begin, t.end) for t in header.tensors] == [  # type: ignore[attr-defined]
        ("a", start, start + 12),
        ("b", start + 12, start + 28),
    ]
    assert header.metadata == {"format": "pt"}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01\x00", "too short"),
        (struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "exceeds"),
        (struct.pack("<Q", 1000) + b"{}", "truncated"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (
            blob({"t": {"dtype": "F12", "shape": [1], "data_offsets": [0, 2]}}, 2),
            "tensor 't': unknown dtype",
        ),
        (
            blob({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4),
            "not a list of non-negative",
        ),
        (
            blob({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8),
            "is not \\[begin, end\\]",
        ),
        (
            blob({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, 8),
            "outside the 8 data bytes",
        ),
        (blob({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8), "needs 12 bytes"),
        (blob({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}}, 8), "outside"),
        (
            blob(
                {
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                12,
            ),
            "'x' and 'y' overlap",
        ),
        (blob({"t": "F32"}, 0), "not an object"),
        (
            blob(
                {"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": []}, 4
            ),
            "__metadata__",
        ),
    ],
)
def test_malformed_files_are_rejected_naming_the_file_and_tensor(data: bytes, message: str) -> None:
    with pytest.raises(CheckpointError, match=f"m.safetensors: .*{message}"):
        parse(data)


def test_the_index_maps_tensors_to_plain_shard_names() -> None:
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    assert parse_index(json.dumps(index).encode()) == index["weight_map"]
    with pytest.raises(CheckpointError, match="must be a file name"):
        parse_index(json.dumps({"weight_map": {"a": "../etc/passwd"}}).encode())
    with pytest.raises(CheckpointError, match="weight_map"):
        parse_index(b'{"weight_map": [1]}')


def test_object_paths_cannot_leave_the_root() -> None:
    assert check_relative_path("shard-1.safetensors") == "shard-1.safetensors"
    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a\\b", "a/./b", "x\x00y", "a//b"):
        with pytest.raises(AccessDenied):
            check_relative_path(bad)


def test_the_index_and_the_headers_must_agree() -> None:
    header = parse(blob(GOOD, 28))
    with pytest.raises(CheckpointError, match="missing"):
        plan_tensors([header], {"a": "m.safetensors", "zz": "m.safetensors"})  # type: ignore[list-item]
    with pytest.raises(CheckpointError, match="not loaded"):
        plan_tensors([header], {"a": "other.safetensors"})  # type: ignore[list-item]
    plans = plan_tensors([header], {"a": "m.safetensors"})  # type: ignore[list-item]
    assert [p.name for p in plans] == ["a"]  # b is not in the index


def test_tensor_parallel_slices_read_only_the_ranks_rows_or_columns() -> None:
    header = parse(blob({"w": {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]}}, 96))
    start = header.tensors[0].begin  # type: ignore[attr-defined]
    rows = plan_tensors([header], slice_for=lambda n, s: TensorSlice(0, 1, 2))[0]  # type: ignore[list-item]
    assert rows.shape == (2, 6) and rows.ranges == ((start + 48, 48),)
    cols = plan_tensors([header], slice_for=lambda n, s: TensorSlice(-1, 2, 3))[0]  # type: ignore[list-item]
    assert cols.shape == (4, 2)
    assert cols.ranges == tuple((start + 16 + 24 * r, 8) for r in range(4))
    with pytest.raises(CheckpointError, match="does not split"):
        plan_tensors([header], slice_for=lambda n, s: TensorSlice(0, 0, 3))  # type: ignore[list-item]


def test_the_llama_rules_slice_projections_and_keep_norms_whole() -> None:
    rule = tp_slice_rule(1, 2)
    assert rule("model.layers.0.self_attn.q_proj.weight", (8, 8)) == TensorSlice(0, 1, 2)
    assert rule("model.layers.0.mlp.down_proj.weight", (8, 8)) == TensorSlice(-1, 1, 2)
    assert rule("model.layers.0.input_layernorm.weight", (8,)) is None
    assert tp_slice_rule(0, 1)("model.embed_tokens.weight", (8, 8)) is None
    with pytest.raises(ValueError, match="tp rank"):
        tp_slice_rule(2, 2)


def test_layer_order_puts_embeddings_first_and_the_head_last() -> None:
    names = ["lm_head.weight", "model.layers.1.w", "model.norm.weight", "model.layers.0.w",
             "model.embed_tokens.weight", "model.layers.10.w"]  # fmt: skip
    header = parse(
        blob(
            {
                n: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]}
                for i, n in enumerate(names)
            },
            6,
        )
    )
    plans = plan_tensors([header])  # type: ignore[list-item]
    ordered = [p.name for p in order_plans(plans, "layers")]
    assert ordered == ["model.embed_tokens.weight", "model.layers.0.w", "model.layers.1.w",
                       "model.layers.10.w", "lm_head.weight", "model.norm.weight"]  # fmt: skip
    first = [
        p.name for p in order_plans(plans, "priority", ["model.norm.weight", "lm_head.weight"])
    ]
    assert first[:2] == ["model.norm.weight", "lm_head.weight"]
    with pytest.raises(LoaderError, match="lacks"):
        order_plans(plans, "priority", ["nope"])


def test_the_rate_limiter_spaces_reads_to_the_average_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(100.0, clock=lambda: now[0], sleep=sleep)
    limiter.acquire(100)  # the one-second burst
    assert slept == []
    limiter.acquire(50)
    assert slept == [pytest.approx(0.5)]
    now[0] += 10  # idle time refills only up to the burst
    limiter.acquire(200)
    assert slept[-1] == pytest.approx(1.0)


def test_every_dtype_has_the_itemsize_its_byte_count_implies() -> None:
    from loader.plan import DTYPES

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
    for name, dtype in DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == sizes[name]
