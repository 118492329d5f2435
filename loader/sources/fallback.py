"""A peer that can die: read from the peer sidecar, and from the checkpoint's origin once
the peer fails, in the middle of a load too.

The 1→N scale-out reads from a peer so that N replicas do not all hit object storage; the
peer is a shortcut, not the only copy. When a read from the peer fails with
``SourceUnavailable`` (the peer died, was drained, or stopped answering within its
deadline), ``UnknownCheckpoint`` (it evicted the checkpoint) or ``StagingConflict`` (it
staged it again), this source opens the origin once, and that read and every later one go there.
Bytes that already came from the peer stay: the origin must hold the very same files, so
before the first origin read of each file its size and identity (ETag, or size + mtime +
inode for local files) are compared with the ones the peer staged, and a file that changed
since fails the load (``SourceError``) instead of mixing two versions in one load.

Errors that are about the request, not the peer's health (a path outside the checkpoint,
bytes outside a file) pass through unchanged: the origin would refuse them too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

from loader.errors import SourceError, SourceUnavailable, StagingConflict, UnknownCheckpoint
from loader.sources.base import ObjectInfo, Source
from loader.sources.peer import PeerSource

__all__ = ["PeerWithFallback"]

log = logging.getLogger("shoal." + __name__)
T = TypeVar("T")
# The peer is gone, dropped the checkpoint, or staged it again: the origin serves the rest.
_PEER_LOST = (SourceUnavailable, UnknownCheckpoint, StagingConflict)


class PeerWithFallback:
    """``peer``'s files, read from ``open_origin()`` once the peer is unavailable."""

    def __init__(self, peer: PeerSource, open_origin: Callable[[], Source]) -> None:
        self.peer = peer
        self.uri = peer.uri
        self.preferred_chunk_bytes = peer.preferred_chunk_bytes
        self.reads_holes = peer.reads_holes
        self._open_origin = open_origin
        self._lock = threading.Lock()
        self._origin: Source | None = None
        self._checked: set[str] = set()

    @property
    def origin(self) -> Source | None:
        """The origin, once the peer failed (else ``None``)."""
        return self._origin

    def stat(self, path: str) -> ObjectInfo:
        return self._call(lambda source: source.stat(path))

    def list(self) -> list[ObjectInfo]:
        return self._call(lambda source: source.list())

    def published_digest(self, path: str, offset: int, nbytes: int) -> str | None:
        """The peer's digest of that tensor (also checks the origin's bytes once the peer
        failed: the origin serves the very files the peer staged), if the peer answered."""
        try:
            return self.peer.published_digest(path, offset, nbytes)
        except _PEER_LOST:
            return None

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        if self._origin is None:
            try:
                self.peer.read_scatter(path, offset, buffers)
                return
            except _PEER_LOST as exc:
                self._fail_over(exc)
        self._checked_origin(path).read_scatter(path, offset, buffers)

    def close(self) -> None:
        self.peer.close()
        if self._origin is not None:
            self._origin.close()

    def _call(self, call: Callable[[Source], T]) -> T:
        if self._origin is None:
            try:
                return call(self.peer)
            except _PEER_LOST as exc:
                self._fail_over(exc)
        assert self._origin is not None
        return call(self._origin)

    def _fail_over(self, cause: Exception) -> None:
        with self._lock:
            if self._origin is None:
                log.warning(
                    "peer %s failed (%s); reading the rest from the origin %s",
                    self.peer.target, cause, self.peer.checkpoint_uri,
                )  # fmt: skip
                self._origin = self._open_origin()

    def _checked_origin(self, path: str) -> Source:
        origin = self._origin
        assert origin is not None
        if path in self._checked:
            return origin
        try:
            staged = {info.path: info for info in self.peer.files().files}.get(path)
        except _PEER_LOST:  # never reached, or dropped it: nothing of it to mix with
            staged = None
        now = origin.stat(path)
        if staged is not None and (staged.size, staged.identity) != (now.size, now.identity):
            where = f"{self.peer.checkpoint_uri.rstrip('/')}/{path}"
            raise SourceError(
                f"{where}: the origin's copy changed since the peer staged it "
                f"(size {staged.size} -> {now.size}, identity {staged.identity} -> "
                f"{now.identity}); the peer failed mid-load, so this load cannot finish "
                "without mixing versions: load again"
            )
        with self._lock:
            self._checked.add(path)
        return origin
