"""Opening a checkpoint: find its files, read and validate their headers, plan the load.

A checkpoint is named by a source URI and, optionally, one file in it:

    /models/llama-1b/                        every *.safetensors, or the shards the
    s3://bucket/llama-1b/                    model.safetensors.index.json names
    https://host/llama-1b/model.safetensors  one file (its folder is the source root)

Headers of all shards are read concurrently (two small reads each), so planning a
many-shard checkpoint on S3 costs about two round trips, not two per shard.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loader.errors import CheckpointError, ObjectNotFound
from loader.plan import (
    INDEX_FILE,
    FileHeader,
    TensorPlan,
    TensorSlice,
    parse_header,
    parse_index,
    plan_tensors,
)
from loader.sources.base import Source

__all__ = ["Checkpoint", "open_checkpoint"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    source: Source
    headers: tuple[FileHeader, ...]
    weight_map: dict[str, str] | None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for h in self.headers for t in h.tensors)

    def plan(
        self, slice_for: Callable[[str, tuple[int, ...]], TensorSlice | None] | None = None
    ) -> list[TensorPlan]:
        return plan_tensors(self.headers, self.weight_map, slice_for)


def _read_all(source: Source, path: str, size: int) -> bytes:
    buffer = bytearray(size)
    source.read_into(path, 0, memoryview(buffer))
    return bytes(buffer)


def open_checkpoint(
    source: Source, file: str | None = None, *, concurrency: int = 16
) -> Checkpoint:
    """Plan-ready checkpoint from ``source`` (one ``file`` if given)."""
    weight_map: dict[str, str] | None = None
    if file is not None:
        files = [file]
    else:
        try:
            index = source.stat(INDEX_FILE)
        except ObjectNotFound:
            index = None
        if index is not None:
            weight_map = parse_index(_read_all(source, INDEX_FILE, index.size))
            files = sorted(set(weight_map.values()))
        else:
            files = [o.path for o in source.list() if o.path.endswith(".safetensors")]
        if not files:
            raise CheckpointError(f"{source.uri}: no .safetensors files and no {INDEX_FILE}")

    def header(path: str) -> FileHeader:
        size = source.stat(path).size

        def read(offset: int, length: int) -> bytes:
            if offset + length > size:
                raise CheckpointError(f"{path}: truncated at {size} bytes")
            buffer = bytearray(length)
            source.read_into(path, offset, memoryview(buffer))
            return bytes(buffer)

        return parse_header(path, size, read)

    with ThreadPoolExecutor(min(concurrency, len(files))) as pool:
        headers = tuple(pool.map(header, files))
    return Checkpoint(source, headers, weight_map)
