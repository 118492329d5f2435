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
from dataclasses import dataclass, field

from loader.errors import CheckpointError, ObjectNotFound
from loader.plan import (
    FileHeader,
    TensorPlan,
    TensorSlice,
    parse_header,
    parse_index,
    plan_tensors,
)
from loader.sources.base import INDEX_FILE, MAX_INDEX_BYTES, ObjectInfo, Source

__all__ = ["Checkpoint", "open_checkpoint"]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    source: Source
    headers: tuple[FileHeader, ...]
    weight_map: dict[str, str] | None
    # What a sidecar keeps to serve the files again (``loader.sidecar.files``): every file
    # read (the index, if any, then the shards) as ``stat`` saw it, and the bytes read while
    # planning, from offset 0: a shard's 8 + N header bytes, the whole index.
    files: tuple[ObjectInfo, ...] = ()
    prefixes: dict[str, bytes] = field(default_factory=dict)

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
    index: ObjectInfo | None = None
    prefixes: dict[str, bytes] = {}
    if file is not None:
        files = [file]
    else:
        try:
            index = source.stat(INDEX_FILE)
        except ObjectNotFound:
            index = None
        if index is not None:
            if index.size > MAX_INDEX_BYTES:
                raise CheckpointError(
                    f"{source.uri}: {INDEX_FILE} of {index.size} bytes is over the "
                    f"{MAX_INDEX_BYTES}-byte bound on an index (corrupt or hostile?)"
                )
            prefixes[INDEX_FILE] = _read_all(source, INDEX_FILE, index.size)
            weight_map = parse_index(prefixes[INDEX_FILE])
            files = sorted(set(weight_map.values()))
        else:
            files = [o.path for o in source.list() if o.path.endswith(".safetensors")]
        if not files:
            raise CheckpointError(f"{source.uri}: no .safetensors files and no {INDEX_FILE}")

    def header(path: str) -> tuple[FileHeader, ObjectInfo, bytes]:
        info = source.stat(path)
        size = info.size
        raw = bytearray()  # parse_header reads [0, 8) then [8, 8 + N): the prefix, in order

        def read(offset: int, length: int) -> bytes:
            if offset + length > size:
                raise CheckpointError(f"{path}: truncated at {size} bytes")
            buffer = bytearray(length)
            source.read_into(path, offset, memoryview(buffer))
            assert offset == len(raw), f"parse_header read {path} out of order at {offset}"
            raw.extend(buffer)
            return bytes(buffer)

        return parse_header(path, size, read), info, bytes(raw)

    with ThreadPoolExecutor(max(1, min(concurrency, len(files)))) as pool:
        parsed = list(pool.map(header, files))
    prefixes.update((h.path, raw) for h, _, raw in parsed)
    infos = ((index,) if index is not None else ()) + tuple(info for _, info, _ in parsed)
    return Checkpoint(source, tuple(h for h, _, _ in parsed), weight_map, infos, prefixes)
