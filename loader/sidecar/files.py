"""A staged checkpoint presented as the files it came from, so that a peer replica can read
them from this sidecar instead of from object storage (issue 5: in a 1→N scale-out the N
new replicas read from the one that holds the checkpoint; ``loader.sources.peer``).

The segment holds tensors, not files. What the files held besides tensor bytes is kept
beside it, per file: its size and identity at the origin, its *prefix* (the bytes read
while planning: a shard's 8-byte length and JSON header, all of an index), and where each
tensor's file range lies in the segment::

    file      0          data_start  b0       e0=b1         e1=b2    e2   size
              ┌──────────────────────┬─────────┬─────────────┬───────┬────┐
              │ prefix (kept bytes)  │ tensor 0│  tensor 1   │  ...  │hole│
              └──────────────────────┴────┬────┴──────┬──────┴───────┴────┘
                                          │           │   extents: (b, e - b, offset)
    segment   ... ┌──────────┬─────┬──────▼───┬───────▼─────┬─────┬── ...
                  │ header   │ pad │ tensor 0 │ pad │ tensor 1    │ pad │
                  └──────────┴─────┴──────────┴─────┴─────────────┴─────┴── ...
                                   offset0          offset1

1. Only a checkpoint staged whole (``tp_size`` 1) holds every tensor's bytes as they lie
   in its file; a sliced staging holds one rank's rows or columns, which are no file's
   bytes, so it has no ``StagedFiles`` and is refused (``StagingConflict``).
2. Bytes no prefix and no extent covers (holes the format allows, tensors an index assigns
   to another shard, and so never staged) are not stored: a read touching one is refused
   with a ``SourceError`` naming the range. Never invented zeros.
3. Extents are sorted by file offset and disjoint (the plan refused overlapping tensors),
   and each lies after its file's prefix; empty tensors have none.
4. ``token`` is the staging's segment token: a reader that names it is refused once the
   checkpoint was staged again (evicted and re-staged: perhaps other bytes), so one load
   never mixes two stagings.
5. Digests (M5): each file's prefix and each tensor's bytes carry the SHA-256 computed
   while staging (``prefix_sha256``, ``TensorDigest``), sent with the file table, so a
   reader verifies what it reads (``loader.sources.peer``) against what was staged.

No torch, no gRPC: the staging thread builds these values, the service serves them.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loader.errors import ObjectNotFound, SourceError

if TYPE_CHECKING:
    from loader.plan import TensorPlan
    from loader.sources.base import ObjectInfo

__all__ = ["Span", "StagedFile", "StagedFiles", "TensorDigest", "file_spans", "staged_files"]


@dataclass(frozen=True, slots=True)
class StagedFile:
    path: str
    size: int
    identity: str  # the origin's (ETag, or size + mtime)
    prefix: bytes  # the file's bytes [0, len(prefix))
    extents: tuple[tuple[int, int, int], ...]  # (file offset, nbytes, segment offset), sorted
    prefix_sha256: str = ""  # hex SHA-256 of prefix


@dataclass(frozen=True, slots=True)
class TensorDigest:
    """Where one staged tensor's bytes lie in its file, and their SHA-256 (point 5)."""

    name: str
    path: str
    offset: int
    nbytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class StagedFiles:
    checkpoint_id: str
    token: bytes
    files: tuple[StagedFile, ...]  # in the order they were read: the index first, if any
    digests: tuple[TensorDigest, ...] = ()

    def file(self, path: str) -> StagedFile:
        for staged in self.files:
            if staged.path == path:
                return staged
        raise ObjectNotFound(
            f"the staged checkpoint {self.checkpoint_id} has no file {path!r} "
            f"(it has {', '.join(f.path for f in self.files)})"
        )


@dataclass(frozen=True, slots=True)
class Span:
    """One piece of a file range: ``length`` bytes from ``start`` in the file's prefix, or
    in the segment when ``in_segment``."""

    in_segment: bool
    start: int
    length: int


def staged_files(
    checkpoint_id: str,
    token: bytes,
    objects: Sequence[ObjectInfo],
    prefixes: Mapping[str, bytes],
    plans: Sequence[TensorPlan],
    offsets: Sequence[int],
    sha256: Mapping[str, str] | None = None,
) -> StagedFiles:
    """The files of a whole staging: ``plans`` placed at ``offsets`` in the segment;
    ``sha256``: tensor name -> hex digest of its bytes, as staged."""
    extents: dict[str, list[tuple[int, int, int]]] = {o.path: [] for o in objects}
    digests: list[TensorDigest] = []
    for plan, offset in zip(plans, offsets, strict=True):
        assert len(plan.ranges) <= 1, f"{plan.name} is sliced: only whole stagings have files"
        for begin, nbytes in plan.ranges:
            if nbytes:
                extents[plan.path].append((begin, nbytes, offset))
            if sha256 and plan.name in sha256:
                digests.append(TensorDigest(plan.name, plan.path, begin, nbytes,
                                            sha256[plan.name]))  # fmt: skip
    files = []
    for o in objects:
        prefix = prefixes.get(o.path, b"")
        files.append(StagedFile(o.path, o.size, o.identity, prefix,
                                tuple(sorted(extents[o.path])),
                                hashlib.sha256(prefix).hexdigest()))  # fmt: skip
    return StagedFiles(checkpoint_id, token, tuple(files), tuple(digests))


def file_spans(staged: StagedFile, offset: int, length: int) -> list[Span]:
    """The spans that make up bytes ``[offset, offset + length)`` of ``staged``, in order;
    ``SourceError`` if the range leaves the file or touches bytes not held (point 2)."""
    end = offset + length
    if offset < 0 or length < 0 or end > staged.size:
        raise SourceError(
            f"{staged.path}: bytes [{offset}, {end}) are outside its {staged.size} bytes"
        )
    spans: list[Span] = []
    cursor = offset
    begins = [begin for begin, _, _ in staged.extents]
    while cursor < end:
        if cursor < len(staged.prefix):
            take = min(end, len(staged.prefix)) - cursor
            spans.append(Span(False, cursor, take))
            cursor += take
            continue
        i = bisect.bisect_right(begins, cursor) - 1
        if i >= 0:
            begin, nbytes, segment_offset = staged.extents[i]
            if cursor < begin + nbytes:
                take = min(end, begin + nbytes) - cursor
                spans.append(Span(True, segment_offset + cursor - begin, take))
                cursor += take
                continue
        hole_end = begins[i + 1] if i + 1 < len(begins) else staged.size
        raise SourceError(
            f"{staged.path}: bytes [{cursor}, {hole_end}) lie outside the header and every "
            "staged tensor, so this peer does not hold them (read tensor ranges only)"
        )
    return spans
