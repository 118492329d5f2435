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
   name and size and 64 KiB samples of its bytes: the start (a safetensors header holds
   every tensor's name, dtype, shape and offsets), the middle, the end, and one window in
   every 64 MiB between (at most 4,096 a file: 0.1% of the bytes, ~16 MiB read for a 16 GB model),
   plus ``config.json``. Copies of the same checkpoint on different machines or paths
   agree (no mtimes or inodes are used); rewritten weights change it. It is a sampled
   identity, not a full hash (hashing every byte would cost each engine start tens of
   seconds): a change confined to bytes no window covers goes unseen. Changes to weights
   are dense in practice (a merged LoRA adapter or a fine-tune rewrites whole q/k/v
   matrices, one in every few 64 MiB stretches), so they are seen; name the revision in
   ``model_id`` if weights are patched sparsely in place.
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

__all__ = ["UnknownModelIdentity", "model_identity", "sample_offsets", "weights_digest"]

_COMMIT = re.compile(r"[0-9a-f]{40}")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".npz")
_SAMPLE = 64 << 10
_STRIDE = 64 << 20  # one sample window in every stretch this long
_MAX_SAMPLES = 4096  # per file: a longer file spreads its windows wider


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
    hasher = hashlib.blake2b(b"shoal-weights-v2", digest_size=16)
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
            for offset in sample_offsets(size):
                handle.seek(offset)
                hasher.update(handle.read(_SAMPLE))
    return hasher.hexdigest()


def sample_offsets(size: int) -> list[int]:
    """Where ``weights_digest`` reads its 64 KiB windows in a file of ``size`` bytes: the
    start, the end, and the middle of every ``_STRIDE`` stretch (wider stretches past
    ``_MAX_SAMPLES`` windows), sorted and distinct."""
    last = max(0, size - _SAMPLE)
    stride = max(_STRIDE, -(-size // _MAX_SAMPLES))
    middles = [*range(stride // 2, size, stride), size // 2 - _SAMPLE // 2]
    return sorted({0, last, *(min(max(0, m), last) for m in middles)})


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
