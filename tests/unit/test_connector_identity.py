"""The model identity in block keys names immutable weights, never a moving branch (m9)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvcache.connector.identity import UnknownModelIdentity, model_identity

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
