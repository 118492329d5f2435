"""Warm loads (issue 17): a file the page cache holds gets fewer readers than one read from
the disk, and each reader faults its destination in before the copy, without changing a
byte of it."""

from __future__ import annotations

import mmap
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from loader import _pages
from loader.plan import TensorPlan
from loader.sources.base import ObjectInfo
from loader.sources.local import LocalSource
from loader.stream import Streamer, StreamOptions, _in_steps

KiB = 1 << 10


class CountingSource:
    """In-memory files, some of them "cached"; records the most reads of each file that
    were in flight at once (each read waits a little, so the streamer fills its slots)."""

    uri = "mem://counting/"
    preferred_chunk_bytes = 64 * KiB

    def __init__(self, files: dict[str, bytes], cached: set[str]) -> None:
        self.files = files
        self.cached = cached
        self._lock = threading.Lock()
        self._now: dict[str, int] = dict.fromkeys(files, 0)
        self.most: dict[str, int] = dict.fromkeys(files, 0)

    def is_cached(self, path: str) -> bool:
        return path in self.cached

    def stat(self, path: str) -> ObjectInfo:
        return ObjectInfo(path, len(self.files[path]), "v1")

    def list(self) -> list[ObjectInfo]:
        return [self.stat(p) for p in sorted(self.files)]

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        with self._lock:
            self._now[path] += 1
            self.most[path] = max(self.most[path], self._now[path])
        time.sleep(0.005)
        for buffer in buffers:
            buffer[:] = self.files[path][offset : offset + len(buffer)]
            offset += len(buffer)
        with self._lock:
            self._now[path] -= 1

    def close(self) -> None:
        pass


def plans_of(files: dict[str, bytes], tensor_bytes: int) -> list[TensorPlan]:
    return [
        TensorPlan(f"{path}.{at}", path, torch.uint8, (tensor_bytes,), ((at, tensor_bytes),))
        for path, data in files.items()
        for at in range(0, len(data), tensor_bytes)
    ]


def test_a_cached_file_gets_cached_concurrency_reads_and_a_cold_one_all() -> None:
    files = {"warm": os.urandom(1024 * KiB), "cold": os.urandom(1024 * KiB)}
    source = CountingSource(files, cached={"warm"})
    options = StreamOptions(concurrency=8, cached_concurrency=2, merge_gap_bytes=-1)
    loaded = dict(Streamer(source, plans_of(files, 64 * KiB), options))
    assert source.most == {"warm": 2, "cold": 8}
    for path, data in files.items():  # and every byte in its place
        assert b"".join(loaded[f"{path}.{at}"].numpy().tobytes() for at in
                        range(0, len(data), 64 * KiB)) == data  # fmt: skip


def test_cached_concurrency_defaults_to_two_reads_per_core_within_concurrency() -> None:
    files = {"warm": os.urandom(2048 * KiB)}
    source = CountingSource(files, cached={"warm"})
    dict(Streamer(source, plans_of(files, 64 * KiB), StreamOptions(concurrency=32)))
    cores = len(os.sched_getaffinity(0))
    assert source.most["warm"] == min(32, 2 * cores)
    capped = CountingSource(files, cached={"warm"})
    dict(Streamer(capped, plans_of(files, 64 * KiB), StreamOptions(concurrency=1)))
    assert capped.most["warm"] == 1


def test_cached_concurrency_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="cached_concurrency"):
        StreamOptions(cached_concurrency=-1)


def test_populating_pages_keeps_what_they_hold() -> None:
    region = mmap.mmap(-1, 64 * KiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region[:5] = b"shoal"
    tensor = torch.frombuffer(region, dtype=torch.uint8)
    populated = _pages.populate_write(tensor.data_ptr() + 3, 40 * KiB)  # widened to pages
    assert populated == _pages._supported  # the bench VM's kernel has it (5.14+)
    assert region[:5] == b"shoal" and region[5:] == bytes(64 * KiB - 5)
    assert _pages.populate_write(tensor.data_ptr(), 0) is False
    del tensor


@pytest.mark.parametrize("chunk", [256 * KiB, 4 * 1024 * KiB])
def test_a_prefaulted_load_and_a_plain_one_read_the_same_bytes(tmp_path: Path, chunk: int) -> None:
    """A cached file's reads go in populated steps (``PREFAULT_STEP_BYTES``) that split
    tensors and holes anywhere: the bytes must not move."""
    data = os.urandom(6 * 1024 * KiB + 123)
    (tmp_path / "w.bin").write_bytes(data)
    sizes = [1, 4095, 4097, 700 * KiB, 3 * 1024 * KiB + 5]
    plans, at = [], 0
    for i, size in enumerate(sizes):
        plans.append(TensorPlan(f"t{i}", "w.bin", torch.uint8, (size,), ((at, size),)))
        at += size + 1000 * i  # holes, read through and dropped
    for prefault in (True, False):
        source = LocalSource(tmp_path, direct=False)
        assert source.is_cached("w.bin")  # so the prefaulted load reads in steps
        options = StreamOptions(prefault=prefault, chunk_bytes=chunk)
        got = dict(Streamer(source, plans, options))
        source.close()
        for plan in plans:
            ((offset, length),) = plan.ranges
            assert got[plan.name].numpy().tobytes() == data[offset : offset + length]


def test_steps_cut_buffers_into_runs_of_the_step_keeping_every_byte_once() -> None:
    memory = bytearray(range(256)) * 40
    parts = [(memoryview(memory)[:3000], 1000), (memoryview(memory)[3000:3100], 0),
             (memoryview(memory)[3100:], 9000)]  # fmt: skip
    runs = list(_in_steps(parts, 1024))
    assert [sum(len(b) for b, _ in run) for run in runs] == [1024] * 10
    assert b"".join(bytes(b) for run in runs for b, _ in run) == bytes(memory)
    assert runs[0] == [(parts[0][0][:1024], 1000)] and runs[2][0][1] == 1000 + 2048
    assert runs[2][1][1] == 0  # the hole's part has no address
    assert [address for _, address in runs[3]] == [0, 9000]  # the hole's rest, the third
    assert runs[4][0][1] == 9000 + 4096 - 3100  # the third buffer, further in


def test_a_local_file_just_written_is_cached_and_a_direct_source_never_is(
    tmp_path: Path,
) -> None:
    (tmp_path / "w.bin").write_bytes(os.urandom(4 * 1024 * KiB))
    buffered = LocalSource(tmp_path)
    assert buffered.is_cached("w.bin") and not buffered.direct_for("w.bin")
    buffered.close()
    direct = LocalSource(tmp_path, direct=True)
    assert not direct.is_cached("w.bin")
    direct.close()


def test_a_local_file_evicted_from_the_page_cache_is_not_cached(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(os.urandom(4 * 1024 * KiB))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # clean pages leave the cache
    finally:
        os.close(fd)
    source = LocalSource(tmp_path)
    try:
        if source.is_cached("w.bin"):
            pytest.skip("this filesystem keeps the file in memory (tmpfs?)")
        assert source.direct_for("w.bin") == (source.direct == "auto")
    finally:
        source.close()
