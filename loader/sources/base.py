"""The boundary every checkpoint source implements: stat, list, and ranged reads into a
caller's buffer.

A source is rooted (a directory, a bucket prefix, a URL prefix, a peer's checkpoint) and
addresses objects by a *relative* path such as ``model-00001-of-00002.safetensors``.
``check_relative_path`` rejects absolute paths, ``..`` segments, backslashes and NULs
before any source sees them, so no object outside the configured root can be named (the
sidecar takes paths from clients).

Reads land in a buffer the caller owns (a slice of a pinned staging ring, or of the
destination tensor's memory), so no source allocates per read. Sources are thread-safe:
the streamer keeps ``concurrency`` reads in flight from a thread pool, and I/O releases
the GIL. ``read_into`` either fills the whole buffer or raises a ``SourceError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from loader.errors import AccessDenied

__all__ = ["ObjectInfo", "Source", "check_relative_path"]


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    path: str  # relative to the source's root
    size: int
    identity: str  # changes whenever the bytes do (ETag, or size + mtime): a cache key


class Source(Protocol):
    uri: str  # where the root is, for messages

    def stat(self, path: str) -> ObjectInfo:
        """Size and identity of one object; ``ObjectNotFound`` if it does not exist."""
        ...

    def list(self) -> list[ObjectInfo]:
        """The objects directly under the root (no recursion), sorted by path."""
        ...

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the object's bytes ``[offset, offset + len(buffer))``."""
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
