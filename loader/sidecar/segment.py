"""The staged-segment format, and the values that describe a staging on both sides of the
wire (no torch, no gRPC: the operator commands import only this).

Segment ``<shm_dir>/shoal-loader-<name>-<checkpoint id>`` (mode 0600)::

    0        64             4096        4096 + a0          ...                   size
    ┌────────┬──────────────┬───────────┬─────┬───────────┬─────┬──── ─ ─ ──┬─────┐
    │ header │ zero padding │ tensor 0  │ pad │ tensor 1  │ pad │  ...       │ pad │
    └────────┴──────────────┴───────────┴─────┴───────────┴─────┴──── ─ ─ ──┴─────┘
    header (little endian): magic "SHOALLD1" | u32 version | u32 data offset (4096) |
                            u64 segment bytes | 16 B token

1. Tensors are laid out in the checkpoint's file order (whatever order they are streamed
   in), each at a 4096-aligned offset: every dtype is aligned, O_DIRECT reads could land in
   place, and a client may page-lock (``cudaHostRegister``) any tensor range. The padding
   costs < 4 KiB a tensor (< 1 MiB for a 1B Llama's ~150 tensors).
2. The table (name, dtype, shape, offset, nbytes) travels over gRPC, not in the segment:
   the segment is only bytes, so a client can never misparse a half-written table.
3. The token is random per staging and sent with the table; a client checks it after
   mapping, so a path reused by a later staging of the same id is never mistaken for the
   one it was told about.
4. Space is reserved with ``posix_fallocate`` before any byte is written: on a full tmpfs
   writing through a mapping raises SIGBUS and kills the process, fallocate fails cleanly
   (``CapacityExceeded``).

Identity: ``(uri, tp_rank, tp_size)`` names the bytes, so that is the id (16 hex digits of a
SHA-256). ``order``, rate and digests only shape *how* it is staged, so a second caller with
another order joins the staging under way instead of staging the same bytes twice.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from loader.plan import TensorPlan

__all__ = [
    "ALIGN",
    "DATA_OFFSET",
    "HEADER",
    "SEGMENT_MAGIC",
    "SEGMENT_VERSION",
    "StageSpec",
    "StagedTable",
    "StagedTensor",
    "StagingInfo",
    "State",
    "layout",
    "read_segment_header",
]

State = Literal["staging", "ready", "failed"]
SEGMENT_MAGIC = b"SHOALLD1"
SEGMENT_VERSION = 1
DATA_OFFSET = 4096
ALIGN = 4096
HEADER = struct.Struct("<8sIIQ16s")


@dataclass(frozen=True, slots=True)
class StageSpec:
    """What a caller asks to stage. Raises ``ValueError`` naming a bad field."""

    uri: str
    tp_rank: int = 0
    tp_size: int = 1
    order: str = "file"
    rate_bytes_per_s: float = 0.0
    digests: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("uri is empty")
        if "://" not in self.uri and not self.uri.startswith("/"):
            raise ValueError(f"uri {self.uri!r}: a local path must be absolute")
        if not 0 <= self.tp_rank < max(self.tp_size, 1):
            raise ValueError(f"tp rank {self.tp_rank} must be in [0, {self.tp_size})")
        if self.order not in ("file", "layers"):
            raise ValueError(f"order {self.order!r} must be file or layers")
        if self.rate_bytes_per_s < 0:
            raise ValueError("rate_bytes_per_s must be >= 0")

    @property
    def checkpoint_id(self) -> str:
        identity = f"{self.uri}\0{self.tp_rank}\0{max(self.tp_size, 1)}"
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class StagedTensor:
    name: str
    dtype: str  # safetensors name: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int  # in the segment file
    nbytes: int
    sha256: str = ""  # hex, of its bytes as staged (computed while staging; M5)


@dataclass(frozen=True, slots=True)
class StagedTable:
    checkpoint_id: str
    segment_path: str
    segment_bytes: int
    token: bytes
    tensors: tuple[StagedTensor, ...]
    staging_s: float


@dataclass(frozen=True, slots=True)
class StagingInfo:
    checkpoint_id: str
    uri: str
    tp_rank: int
    tp_size: int
    bytes: int  # segment size; 0 while planning
    state: State
    age_s: float
    bytes_done: int
    num_loads: int
    error: str = ""  # state "failed" (a detached staging): "<Kind>: <message>"


def layout(plans: Sequence[TensorPlan]) -> tuple[list[int], int]:
    """Offsets of ``plans`` in a segment (point 1 above) and the segment's size."""
    offsets: list[int] = []
    cursor = DATA_OFFSET
    for plan in plans:
        offsets.append(cursor)
        cursor += -(-plan.nbytes // ALIGN) * ALIGN
    return offsets, cursor


def read_segment_header(raw: bytes) -> tuple[int, bytes]:
    """(segment bytes, token) of a segment header; ``ValueError`` if it is not one."""
    if len(raw) < HEADER.size:
        raise ValueError("too short for a loader segment header")
    magic, version, data_offset, size, token = HEADER.unpack_from(raw)
    if magic != SEGMENT_MAGIC or version != SEGMENT_VERSION or data_offset != DATA_OFFSET:
        raise ValueError("not a loader segment of this version")
    return size, token
