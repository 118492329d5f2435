"""Staged checkpoints carry digests (M5): the sidecar hashes each tensor while staging and
each file's header, and a reader checks what it gets against them: bytes that change in
the segment after staging are refused, from a peer and (asked to verify) when mapped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("grpc")
pytest.importorskip("safetensors")

from loader.checkpoint import open_checkpoint
from loader.errors import IntegrityError
from loader.sources.peer import PeerSource
from loader.stream import Streamer, StreamOptions
from tests.integration.test_loader_peer import assert_identical, peer_uri
from tests.integration.test_loader_sidecar import (
    Sidecar,
    small_model,
    start_sidecar,
    write_checkpoint,
)


def stage(sidecar: Sidecar, folder: Path) -> tuple[Path, int, str]:
    """Stage ``folder``; its segment, and the offset and name of its largest tensor."""
    with sidecar.client() as client:
        table = client.prefetch(str(folder)).table
    largest = max(table.tensors, key=lambda t: t.nbytes)
    assert all(len(t.sha256) == 64 for t in table.tensors)
    return Path(table.segment_path), largest.offset, largest.name


def flip(segment: Path, offset: int) -> None:
    """Change one staged byte in place (as a stray writer or a bug would)."""
    with segment.open("r+b") as out:
        out.seek(offset + 3)
        byte = out.read(1)
        out.seek(offset + 3)
        out.write(bytes([byte[0] ^ 0x5A]))


def load(uri: str) -> dict[str, torch.Tensor]:
    source = PeerSource(uri)
    try:
        checkpoint = open_checkpoint(source)
        return dict(Streamer(source, checkpoint.plan(), StreamOptions()))
    finally:
        source.close()


def test_a_peer_read_of_bytes_changed_since_staging_is_refused(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "models" / "m", small_model(seed=4))
    sidecar = start_sidecar(tmp_path)
    try:
        segment, offset, name = stage(sidecar, folder)
        assert_identical(load(peer_uri(sidecar, str(folder))), folder)  # intact: loads
        flip(segment, offset)
        with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
            load(peer_uri(sidecar, str(folder)))
    finally:
        sidecar.stop()


def test_the_file_table_carries_header_and_tensor_digests(tmp_path: Path) -> None:
    import hashlib

    folder = write_checkpoint(tmp_path / "models" / "m", small_model(seed=5))
    sidecar = start_sidecar(tmp_path)
    try:
        stage(sidecar, folder)
        source = PeerSource(peer_uri(sidecar, str(folder)))
        files = source.files()
        source.close()
    finally:
        sidecar.stop()
    raw = (folder / "model.safetensors").read_bytes()
    length, digest = files.prefixes["model.safetensors"]
    assert digest == hashlib.sha256(raw[:length]).hexdigest()
    assert files.tensors  # every non-empty tensor: its file range and digest
    for (path, offset, nbytes), (_name, sha) in files.tensors.items():
        assert path == "model.safetensors"
        assert sha == hashlib.sha256(raw[offset : offset + nbytes]).hexdigest()


def test_a_mapped_load_verifies_on_request(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "models" / "m", small_model(seed=6))
    sidecar = start_sidecar(tmp_path)
    try:
        segment, offset, name = stage(sidecar, folder)
        with sidecar.client() as client:
            with client.load(str(folder), verify=True):
                pass
            flip(segment, offset)
            with pytest.raises(IntegrityError, match=name.replace(".", r"\.")):
                client.load(str(folder), verify=True)
            with client.load(str(folder)):  # not asked: mapped as is (local, 0600)
                pass
    finally:
        sidecar.stop()
