"""Sizes a source or a header declares are untrusted (m18): an index or a tensor larger than
a sane bound is refused before anything that large is allocated."""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import pytest

from loader.checkpoint import open_checkpoint
from loader.errors import CheckpointError, ObjectNotFound
from loader.plan import MAX_TENSOR_BYTES, parse_header
from loader.sources.base import INDEX_FILE, MAX_INDEX_BYTES, ObjectInfo


class ClaimingSource:
    """An in-memory source whose ``stat`` reports whatever sizes it is told to: a hostile
    server. Reads past the real bytes fail the test (nothing that large may be asked)."""

    uri = "mem://hostile/"
    preferred_chunk_bytes = 1 << 20

    def __init__(self, files: dict[str, bytes], claimed: dict[str, int]) -> None:
        self.files = files
        self.claimed = claimed
        self.largest_read = 0

    def stat(self, path: str) -> ObjectInfo:
        if path not in self.files:
            raise ObjectNotFound(path)
        return ObjectInfo(path, self.claimed.get(path, len(self.files[path])), "v1")

    def list(self) -> list[ObjectInfo]:
        return [self.stat(p) for p in sorted(self.files)]

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        for buffer in buffers:
            self.largest_read = max(self.largest_read, len(buffer))
            data = self.files[path][offset : offset + len(buffer)]
            assert len(data) == len(buffer), f"read of {path} past its real bytes"
            buffer[:] = data
            offset += len(buffer)

    def close(self) -> None:
        pass


def safetensors(header: dict[str, object]) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def test_an_index_claimed_larger_than_the_bound_is_refused_before_it_is_read() -> None:
    source = ClaimingSource({INDEX_FILE: b"{}"}, {INDEX_FILE: MAX_INDEX_BYTES + 1})
    with pytest.raises(CheckpointError, match="bound on an index"):
        open_checkpoint(source)
    assert source.largest_read == 0


def test_an_index_at_the_bound_is_still_read() -> None:
    index = json.dumps({"weight_map": {"w": "a.safetensors"}}).encode()
    shard = safetensors({"w": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}})
    source = ClaimingSource({INDEX_FILE: index, "a.safetensors": shard + b"abcd"}, {})
    checkpoint = open_checkpoint(source)
    assert [t.name for t in checkpoint.headers[0].tensors] == ["w"]


def test_a_tensor_over_the_bound_is_refused_even_when_the_file_claims_to_hold_it() -> None:
    count = MAX_TENSOR_BYTES + 8
    header = safetensors({"huge": {"dtype": "U8", "shape": [count], "data_offsets": [0, count]}})
    claimed = len(header) + count  # the server says the file is that large
    with pytest.raises(CheckpointError, match="huge.*over the"):
        parse_header("a.safetensors", claimed, lambda offset, n: header[offset : offset + n])


def test_a_tensor_larger_than_its_file_is_refused() -> None:
    header = safetensors({"w": {"dtype": "F32", "shape": [1024], "data_offsets": [0, 4096]}})
    with pytest.raises(CheckpointError, match="outside the 100 data bytes"):
        parse_header("a.safetensors", len(header) + 100, lambda o, n: header[o : o + n])
