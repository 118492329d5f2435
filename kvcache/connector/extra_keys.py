"""What about a request, besides its token ids, changes the KV of a chunk: its extra keys.

vLLM's own prefix cache folds *extra keys* into a block's hash
(``generate_block_hash_extra_keys`` in ``vllm/v1/core/kv_cache_utils.py``); equal token
ids with different extra keys are different KV, so Shoal folds the same things into a
chunk's key (``kvcache.keys``, ``link``), chunk by chunk, exactly where vLLM does::

    ("lora", name, path)        every chunk of a request with a LoRA adapter (the adapter's
                                 K/V projections change the KV; the path, because a name can
                                 be re-pointed at another adapter)
    ("mm", identifier, offset)  every multimodal input overlapping the chunk, with its start
                                 relative to the chunk (placeholder tokens are identical for
                                 every image; an image's hash is its identity)
    ("cache_salt", salt)        the first chunk only (the chain carries it to every later
                                 chunk): vLLM's per-tenant isolation of the prefix cache
    ("prompt_embeds", dtype, shape, sha256)   the chunk's rows of the prompt embeddings
                                 (their token ids are placeholders)

Invariants: a request with none of these gets ``b""`` for every chunk, so plain requests
keep their keys and share as before; the encoding (``_encode``) is injective over nested
tuples of str / bytes / int / None; anything else raises ``UnkeyableRequest``, and the
scheduler then neither loads nor saves that request (counted) instead of guessing.

The ``Request`` is duck-typed (``lora_request``, ``mm_features``, ``cache_salt``,
``prompt_embeds``), so this module needs neither vLLM nor, until a request carries
prompt embeddings, torch. ``tests/unit/test_connector_extra_keys.py`` checks that it
selects the same keys as the installed vLLM's own function.
"""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["UnkeyableRequest", "chunk_extra", "has_extra_keys"]


class UnkeyableRequest(ValueError):
    """A request whose extra keys cannot be encoded; ``reason`` names the kind."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def has_extra_keys(request: Any) -> bool:
    """Whether any chunk of ``request`` can have extra keys (cheap; no hashing)."""
    return bool(
        getattr(request, "lora_request", None)
        or getattr(request, "mm_features", None)
        or getattr(request, "cache_salt", None)
        or getattr(request, "prompt_embeds", None) is not None
    )


def chunk_extra(request: Any, start: int, end: int) -> bytes:
    """The extra-key bytes of tokens ``[start, end)`` of ``request``; ``b""`` for none.

    Raises ``UnkeyableRequest`` when something that changes the KV cannot be encoded.
    """
    keys: list[tuple[Any, ...]] = []
    lora = getattr(request, "lora_request", None)
    if lora:
        keys.append(("lora", getattr(lora, "lora_name", None), getattr(lora, "lora_path", None)))
    for feature in getattr(request, "mm_features", None) or ():
        position = feature.mm_position
        offset, length = int(position.offset), int(position.length)
        if offset < end and start < offset + length:
            identifier = getattr(feature, "identifier", None)
            if identifier is None:
                raise UnkeyableRequest("mm", "a multimodal input has no identifier (hash)")
            keys.append(("mm", identifier, offset - start))
    salt = getattr(request, "cache_salt", None)
    if salt and start == 0:
        keys.append(("cache_salt", salt))
    embeds = getattr(request, "prompt_embeds", None)
    if embeds is not None:
        keys.append(_embeds_key(embeds, start, end))
    if not keys:
        return b""
    return _encode(tuple(keys))


def _embeds_key(embeds: Any, start: int, end: int) -> tuple[Any, ...]:
    import torch

    if not isinstance(embeds, torch.Tensor):
        raise UnkeyableRequest("prompt_embeds", f"prompt embeddings of type {type(embeds)}")
    rows = embeds[start:end].detach().contiguous().cpu()
    raw = rows.reshape(-1).view(torch.uint8).numpy().tobytes()
    digest = hashlib.sha256(raw).digest()
    return ("prompt_embeds", str(rows.dtype), tuple(int(n) for n in rows.shape), digest)


def _encode(value: Any) -> bytes:
    """Tag, length, payload: an injective encoding of nested tuples of scalars."""
    if value is None:
        return b"n"
    if isinstance(value, bool):
        raise UnkeyableRequest("type", f"an extra key of type bool ({value!r})")
    if isinstance(value, int):
        raw = str(value).encode()
        return b"i" + len(raw).to_bytes(4, "little") + raw
    if isinstance(value, str):
        raw = value.encode()
        return b"s" + len(raw).to_bytes(4, "little") + raw
    if isinstance(value, bytes):
        return b"b" + len(value).to_bytes(4, "little") + value
    if isinstance(value, tuple | list):
        return b"t" + len(value).to_bytes(4, "little") + b"".join(_encode(v) for v in value)
    raise UnkeyableRequest("type", f"an extra key of type {type(value).__name__}")
