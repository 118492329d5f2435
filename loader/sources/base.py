"""The boundary every checkpoint source implements: stat, list, and ranged reads into a
caller's buffer.

A source is rooted (a directory, a bucket prefix, a URL prefix, a peer's checkpoint) and
addresses objects by a *relative* path such as ``model-00001-of-00002.safetensors``.
``check_relative_path`` rejects absolute paths, ``..`` segments, backslashes and NULs
before any source sees them, so no object outside the configured root can be named (the
sidecar takes paths from clients).

Reads land in a buffer the caller owns (a slice of a pinned staging ring, or of the
destination tensor's memory), so no source allocates per read. ``read_scatter`` fills
several buffers from one contiguous byte range with one request (one ``preadv`` with
several iovecs, one ranged GET whose body lands in each buffer in turn): the streamer reads
adjacent tensors, each into its own memory, without a request per tensor or a scratch copy.
A source whose objects have bytes it cannot serve between tensors (a peer holds tensor
bytes only) sets ``reads_holes = False``, and the streamer then joins only tensors that
touch. Sources are thread-safe:
the streamer keeps ``concurrency`` reads in flight from a thread pool, and I/O releases
the GIL. ``read_into`` either fills the whole buffer or raises a ``SourceError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from loader.errors import AccessDenied

__all__ = [
    "INDEX_FILE",
    "MAX_INDEX_BYTES",
    "ObjectInfo",
    "Source",
    "advance",
    "check_relative_path",
]

# A sharded checkpoint's index: one definition, for the planner and the HTTP source's listing.
INDEX_FILE = "model.safetensors.index.json"
# Real indexes are a few hundred KiB; the size comes from the source (an S3 object's, an
# HTTP server's, a peer's word), so anything larger is refused before it is allocated.
MAX_INDEX_BYTES = 64 << 20


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    path: str  # relative to the source's root
    size: int
    identity: str  # changes whenever the bytes do (ETag, or size + mtime): a cache key


class Source(Protocol):
    uri: str  # where the root is, for messages
    # The read size the streamer uses unless told otherwise: what a request costs decides
    # it (a positional read nearly nothing, an HTTP request a round trip and server work).
    preferred_chunk_bytes: int

    def stat(self, path: str) -> ObjectInfo:
        """Size and identity of one object; ``ObjectNotFound`` if it does not exist."""
        ...

    def list(self) -> list[ObjectInfo]:
        """The objects directly under the root (no recursion), sorted by path."""
        ...

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the object's bytes ``[offset, offset + len(buffer))``."""
        ...

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` in turn with the object's bytes from ``offset`` on: the first
        gets ``[offset, offset + len(b0))``, the next the bytes after those, and so on."""
        ...

    def close(self) -> None: ...


def check_relative_path(path: str) -> str:
    """``path`` if it names an object under a root, else ``AccessDenied`` naming it."""
    if (
        not path
        or path.startswith(("/", "\\"))
        or "\\" in path
        or "\x00" in path
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise AccessDenied(f"refusing object path {path!r}: it must stay under the root")
    return path


def advance(buffers: Sequence[memoryview], count: int) -> list[memoryview]:
    """What is left of ``buffers`` once their first ``count`` bytes are filled."""
    rest = list(buffers)
    while rest and count >= len(rest[0]):
        count -= len(rest.pop(0))
    if rest and count:
        rest[0] = rest[0][count:]
    return rest
