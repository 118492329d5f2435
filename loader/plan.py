"""Checkpoint plans: which byte ranges of which files become which tensors.

A safetensors file is::

    0        8                      8 + N                                     size
    ┌────────┬──────────────────────┬──────────────────────────────────────────┐
    │ N (u64 │ JSON header, N bytes │ data: tensor bytes at data_offsets[0..1) │
    │  LE)   │ (space-padded)       │ relative to 8 + N, row-major, LE         │
    └────────┴──────────────────────┴──────────────────────────────────────────┘

Only the first 8 bytes and then the header are read to plan a load (two small reads per
file, issued for all shards concurrently by the caller). Validation, each failure naming the
file and, where it applies, the tensor:

1. the file holds at least the 8-byte length and the header; the header length is at most
   ``MAX_HEADER_BYTES`` (100 MiB: real headers are kilobytes; a huge value is corruption or
   an attack, and would otherwise be allocated);
2. the header is a JSON object; every entry but ``__metadata__`` has a known ``dtype``, a
   ``shape`` of non-negative ints and ``data_offsets`` [begin, end] with
   ``0 <= begin <= end <= data size``;
3. ``end - begin`` equals ``prod(shape) * itemsize``;
4. no two tensors overlap (holes are allowed, as the format does not forbid them).

A sharded checkpoint adds ``model.safetensors.index.json`` (``weight_map``: tensor → file);
every tensor it names must be in that file's header, and every shard must be a plain file
name (no path: ``check_relative_path``).

Tensor-parallel slicing (``TensorSlice``): rank r of n reads only its part of a tensor split
along dimension 0 (one contiguous range) or along the last dimension (one range per row,
which the streamer coalesces into large reads when rows are short).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loader.errors import CheckpointError
from loader.sources.base import check_relative_path

if TYPE_CHECKING:
    import torch

__all__ = [
    "DTYPES",  # noqa: F822 (module __getattr__: built on first use)
    "INDEX_FILE",
    "ITEMSIZES",
    "MAX_HEADER_BYTES",
    "MAX_TENSOR_BYTES",
    "FileHeader",
    "TensorPlan",
    "TensorSlice",
    "parse_header",
    "parse_index",
    "plan_tensors",
    "tp_slice_rule",
]

from loader.sources.base import INDEX_FILE  # one definition (m11), beside the sources

MAX_HEADER_BYTES = 100 << 20
# The largest tensor a header may declare (m18): the biggest real ones (a 256k-vocabulary
# embedding) are a few GiB; a header from an untrusted source claiming more is refused
# before the streamer allocates it, whatever the file size the source reports.
MAX_TENSOR_BYTES = 64 << 30

# Bytes per element of each safetensors dtype: sizes are checked without torch, which is
# imported only where dtype objects are made (``DTYPES``, planning a tensor).
ITEMSIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@functools.cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "U16": torch.uint16,
        "U32": torch.uint32,
        "U64": torch.uint64,
        "BOOL": torch.bool,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


def __getattr__(name: str) -> Any:
    """``DTYPES`` (safetensors name → torch dtype) is built, importing torch, on first use."""
    if name == "DTYPES":
        return _torch_dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    end: int  # absolute, exclusive

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class FileHeader:
    path: str
    size: int
    data_start: int  # 8 + N
    tensors: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class TensorSlice:
    """Rank ``rank`` of ``size`` along ``dim`` (0 or the last dimension)."""

    dim: int
    rank: int
    size: int


@dataclass(frozen=True, slots=True)
class TensorPlan:
    """One output tensor: its shape and dtype, and the file byte ranges that fill it, in
    the order their bytes appear in the output (row-major)."""

    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # of the output (after slicing)
    ranges: tuple[tuple[int, int], ...]  # (file offset, length), concatenated in order

    @property
    def nbytes(self) -> int:
        return sum(length for _, length in self.ranges)


def parse_header(path: str, size: int, read: Callable[[int, int], bytes]) -> FileHeader:
    """Validate and parse one file's header. ``read(offset, length)`` fetches bytes."""
    if size < 8:
        raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", read(0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(
            f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES} (corrupt file?)"
        )
    data_start = 8 + header_len
    if data_start > size:
        raise CheckpointError(
            f"{path}: truncated: the header needs {data_start} bytes, the file has {size}"
        )
    raw = read(8, header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: __metadata__ is not an object")
    data_size = size - data_start
    entries = [_entry(path, name, spec, data_start, data_size) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    for before, after in itertools.pairwise(entries):
        if after.begin < before.end:
            raise CheckpointError(
                f"{path}: tensors {before.name!r} and {after.name!r} overlap "
                f"([{before.begin}, {before.end}) and [{after.begin}, {after.end}))"
            )
    return FileHeader(
        path, size, data_start, tuple(entries), {str(k): str(v) for k, v in metadata.items()}
    )


def _entry(path: str, name: str, spec: object, data_start: int, data_size: int) -> TensorEntry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise CheckpointError(f"{where}: its entry is not an object")
    dtype_name = spec.get("dtype")
    if dtype_name not in ITEMSIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype_name!r}")
    dtype = _torch_dtypes()[str(dtype_name)]
    shape = spec.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative ints")
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] outside the {data_size} data bytes"
        )
    itemsize = ITEMSIZES[str(dtype_name)]
    expected = math.prod(shape) * itemsize
    if expected > MAX_TENSOR_BYTES:
        raise CheckpointError(
            f"{where}: shape {shape} of {dtype_name} is {expected} bytes, over the "
            f"{MAX_TENSOR_BYTES}-byte bound on one tensor (corrupt or hostile header?)"
        )
    if end - begin != expected:
        raise CheckpointError(
            f"{where}: shape {shape} of {dtype_name} needs {expected} bytes, "
            f"data_offsets give {end - begin}"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)


def parse_index(raw: bytes) -> dict[str, str]:
    """``weight_map`` of a ``model.safetensors.index.json``: tensor name → shard file."""
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{INDEX_FILE}: not JSON: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{INDEX_FILE}: weight_map must map tensor names to file names")
    for shard in set(weight_map.values()):
        if "/" in shard:
            raise CheckpointError(f"{INDEX_FILE}: shard {shard!r} must be a file name")
        check_relative_path(shard)
    return dict(weight_map)


def plan_tensors(
    headers: Sequence[FileHeader],
    weight_map: dict[str, str] | None = None,
    slice_for: Callable[[str, tuple[int, ...]], TensorSlice | None] | None = None,
) -> list[TensorPlan]:
    """The tensors of a checkpoint, in file order, sliced where ``slice_for`` says so."""
    by_path = {h.path: h for h in headers}
    if weight_map is not None:
        for name, shard in weight_map.items():
            header = by_path.get(shard)
            if header is None:
                raise CheckpointError(f"{INDEX_FILE}: tensor {name!r} is in {shard}, not loaded")
            if not any(t.name == name for t in header.tensors):
                raise CheckpointError(f"{shard}: tensor {name!r} named by the index is missing")
    plans: list[TensorPlan] = []
    seen: dict[str, str] = {}
    for header in headers:
        for entry in header.tensors:
            if weight_map is not None and weight_map.get(entry.name) != header.path:
                continue  # the index assigns this name to another shard
            if entry.name in seen:
                raise CheckpointError(
                    f"tensor {entry.name!r} appears in both {seen[entry.name]} and {header.path}"
                )
            seen[entry.name] = header.path
            spec = slice_for(entry.name, entry.shape) if slice_for else None
            plans.append(_sliced(header.path, entry, spec))
    return plans


def _sliced(path: str, entry: TensorEntry, spec: TensorSlice | None) -> TensorPlan:
    if spec is None or not entry.shape:
        return TensorPlan(
            entry.name, path, entry.dtype, entry.shape, ((entry.begin, entry.nbytes),)
        )
    shape = list(entry.shape)
    dim = spec.dim if spec.dim >= 0 else len(shape) + spec.dim
    if dim not in (0, len(shape) - 1):
        raise CheckpointError(f"{path}: tensor {entry.name!r}: slicing dim {spec.dim} unsupported")
    if shape[dim] % spec.size:
        raise CheckpointError(
            f"{path}: tensor {entry.name!r}: dim {dim} of {shape[dim]} does not split "
            f"into {spec.size} equal parts"
        )
    part = shape[dim] // spec.size
    itemsize = entry.dtype.itemsize
    row_bytes = math.prod(shape[1:]) * itemsize
    if dim == 0:
        start = entry.begin + spec.rank * part * row_bytes
        ranges: tuple[tuple[int, int], ...] = ((start, part * row_bytes),)
    else:
        inner = math.prod(shape[:-1])
        stride = shape[-1] * itemsize
        width = part * itemsize
        first = entry.begin + spec.rank * width
        ranges = tuple((first + i * stride, width) for i in range(inner))
    shape[dim] = part
    return TensorPlan(entry.name, path, entry.dtype, tuple(shape), ranges)


_LLAMA_RULES: tuple[tuple[str, int], ...] = (
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", 0),  # column parallel
    (r"(o_proj|down_proj)\.weight$", -1),  # row parallel
    (r"(embed_tokens|lm_head)\.weight$", 0),  # vocab parallel
)


def tp_slice_rule(
    rank: int, size: int, rules: Sequence[tuple[str, int]] = _LLAMA_RULES
) -> Callable[[str, tuple[int, ...]], TensorSlice | None]:
    """A ``slice_for`` from (regex, dim) rules; the first matching rule wins, tensors no
    rule matches (norms, biases of row-parallel layers) are read whole by every rank.
    The default rules are Llama's (vLLM's column/row/vocab-parallel layers)."""
    if not 0 <= rank < size:
        raise ValueError(f"tp rank {rank} must be in [0, {size})")
    compiled = [(re.compile(pattern), dim) for pattern, dim in rules]

    def slice_for(name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        if size == 1:
            return None
        for pattern, dim in compiled:
            if pattern.search(name):
                return TensorSlice(dim, rank, size)
        return None

    return slice_for
