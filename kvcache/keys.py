"""Block keys: chained, stable 128-bit identities of token chunks within a namespace.

Contract (DESIGN.md, "Block keys")::

    ns      = H128("shoal-ns-v2" | field(model) | field(kv_dtype) | field(layout)
                   | field(tp_rank) | field(tp_size) | field(extra) | field(pp_rank)
                   | field(pp_size))                  field(x) = len(utf8(x)) u32 LE | utf8(x)
    key_0   = H128(ns | link(0^16, extra_0)      | tokens_0)
    key_i   = H128(ns | link(key_{i-1}, extra_i) | tokens_i)   tokens_i: chunk_tokens ids, u32 LE
    link(p, e) = p                                       if e is empty (a plain chunk)
               = H128("shoal-extra-v1" | p | e)          otherwise

``H128`` is BLAKE2b with a 16-byte digest from the standard library: keyed by nothing
that varies per process (never Python's ``hash()``, never a per-process seed), so equal
prefixes of the same model give equal keys in every process and on every machine. The
chain makes a key identify its whole prefix, which is what makes "longest cached prefix"
a sequence of plain dictionary probes. Only full chunks get keys: a partial tail chunk
can change as generation continues and is never cached.

Invariants:

1. Two different namespace field tuples never serialise equal: every field is length-
   prefixed (v1 joined them with an unescaped ``\x1f``, so ``("a\x1fb", "c")`` and
   ``("a", "b\x1fc")`` were one namespace).
2. A chunk's *extra* bytes (``extra_keys.chunk_extra``: LoRA adapter, multimodal inputs
   overlapping the chunk, cache salt, prompt embeddings) change its key and, through the
   chain, every later key, exactly where vLLM's prefix cache folds extra keys into its
   block hashes. A chunk without extras keys as it always did, so plain requests share.
3. ``link`` keeps the hashed input of every chunk at 16 + 16 + 4·chunk_tokens bytes, so a
   plain and an extra-keyed chunk can only collide through a BLAKE2b collision.

Rejected: xxh3-128 (faster, but keys are computed per 16-512 tokens, where hashing is
noise next to the KV bytes, and a cryptographic hash makes accidental collisions across
tenants a non-issue); Python's ``hash`` of tuples (seeded per process).
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType, cast

__all__ = [
    "KEY_BYTES",
    "BlockKey",
    "Namespace",
    "canonical_fields",
    "chain_keys",
    "join_keys",
    "split_keys",
]

KEY_BYTES = 16
BlockKey = NewType("BlockKey", bytes)
"""16 bytes identifying one chunk of tokens together with its whole prefix."""

_ROOT = bytes(KEY_BYTES)
_MAX_TOKEN_ID = 2**32 - 1
_WIRE_PREFIX = "shoal-ns-v2:"


def canonical_fields(*fields: str | int) -> bytes:
    """An injective byte encoding of a tuple of strings and integers: each field is its
    UTF-8 text prefixed with its length (u32 LE), so no separator needs escaping."""
    out = bytearray()
    for value in fields:
        raw = str(value).encode()
        out += len(raw).to_bytes(4, "little")
        out += raw
    return bytes(out)


@dataclass(frozen=True, slots=True)
class Namespace:
    """Everything that makes equal tokens produce different KV bytes.

    Two engines share blocks only when every field is equal: same model weights
    (``model`` must name an immutable revision or a weights identity, never a moving
    branch such as ``@main``), KV dtype, memory layout, the shard of the KV heads a
    tensor-parallel rank holds, and the layers a pipeline-parallel stage holds.
    """

    model: str
    kv_dtype: str = "bfloat16"
    layout: str = "default"
    tp_rank: int = 0
    tp_size: int = 1
    extra: str = ""
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("Namespace.model must name the model (and ideally its revision)")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank {self.tp_rank} must be in [0, tp_size={self.tp_size})")
        if not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank {self.pp_rank} must be in [0, pp_size={self.pp_size})")

    def _fields(self) -> tuple[str | int, ...]:
        return (
            self.model, self.kv_dtype, self.layout, self.tp_rank, self.tp_size, self.extra,
            self.pp_rank, self.pp_size,
        )  # fmt: skip

    @property
    def digest(self) -> bytes:
        """A stable 16-byte identity of this namespace."""
        canonical = b"shoal-ns-v2" + canonical_fields(*self._fields())
        return hashlib.blake2b(canonical, digest_size=KEY_BYTES).digest()

    def label(self) -> str:
        """A short human-readable name, used in metrics and logs (not unique: use
        ``to_wire`` where a namespace must be recovered)."""
        label = f"{self.model}/{self.kv_dtype}/{self.layout}/tp{self.tp_rank}of{self.tp_size}"
        if self.pp_size > 1:
            label += f"/pp{self.pp_rank}of{self.pp_size}"
        return label

    def to_wire(self) -> str:
        """The namespace as text that ``from_wire`` parses back exactly (engines send it
        in their hello, so the daemon learns the engines' namespace)."""
        return _WIRE_PREFIX + json.dumps(list(self._fields()), separators=(",", ":"))

    @classmethod
    def from_wire(cls, text: str) -> Namespace | None:
        """The namespace ``to_wire`` wrote, or None for any other text (a plain label)."""
        if not text.startswith(_WIRE_PREFIX):
            return None
        try:
            fields = json.loads(text[len(_WIRE_PREFIX) :])
            model, kv_dtype, layout, tp_rank, tp_size, extra, pp_rank, pp_size = fields
            strings = (model, kv_dtype, layout, extra)
            ints = (tp_rank, tp_size, pp_rank, pp_size)
            if not all(isinstance(v, str) for v in strings) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in ints
            ):
                return None
            return cls(model, kv_dtype, layout, tp_rank, tp_size, extra, pp_rank, pp_size)
        except (ValueError, TypeError):
            return None


def chain_keys(
    namespace: Namespace | bytes,
    token_ids: Sequence[int],
    chunk_tokens: int,
    parent: BlockKey | None = None,
    extras: Sequence[bytes] | None = None,
) -> list[BlockKey]:
    """Keys of every full ``chunk_tokens`` chunk of ``token_ids``.

    ``parent`` continues an existing chain (the key of the chunk just before
    ``token_ids[0]``). ``extras[i]``, if given, is chunk i's extra bytes (empty: none; see
    the module docstring); it must have one entry per full chunk. Raises ``ValueError``
    for a non-positive chunk size, a token id outside ``[0, 2**32)`` or a short ``extras``.
    """
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    ns = namespace.digest if isinstance(namespace, Namespace) else namespace
    if len(ns) != KEY_BYTES:
        raise ValueError(f"a namespace digest has {KEY_BYTES} bytes, got {len(ns)}")
    num_chunks = len(token_ids) // chunk_tokens
    if num_chunks == 0:
        return []
    if extras is not None and len(extras) < num_chunks:
        raise ValueError(f"extras has {len(extras)} entries for {num_chunks} chunks")
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
    for index, start in enumerate(range(0, len(raw), chunk_bytes)):
        link = previous
        if extras is not None and extras[index]:
            mixer = hashlib.blake2b(b"shoal-extra-v1", digest_size=KEY_BYTES)
            mixer.update(previous)
            mixer.update(extras[index])
            link = mixer.digest()
        hasher = hashlib.blake2b(ns, digest_size=KEY_BYTES)
        hasher.update(link)
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
    # No BlockKey() call per key (a Python-level call: half of this function's cost on
    # the daemon's hot path, issue 17); the slices are the keys, cast once.
    keys = [packed[i : i + KEY_BYTES] for i in range(0, len(packed), KEY_BYTES)]
    return cast("list[BlockKey]", keys)
