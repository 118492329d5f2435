"""A peer sidecar as a checkpoint source: a real ``shoal loader serve`` process holds a
checkpoint staged from a local folder, and a new replica loads it from there (issue 5)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

grpc = pytest.importorskip("grpc")
safetensors_torch = pytest.importorskip("safetensors.torch")

from loader.checkpoint import open_checkpoint  # noqa: E402
from loader.errors import (  # noqa: E402
    ObjectNotFound,
    SourceError,
    SourceUnavailable,
    StagingConflict,
    UnknownCheckpoint,
)
from loader.plan import INDEX_FILE  # noqa: E402
from loader.sidecar._proto import loader_pb2 as pb  # noqa: E402
from loader.sidecar._proto import loader_pb2_grpc as pb_grpc  # noqa: E402
from loader.sources import open_source  # noqa: E402
from loader.sources.fallback import PeerWithFallback  # noqa: E402
from loader.sources.local import LocalSource  # noqa: E402
from loader.sources.peer import PeerSource, parse_peer_uri  # noqa: E402
from loader.stream import Streamer, StreamOptions  # noqa: E402
from tests.integration.conftest import ENV  # noqa: E402
from tests.integration.test_loader_local import reference, write_sharded  # noqa: E402
from tests.integration.test_loader_sidecar import (  # noqa: E402
    MiB,
    Sidecar,
    big_model,
    small_model,
    start_sidecar,
    write_checkpoint,
)


def assert_identical(loaded: dict[str, torch.Tensor], folder: Path) -> None:
    expected = reference(folder)
    assert sorted(loaded) == sorted(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch.equal(loaded[name].view(torch.uint8), tensor.view(torch.uint8)), name


def peer_uri(sidecar: Sidecar, checkpoint: str) -> str:
    socket = sidecar.config.socket_path
    assert socket is not None
    return f"peer+unix://{socket}/{checkpoint}"


def load_all(source: PeerSource | object, **options: object) -> dict[str, torch.Tensor]:
    checkpoint = open_checkpoint(source)  # type: ignore[arg-type]
    streamer = Streamer(checkpoint.source, checkpoint.plan(), StreamOptions(**options))  # type: ignore[arg-type]
    return dict(streamer)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peer")


@pytest.fixture(scope="module")
def peer(base: Path) -> Iterator[Sidecar]:
    handle = start_sidecar(base)
    yield handle
    assert handle.stop() == 0, handle.log()


@pytest.fixture(scope="module")
def sharded(base: Path, peer: Sidecar) -> Path:
    model = small_model(seed=21)
    model.update(big_model(12 * MiB))  # tensors larger than a Read chunk and a stream chunk
    folder = write_sharded(base / "sharded", model)
    with peer.client() as client:
        client.prefetch(str(folder))
    return folder


# -- the URI ---------------------------------------------------------------------------------


def test_peer_uris_name_the_sidecar_and_the_checkpoint_as_staged() -> None:
    assert parse_peer_uri("peer://10.0.0.5:7070/s3://bucket/m/") == ("10.0.0.5:7070",
                                                                     "s3://bucket/m/")  # fmt: skip
    assert parse_peer_uri("peer://[::1]:7070/models/m") == ("[::1]:7070", "/models/m")
    assert parse_peer_uri("peer+unix:///run/x/loader.sock//models/m") == (
        "unix:/run/x/loader.sock", "/models/m")  # fmt: skip
    assert parse_peer_uri("peer+unix:///run/loader.sock/file:///m") == (
        "unix:/run/loader.sock", "file:///m")  # fmt: skip
    for bad in ("peer://host/s3://b/m", "peer://host:7070/", "peer+unix://run/x.sock/m",
                "peer+unix:///run/socket/m"):  # fmt: skip
        with pytest.raises(SourceError, match="peer"):
            parse_peer_uri(bad)


# -- loading from a peer ---------------------------------------------------------------------


def test_a_streamer_over_a_peer_loads_a_sharded_checkpoint_bit_identically(
    peer: Sidecar, sharded: Path
) -> None:
    source = PeerSource(peer_uri(peer, str(sharded)))
    try:
        origin = LocalSource(sharded)
        assert source.list() == sorted(
            (origin.stat(p.name) for p in sharded.iterdir()), key=lambda i: i.path
        ), "sizes and identities are the origin's"
        # Small reads and coalescing (1 MiB chunks, many in flight) as well as whole tensors.
        assert_identical(load_all(source, concurrency=8, chunk_bytes=1 * MiB), sharded)
        assert_identical(load_all(source), sharded)
        index = source.stat(INDEX_FILE)
        raw = bytearray(index.size)
        source.read_into(INDEX_FILE, 0, memoryview(raw))
        assert bytes(raw) == (sharded / INDEX_FILE).read_bytes()
        with pytest.raises(ObjectNotFound, match="no file"):
            source.stat("other.safetensors")
    finally:
        source.close()


def test_header_and_tensor_bytes_are_served_as_the_file_has_them(
    peer: Sidecar, sharded: Path
) -> None:
    shard = sorted(sharded.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    source = PeerSource(peer_uri(peer, str(sharded) + "/"))  # the folder with its final /
    try:
        for offset, length in [(0, 8), (0, 4096), (100, len(data) - 100), (len(data) - 5, 5)]:
            buffer = bytearray(length)
            source.read_into(shard.name, offset, memoryview(buffer))
            assert bytes(buffer) == data[offset : offset + length], (offset, length)
        with pytest.raises(SourceError, match="outside its"):
            source.read_into(shard.name, len(data) - 2, memoryview(bytearray(4)))
    finally:
        source.close()


def test_bytes_between_tensors_are_refused_not_invented(peer: Sidecar, base: Path) -> None:
    tensors = {
        "0": torch.zeros(4),
        "a": torch.arange(16, dtype=torch.float32),
        "b": torch.ones(8),
    }
    folder = base / "holes"
    folder.mkdir()
    header = {
        "0": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "a": {"dtype": "F32", "shape": [16], "data_offsets": [16, 80]},
        "b": {"dtype": "F32", "shape": [8], "data_offsets": [144, 176]},  # 64 bytes of hole
    }
    raw = json.dumps(header).encode()
    body = b"".join(tensors[n].numpy().tobytes() for n in "0a") + b"\xee" * 64
    body += tensors["b"].numpy().tobytes()
    (folder / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    with peer.client() as client:
        client.prefetch(str(folder))
    source = PeerSource(peer_uri(peer, str(folder)))
    start = 8 + len(raw)
    hole = rf"bytes \[{start + 80}, {start + 144}\) lie outside the header and every"
    try:
        with pytest.raises(SourceError, match=hole):
            source.read_into("model.safetensors", start + 76, memoryview(bytearray(8)))
        loaded = load_all(source)  # a peer's reads never join over a hole (reads_holes)
        assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    finally:
        source.close()


def test_shoal_load_from_a_peer(peer: Sidecar, sharded: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "load", peer_uri(peer, str(sharded)), "--json"],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["files"] == 3
    assert summary["bytes"] == sum(t.nbytes for t in reference(sharded).values())


# -- what a peer cannot serve ------------------------------------------------------------------


def test_a_checkpoint_the_peer_does_not_hold_is_a_clear_error(peer: Sidecar, base: Path) -> None:
    folder = write_checkpoint(base / "not-held", small_model(seed=23))
    source = PeerSource(peer_uri(peer, str(folder)))
    try:
        with pytest.raises(UnknownCheckpoint, match="holds no staged .*not-held"):
            open_checkpoint(source)
    finally:
        source.close()
    code, name = raw_files_status(peer, str(folder))
    assert (code, name) == (grpc.StatusCode.NOT_FOUND, "UnknownCheckpoint")
    done = subprocess.run(
        [sys.executable, "-m", "shoal", "load", peer_uri(peer, str(folder))],
        env=ENV, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1 and "holds no staged" in done.stderr


def test_open_source_falls_back_to_the_origin_and_says_so(
    peer: Sidecar, base: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = write_checkpoint(base / "fallback", small_model(seed=25))
    uri = peer_uri(peer, f"file://{folder}")
    with caplog.at_level(logging.INFO, logger="shoal.loader.sources"):
        source, file = open_source(uri)
        try:
            assert isinstance(source, LocalSource) and file is None
            assert_identical(load_all(source), folder)
        finally:
            source.close()
        assert "reading it from its origin" in caplog.text
        with pytest.raises(UnknownCheckpoint):
            open_source(uri, fallback=False)[0].list()
        with peer.client() as client:
            client.prefetch(f"file://{folder}")
        caplog.clear()
        source, _ = open_source(uri)
        try:
            assert isinstance(source, PeerWithFallback) and source.origin is None
            assert_identical(load_all(source), folder)
        finally:
            source.close()
        assert "serves" in caplog.text


def test_a_tp_sliced_staging_cannot_be_served_as_files(peer: Sidecar, base: Path) -> None:
    folder = write_checkpoint(base / "sliced", small_model(seed=27))
    with peer.client() as client:
        client.prefetch(str(folder), tp_rank=0, tp_size=2)
    code, name = raw_files_status(peer, str(folder))
    assert (code, name) == (grpc.StatusCode.FAILED_PRECONDITION, "StagingConflict")
    source = PeerSource(peer_uri(peer, str(folder)))
    try:
        with pytest.raises(StagingConflict, match="only sliced for tensor parallelism"):
            source.list()
    finally:
        source.close()


def test_a_checkpoint_still_staging_is_unavailable(peer: Sidecar, base: Path) -> None:
    folder = write_checkpoint(base / "slow", big_model(16 * MiB))
    with peer.client() as client:
        staging = threading.Thread(
            target=lambda: client.prefetch(str(folder), rate_bytes_per_s=4 * MiB)
        )
        staging.start()
        try:
            deadline = time.monotonic() + 10
            while not any(i.state == "staging" for i in client.list()):
                assert time.monotonic() < deadline, peer.log()
                time.sleep(0.02)
            code, name = raw_files_status(peer, str(folder))
            assert (code, name) == (grpc.StatusCode.UNAVAILABLE, "SourceUnavailable")
        finally:
            staging.join(30)


def raw_files_status(sidecar: Sidecar, uri: str) -> tuple[object, str | None]:
    with grpc.insecure_channel(sidecar.config.target) as channel:
        stub = pb_grpc.LoaderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Files(pb.FilesRequest(uri=uri), timeout=10)
    names = [v for k, v in caught.value.trailing_metadata() or () if k == "shoal-error"]
    return caught.value.code(), names[0] if names else None


# -- a peer that goes away -----------------------------------------------------------------------


def test_a_peer_killed_mid_load_is_unavailable_within_a_bounded_time(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "m", big_model(32 * MiB))
    victim = start_sidecar(tmp_path)
    with victim.client() as client:
        client.prefetch(str(folder))
    source = PeerSource(peer_uri(victim, str(folder)), timeout_s=5)
    try:
        checkpoint = open_checkpoint(source)
        options = StreamOptions(concurrency=2, chunk_bytes=1 * MiB, rate_bytes_per_s=8 * MiB)
        stream = iter(Streamer(source, checkpoint.plan(), options))
        next(stream)
        killed = time.monotonic()
        victim.process.kill()
        victim.process.wait()
        with pytest.raises(SourceUnavailable, match="peer"):
            for _ in stream:
                pass
        assert time.monotonic() - killed < 5
    finally:
        source.close()
        for segment in victim.segments():  # what the killed sidecar could not unlink
            segment.unlink()


def kill_mid_load(
    victim: Sidecar, source: object, evict: str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """A slow load from ``source`` whose peer is killed (or, given ``evict``, drops that
    checkpoint) after the first tensor arrived."""
    checkpoint = open_checkpoint(source)  # type: ignore[arg-type]
    options = StreamOptions(concurrency=2, chunk_bytes=1 * MiB, rate_bytes_per_s=8 * MiB)
    stream = iter(Streamer(checkpoint.source, checkpoint.plan(), options))
    yield next(stream)
    if evict is not None:
        with victim.client() as client:
            client.evict(evict)
    else:
        victim.process.kill()
        victim.process.wait()
    yield from stream


def staged_on_a_victim(tmp_path: Path) -> tuple[Path, Sidecar, str]:
    """A 32 MiB checkpoint in two shards, staged whole by a sidecar of its own (a test may
    kill it): the folder, the sidecar and the checkpoint id."""
    folder = write_sharded(tmp_path / "m", big_model(32 * MiB), shards=2)
    victim = start_sidecar(tmp_path)
    with victim.client() as client:
        staged = client.prefetch(f"file://{folder}")
    return folder, victim, staged.table.checkpoint_id


def test_a_peer_killed_mid_load_hands_the_rest_to_the_origin(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, victim, _ = staged_on_a_victim(tmp_path)
    source, _ = open_source(peer_uri(victim, f"file://{folder}"))
    try:
        assert isinstance(source, PeerWithFallback)
        with caplog.at_level(logging.WARNING, logger="shoal.loader.sources"):
            loaded = dict(kill_mid_load(victim, source))
        assert isinstance(source.origin, LocalSource)
        assert "reading the rest from the origin" in caplog.text
        assert_identical(loaded, folder)
    finally:
        source.close()
        for segment in victim.segments():
            segment.unlink()


def test_an_origin_changed_since_the_staging_fails_instead_of_mixing(tmp_path: Path) -> None:
    folder, victim, _ = staged_on_a_victim(tmp_path)
    for shard in folder.glob("*.safetensors"):  # same bytes, but a new file: a new identity
        data = shard.read_bytes()
        shard.unlink()
        shard.write_bytes(data)
    source, _ = open_source(peer_uri(victim, f"file://{folder}"))
    try:
        with pytest.raises(SourceError, match="changed since the peer staged it"):
            for _ in kill_mid_load(victim, source):
                pass
    finally:
        source.close()
        for segment in victim.segments():
            segment.unlink()


def test_a_peer_that_evicts_mid_load_hands_the_rest_to_the_origin(tmp_path: Path) -> None:
    folder, holder, checkpoint_id = staged_on_a_victim(tmp_path)
    try:
        source, _ = open_source(peer_uri(holder, f"file://{folder}"))
        try:
            loaded = dict(kill_mid_load(holder, source, evict=checkpoint_id))
            assert isinstance(source, PeerWithFallback) and source.origin is not None
            assert_identical(loaded, folder)
        finally:
            source.close()
    finally:
        assert holder.stop() == 0, holder.log()
