"""The write-through disk cache never serves a hole or a flipped bit (M14): a published copy
is checked against its digest on first open, and a partial copy's ranges against theirs;
what does not match is fetched again from the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

from loader.checkpoint import open_checkpoint
from loader.plan import tp_slice_rule
from loader.sources.cache import CachedSource
from loader.sources.local import LocalSource
from loader.stream import Streamer, StreamOptions
from tests.integration.test_loader_local import (
    _Counting,
    assert_same,
    llama_like,
    reference,
    write_sharded,
)


def load(
    folder: Path, cache: Path, tp: tuple[int, int] | None = None
) -> tuple[dict[str, torch.Tensor], _Counting]:
    remote = _Counting(LocalSource(folder))
    source = CachedSource(remote, cache)  # type: ignore[arg-type]
    plans = open_checkpoint(source).plan(tp_slice_rule(*tp) if tp else None)
    loaded = dict(Streamer(source, plans, StreamOptions(chunk_bytes=8192)))
    source.close()
    return loaded, remote


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    folder = write_sharded(tmp_path / "remote", llama_like(), shards=2)
    return folder, reference(folder)


def copies(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/*.safetensors"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "no digest"])
def test_a_damaged_copy_is_discarded_and_fetched_again(
    model: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, damage: str
) -> None:
    folder, expected = model
    cache = tmp_path / "cache"
    load(folder, cache)
    victim = copies(cache)[0]
    good = victim.read_bytes()
    if damage == "flip":
        raw = bytearray(good)
        raw[len(raw) - 100] ^= 0xFF  # inside the last tensor
        victim.write_bytes(bytes(raw))
    elif damage == "truncate":
        victim.write_bytes(good[: len(good) // 2])
    else:
        Path(f"{victim}.digest").unlink()  # as a copy an older version published
    loaded, remote = load(folder, cache)
    assert_same(loaded, expected)
    assert remote.reads > 0  # the damaged file came from the source again
    assert victim.read_bytes() == good  # and its copy was published whole again
    _, remote = load(folder, cache)
    assert remote.reads == 0  # now served locally


def test_ranges_claiming_bytes_never_written_are_refetched(
    model: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, expected = model
    cache = tmp_path / "cache"
    load(folder, cache, tp=(0, 2))  # a rank's slice: partial copies with recorded ranges
    parts = sorted(cache.glob("*/*.safetensors.part"))
    assert parts and not copies(cache)
    for part in parts:
        # A crash lost the data after the ranges were written: the file is zeros where the
        # ranges say bytes are (what an un-fsynced write looks like after a power loss).
        part.write_bytes(bytes(part.stat().st_size))
    load(folder, cache, tp=(1, 2))  # the other rank reads exactly the bytes not claimed
    loaded, _ = load(folder, cache)  # never from a copy published with rank 0's zeros
    assert_same(loaded, expected)
    for copy in copies(cache):
        assert copy.read_bytes() == (folder / copy.name).read_bytes()


def test_a_ranges_file_without_digests_is_not_trusted(
    model: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, expected = model
    cache = tmp_path / "cache"
    load(folder, cache, tp=(1, 2))
    for part in sorted(cache.glob("*/*.safetensors.part")):
        size = part.stat().st_size
        Path(f"{part}.ranges").write_text(f"0 {size}\n")  # "all of it", no digest
    load(folder, cache, tp=(0, 2))  # on a trusting cache this would publish rank 1's holes
    loaded, remote = load(folder, cache)
    assert_same(loaded, expected)
    assert remote.reads > 0
    for copy in copies(cache):
        assert copy.read_bytes() == (folder / copy.name).read_bytes()


def test_a_partial_copy_resumes_from_ranges_that_check_out(
    model: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, expected = model
    cache = tmp_path / "cache"
    _, cold = load(folder, tmp_path / "fresh")
    load(folder, cache, tp=(0, 2))
    loaded, second = load(folder, cache)  # fills in the rest only
    assert_same(loaded, expected)
    assert 0 < second.reads < cold.reads  # rank 0's checked ranges were kept
    _, third = load(folder, cache)
    assert third.reads == 0
