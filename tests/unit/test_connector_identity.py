"""The model identity in block keys names immutable weights, never a moving branch (m9)."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pytest

from kvcache.connector.identity import UnknownModelIdentity, model_identity, sample_offsets

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Resolved(str):
    """Like huggingface_hub.ResolvedRevision: the requested name, carrying the commit."""

    resolved = COMMIT


def checkpoint(path: Path, weights: bytes) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("not part of the identity")
    return path


def test_a_hub_model_is_named_by_the_commit_its_revision_resolved_to() -> None:
    assert model_identity("org/model", Resolved("main")) == f"org/model@{COMMIT}"
    assert model_identity("org/model", COMMIT) == f"org/model@{COMMIT}"


def test_a_branch_that_cannot_be_resolved_is_refused_not_keyed_as_main(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(UnknownModelIdentity, match="model_id"):
        model_identity("org/model", "main")
    ref = tmp_path / "hub" / "models--org--model" / "refs" / "main"
    ref.parent.mkdir(parents=True)
    ref.write_text(COMMIT)  # the local cache vLLM loaded from records the commit
    assert model_identity("org/model", "main") == f"org/model@{COMMIT}"


def test_a_local_directory_is_named_by_its_weights(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 2048
    a = checkpoint(tmp_path / "a" / "tiny", weights)
    copy = tmp_path / "b" / "tiny"
    shutil.copytree(a, copy)
    identity = model_identity(str(a))
    assert identity.startswith("tiny@weights-")
    assert model_identity(str(copy)) == identity  # same checkpoint elsewhere: same KV
    (copy / "README.md").write_text("changed")
    assert model_identity(str(copy)) == identity
    changed = bytearray(weights)
    changed[len(weights) // 2] ^= 1  # a weight update in place
    (copy / "model.safetensors").write_bytes(bytes(changed))
    assert model_identity(str(copy)) != identity


def test_samples_cover_every_64_mib_stretch_of_a_large_file() -> None:
    size = 16 << 30  # a 16 GB shard: one window per 64 MiB
    offsets = sample_offsets(size)
    assert offsets[0] == 0 and offsets[-1] == size - (64 << 10)
    assert offsets == sorted(set(offsets))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert max(gaps) <= 64 << 20
    assert len(offsets) <= 4096 + 3
    huge = sample_offsets(1 << 40)  # bounded: wider stretches, never more windows
    assert len(huge) <= 4096 + 3 and huge[-1] == (1 << 40) - (64 << 10)
    assert sample_offsets(1000) == [0]


def test_a_dense_change_away_from_the_start_middle_and_end_is_seen(tmp_path: Path) -> None:
    """A merged adapter rewrites whole matrices wherever they lie in the file; the old three
    samples (start, middle, end) missed a change at a quarter of a file (review finding)."""
    weights = bytes(200 << 20)  # 200 MiB of zeros
    a = checkpoint(tmp_path / "a" / "m", weights)
    identity = model_identity(str(a))
    changed = bytearray(weights)
    start = len(weights) // 4
    changed[start : start + (48 << 20)] = b"\x01" * (48 << 20)  # one layer's q/k/v merged
    (a / "model.safetensors").write_bytes(bytes(changed))
    assert model_identity(str(a)) != identity
