"""Bytes move between tiers intact, or the move fails loudly as CorruptBlock."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from kvcache.allocator import SlabAllocator
from kvcache.errors import CorruptBlock
from kvcache.tiers import (
    FileBacking,
    MemoryBacking,
    Tier,
    TierStore,
    block_checksum,
    copy_hashing_target,
)
from shoal.logs import JsonFormatter

MiB = 1 << 20


def memory_tier(tier: Tier = Tier.DRAM) -> TierStore:
    return TierStore(tier, SlabAllocator(4 * MiB, slab_bytes=MiB), MemoryBacking.anonymous(4 * MiB))


def file_tier(tmp_path: Path) -> TierStore:
    return TierStore(
        Tier.SSD, SlabAllocator(4 * MiB, slab_bytes=MiB), FileBacking(tmp_path / "spill", 4 * MiB)
    )


@pytest.mark.parametrize("nbytes", [1, 4096, 300_000, MiB])
def test_copy_hashing_target_copies_and_hashes_what_landed(nbytes: int) -> None:
    source = memoryview(os.urandom(nbytes))
    target = memoryview(bytearray(nbytes))
    assert copy_hashing_target(source, target) == block_checksum(source)
    assert bytes(target) == bytes(source)


@pytest.mark.parametrize("route", ["memory->memory", "memory->file", "file->memory", "file->file"])
def test_blocks_cross_tiers_intact(tmp_path: Path, route: str) -> None:
    first, second = route.split("->")
    source = memory_tier() if first == "memory" else file_tier(tmp_path / "a")
    target = memory_tier() if second == "memory" else file_tier(tmp_path / "b")
    payload = os.urandom(700_000)
    offset = source.try_allocate(len(payload))
    landing = target.try_allocate(len(payload))
    assert offset is not None and landing is not None
    source.backing.write(offset, memoryview(payload))
    source.copy_to(offset, len(payload), block_checksum(payload), target, landing)
    out = memoryview(bytearray(len(payload)))
    target.backing.read_into(landing, out)
    assert bytes(out) == payload
    source.close()
    target.close()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_a_bad_checksum_is_corrupt_block(tmp_path: Path, kind: str) -> None:
    source = memory_tier() if kind == "memory" else file_tier(tmp_path)
    target = memory_tier(Tier.SHM)
    payload = os.urandom(5000)
    source.backing.write(0, memoryview(payload))
    with pytest.raises(CorruptBlock, match="checksum mismatch"):
        source.copy_to(0, len(payload), block_checksum(payload) ^ 1, target, 0)


def test_the_spill_file_is_private_and_removed_on_close(tmp_path: Path) -> None:
    tier = file_tier(tmp_path)
    path = tmp_path / "spill"
    assert path.stat().st_mode & 0o777 == 0o600
    tier.close()
    assert not path.exists()


def test_logs_are_one_json_object_per_line_with_extra_fields() -> None:
    record = logging.LogRecord(
        "shoal.test", logging.WARNING, __file__, 1, "client %s", ("gone",), None
    )
    record.session = 7
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "client gone"
    assert entry["level"] == "warning"
    assert entry["session"] == 7
    assert entry["ts"].endswith("+00:00")
