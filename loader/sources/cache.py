"""A write-through local disk cache in front of any source, keyed by object identity.

The first load from S3 or HTTP writes every byte it reads into a local file at the same
offset (``os.pwrite`` from the reader thread that already holds the bytes: no second
download). Once a file's bytes are all written, its copy is published atomically::

    <cache_dir>/<sha256(source uri)[:16]>/<path>             the complete copy
    <cache_dir>/<sha256(source uri)[:16]>/<path>.identity    the identity it was made from
    <cache_dir>/<sha256(source uri)[:16]>/<path>.part        bytes of a load in progress

The next load stats the object at the source (one HEAD or its equivalent) and, when the
identity (ETag, or size and mtime) still matches the copy's, reads the local file instead;
a changed object is fetched again. A load that reads only part of a file (a tensor-parallel
slice) leaves a ``.part`` that later loads keep filling; it is never read from until
complete. Writes that fail (full disk) disable caching for the file, never the load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from loader.errors import SourceError
from loader.sources.base import ObjectInfo, Source, check_relative_path
from loader.sources.local import read_fully

__all__ = ["CachedSource"]

log = logging.getLogger("shoal." + __name__)

_Ranges = list[tuple[int, int]]  # (the class below has a method named list)


class _Part:
    """Byte ranges of one file written so far (merged intervals)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.ranges: list[tuple[int, int]] = []
        self.failed = False

    def add(self, start: int, end: int) -> None:
        merged: list[tuple[int, int]] = []
        for a, b in sorted([*self.ranges, (start, end)]):
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        self.ranges = merged

    @property
    def complete(self) -> bool:
        return self.ranges == [(0, self.size)] or self.size == 0


class CachedSource:
    def __init__(self, inner: Source, cache_dir: str | Path) -> None:
        self.inner = inner
        self.uri = inner.uri
        self.preferred_chunk_bytes = inner.preferred_chunk_bytes  # misses cost what it costs
        self.reads_holes = getattr(inner, "reads_holes", True)
        digest = hashlib.sha256(inner.uri.encode()).hexdigest()[:16]
        self.dir = Path(cache_dir) / digest
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._info: dict[str, ObjectInfo] = {}
        self._local: dict[str, int] = {}  # path -> fd of a complete, matching copy
        self._parts: dict[str, _Part] = {}
        self.hits = 0
        self.misses = 0

    def stat(self, path: str) -> ObjectInfo:
        with self._lock:
            info = self._info.get(path)
        if info is None:
            info = self.inner.stat(check_relative_path(path))
            with self._lock:
                self._info[path] = info
        return info

    def list(self) -> list[ObjectInfo]:
        return self.inner.list()

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd = self._copy_of(path)
        if fd is not None:
            self._pread(path, fd, offset, buffers)
            self.hits += 1
            return
        self.inner.read_scatter(path, offset, buffers)
        self.misses += 1
        for buffer in buffers:
            self._write(path, offset, buffer)
            offset += len(buffer)

    def close(self) -> None:
        with self._lock:
            for path, part in list(self._parts.items()):
                self._settle(path, part)
            for fd in self._local.values():
                os.close(fd)
            self._local.clear()
        self.inner.close()

    # -- internals --------------------------------------------------------------------

    def _copy_of(self, path: str) -> int | None:
        with self._lock:
            if path in self._local:
                return self._local[path]
        info = self.stat(path)
        final = self.dir / path
        try:
            identity = (self.dir / f"{path}.identity").read_text()
        except OSError:
            return None
        if identity != info.identity:
            return None
        try:
            fd = os.open(final, os.O_RDONLY)
        except OSError:
            return None
        if os.fstat(fd).st_size != info.size:
            os.close(fd)
            return None
        with self._lock:
            if path in self._local:
                os.close(fd)
                return self._local[path]
            self._local[path] = fd
        return fd

    def _pread(self, path: str, fd: int, offset: int, buffers: Sequence[memoryview]) -> None:
        if read_fully(fd, offset, buffers) < sum(len(b) for b in buffers):
            raise SourceError(f"cached copy of {path} in {self.dir} ends early")

    def _part(self, path: str) -> _Part | None:
        with self._lock:
            part = self._parts.get(path)
            if part is None:
                info = self._info[path]
                target = self.dir / f"{path}.part"
                try:
                    stale = (self.dir / f"{path}.part.identity").read_text() != info.identity
                except OSError:
                    stale = True
                try:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if stale:
                        target.unlink(missing_ok=True)
                        (self.dir / f"{path}.part.identity").write_text(info.identity)
                    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
                    os.ftruncate(fd, info.size)
                except OSError as exc:
                    log.warning("not caching %s: %s", path, exc)
                    return None
                part = _Part(fd, info.size)
                part.ranges = [] if stale else self._load_ranges(path)
                self._parts[path] = part
            return None if part.failed else part

    def _load_ranges(self, path: str) -> _Ranges:
        try:
            text = (self.dir / f"{path}.part.ranges").read_text()
            return [(int(a), int(b)) for a, b in (line.split() for line in text.splitlines())]
        except (OSError, ValueError):
            return []

    def _write(self, path: str, offset: int, buffer: memoryview) -> None:
        part = self._part(path)
        if part is None:
            return
        try:
            done = 0
            while done < len(buffer):
                done += os.pwrite(part.fd, buffer[done:], offset + done)
        except OSError as exc:
            part.failed = True
            log.warning("not caching %s any more: %s", path, exc)
            return
        with self._lock:
            part.add(offset, offset + len(buffer))

    def _settle(self, path: str, part: _Part) -> None:
        """Publish a complete copy, or remember how far a partial one got."""
        del self._parts[path]
        base = self.dir / path
        try:
            if part.failed:
                Path(f"{base}.part").unlink(missing_ok=True)
            elif part.complete:
                os.fsync(part.fd)
                os.replace(f"{base}.part", base)
                os.replace(f"{base}.part.identity", f"{base}.identity")
                Path(f"{base}.part.ranges").unlink(missing_ok=True)
            else:
                Path(f"{base}.part.ranges").write_text(
                    "".join(f"{a} {b}\n" for a, b in part.ranges)
                )
        except OSError as exc:
            log.warning("could not settle the cached copy of %s: %s", path, exc)
        finally:
            os.close(part.fd)
