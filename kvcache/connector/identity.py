"""The model identity in the connector's block keys: which weights produced the KV.

KV bytes depend on the exact weights, so the namespace's ``model`` must change whenever
the weights do and stay equal wherever they are equal (every engine process, every node).
A branch name does neither: ``"<model>@main"`` (the connector's default before review m9)
keeps serving KV computed by the old weights after the branch moves. In order:

1. ``model_id`` from ``kv_connector_extra_config``: the operator's word, used as given.
2. A Hub commit: vLLM (0.33+) resolves ``--revision`` to a commit once at start
   (``huggingface_hub.ResolvedRevision``, whose ``.resolved`` is the hash); a revision that
   already is a 40-hex commit counts too. Identity: ``<repo>@<commit>``.
3. A local directory: ``<dir name>@weights-<digest>``, the digest over every weight file's
   name and size and three 64 KiB samples of its bytes (start, middle, end; the start holds
   a safetensors header with every tensor's name, dtype, shape and offsets) plus
   ``config.json``. Copies of the same checkpoint on different machines or paths agree;
   rewritten weights change it. It is a sampled identity, not a full hash: a change that
   touches none of the sampled bytes and no file size goes unseen (name the revision in
   ``model_id`` if weights are patched in place).
4. A Hub repo id whose commit vLLM did not resolve: the commit its local cache's
   ``refs/<revision>`` file records (offline; the cache is what vLLM loaded from).

Otherwise ``UnknownModelIdentity`` asks for ``model_id`` instead of guessing.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

__all__ = ["UnknownModelIdentity", "model_identity", "weights_digest"]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
_SAMPLE = 64 << 10


class UnknownModelIdentity(ValueError):
    """No immutable identity of the model's weights could be found."""


def model_identity(model: str, revision: Any = None) -> str:
    """The immutable identity of ``model`` (a Hub repo id or a local directory) at
    ``revision`` (see the module docstring); raises ``UnknownModelIdentity``."""
    resolved = getattr(revision, "resolved", None)
    if isinstance(resolved, str) and _COMMIT.fullmatch(resolved):
        return f"{model}@{resolved}"
    if isinstance(revision, str) and _COMMIT.fullmatch(revision):
        return f"{model}@{revision}"
    path = Path(model)
    if path.is_dir():
        return f"{path.resolve().name}@weights-{weights_digest(path)}"
    commit = _cached_commit(model, str(revision) if revision else "main")
    if commit:
        return f"{model}@{commit}"
    raise UnknownModelIdentity(
        f"ShoalConnector: cannot tell which weights {model!r} at revision "
        f"{revision or 'main'!r} is (no commit hash, not a local directory); set "
        "kv_connector_extra_config model_id to an immutable identity (e.g. MODEL@COMMIT)"
    )


def weights_digest(directory: Path) -> str:
    """A 32-hex digest of the weight files in ``directory`` (sampled; module docstring)."""
    hasher = hashlib.blake2b(b"shoal-weights-v1", digest_size=16)
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES))
    )
    for path in files:
        size = path.stat().st_size
        name = path.name.encode()
        hasher.update(len(name).to_bytes(4, "little") + name + size.to_bytes(8, "little"))
        with path.open("rb") as handle:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                handle.seek(offset)
                hasher.update(handle.read(_SAMPLE))
    return hasher.hexdigest()


def _cached_commit(repo_id: str, revision: str) -> str | None:
    """The commit the local Hugging Face cache's ``refs/<revision>`` records, if any."""
    if "/" not in repo_id or repo_id.startswith(("/", ".", "s3://", "gs://")):
        return None
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(Path.home(), ".cache", "huggingface")), "hub"
    )
    ref = Path(home) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    try:
        commit = ref.read_text().strip()
    except OSError:
        return None
    return commit if _COMMIT.fullmatch(commit) else None
