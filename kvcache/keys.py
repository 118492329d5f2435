"""Block keys: chained, stable 128-bit identities of token chunks within a namespace.

Contract (DESIGN.md, "Block keys")::

    ns      = H128("shoal-ns-v1" | canonical(model, kv_dtype, layout, tp_rank, tp_size, extra))
    key_0   = H128(ns | 0^16       | tokens_0)
    key_i   = H128(ns | key_{i-1}  | tokens_i)          tokens_i: chunk_tokens ids, uint32 LE

``H128`` is BLAKE2b with a 16-byte digest from the standard library: keyed by nothing
that varies per process (never Python's ``hash()``, never a per-process seed), so equal
prefixes of the same model give equal keys in every process and on every machine. The
chain makes a key identify its whole prefix, which is what makes "longest cached prefix"
a sequence of plain dictionary probes. Only full chunks get keys: a partial tail chunk
can change as generation continues and is never cached.

Rejected: xxh3-128 (faster, but keys are computed per 16-512 tokens, where hashing is
noise next to the KV bytes, and a cryptographic hash makes accidental collisions across
tenants a non-issue); Python's ``hash`` of tuples (seeded per process).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

__all__ = ["KEY_BYTES", "BlockKey", "Namespace", "chain_keys", "join_keys", "split_keys"]

KEY_BYTES = 16
BlockKey = NewType("BlockKey", bytes)
"""16 bytes identifying one chunk of tokens together with its whole prefix."""

_ROOT = bytes(KEY_BYTES)
_MAX_TOKEN_ID = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes equal tokens produce different KV bytes.

    Two engines share blocks only when every field is equal: same model weights
    (``model`` should name an immutable revision), KV dtype, memory layout and the
    shard of the KV heads a tensor-parallel rank holds.
    """

    model: str
    kv_dtype: str = "bfloat16"
    layout: str = "default"
    tp_rank: int = 0
    tp_size: int = 1
    extra: str = ""

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Namespace.model must name the model (and ideally its revision)")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} must be in [0, tp_size={self.tp_size})")

    @property
    def digest(self) -> bytes:
        """A stable 16-byte identity of this namespace."""
        canonical = "\x1f".join(
            [
                "shoal-ns-v1",
                self.model,
                self.kv_dtype,
                self.layout,
                str(self.tp_rank),
                str(self.tp_size),
                self.extra,
            ]
        ).encode()
        return hashlib.blake2b(canonical, digest_size=KEY_BYTES).digest()

    def label(self) -> str:
        """A short human-readable name, used in metrics and logs."""
        return f"{self.model}/{self.kv_dtype}/{self.layout}/tp{self.tp_rank}of{self.tp_size}"


def chain_keys(
    namespace: Namespace | bytes,
    token_ids: Sequence[int],
    chunk_tokens: int,
    parent: BlockKey | None = None,
) -> list[BlockKey]:
    """Keys of every full ``chunk_tokens`` chunk of ``token_ids``.

    ``parent`` continues an existing chain (the key of the chunk just before
    ``token_ids[0]``). Raises ``ValueError`` for a non-positive chunk size or a token id
    outside ``[0, 2**32)``.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    ns = namespace.digest if isinstance(namespace, Namespace) else namespace
    if len(ns) != KEY_BYTES:
        raise ValueError(f"a namespace digest has {KEY_BYTES} bytes, got {len(ns)}")
    num_chunks = len(token_ids) // chunk_tokens
    if num_chunks == 0:
        return []
    try:
        packed = array("I", token_ids[: num_chunks * chunk_tokens])
    except OverflowError:
        raise ValueError(f"token ids must be in [0, {_MAX_TOKEN_ID}]") from None
    assert packed.itemsize == 4, "array('I') is not 32-bit on this platform"
    if array("I", [1]).tobytes() != b"\x01\x00\x00\x00":
        packed.byteswap()  # keys are defined over little-endian ids on every machine
    raw = memoryview(packed.tobytes())
    chunk_bytes = chunk_tokens * 4
    previous = parent if parent is not None else _ROOT
    keys: list[BlockKey] = []
    for start in range(0, len(raw), chunk_bytes):
        hasher = hashlib.blake2b(ns, digest_size=KEY_BYTES)
        hasher.update(previous)
        hasher.update(raw[start : start + chunk_bytes])
        previous = hasher.digest()
        keys.append(BlockKey(previous))
    return keys


def join_keys(keys: Sequence[bytes]) -> bytes:
    """Pack keys into one byte string (the wire form of a key list)."""
    for key in keys:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a block key has {KEY_BYTES} bytes, got {len(key)}")
    return b"".join(keys)


def split_keys(packed: bytes) -> list[BlockKey]:
    """Inverse of ``join_keys``; raises ``ValueError`` on a length not a multiple of 16."""
    if len(packed) % KEY_BYTES:
        raise ValueError(f"packed keys have {len(packed)} bytes, not a multiple of {KEY_BYTES}")
    return [BlockKey(packed[i : i + KEY_BYTES]) for i in range(0, len(packed), KEY_BYTES)]
