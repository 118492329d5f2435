"""A write-through local disk cache in front of any source, keyed by object identity.

The first load from S3 or HTTP writes every byte it reads into a local file at the same
offset (``os.pwrite`` from the reader thread that already holds the bytes: no second
download). Once a file's bytes are all written, its copy is published atomically::

    <cache_dir>/<sha256(source uri)[:16]>/<path>               the complete copy
    <cache_dir>/<sha256(source uri)[:16]>/<path>.identity      the identity it was made from
    <cache_dir>/<sha256(source uri)[:16]>/<path>.digest        xxh3-128 of the whole copy
    <cache_dir>/<sha256(source uri)[:16]>/<path>.part          bytes of a load in progress
    <cache_dir>/<sha256(source uri)[:16]>/<path>.part.ranges   "begin end xxh3-128" lines

The next load stats the object at the source (one HEAD or its equivalent) and, when the
identity (ETag, or size and mtime) still matches the copy's, reads the local file instead;
a changed object is fetched again. A load that reads only part of a file (a tensor-parallel
slice) leaves a ``.part`` that later loads keep filling; it is never read from until
complete. Writes that fail (full disk) disable caching for the file, never the load.

Never serve a hole or a flipped bit (M14):

1. A partial copy's data is ``fsync``-ed before the ranges that describe it are written
   (to a temporary file, fsync-ed, renamed), so after a power loss the ranges file never
   claims bytes the disk does not hold.
2. Each recorded range carries the xxh3-128 of its bytes; a later load re-reads and checks
   every range before trusting it, and refetches any that does not match (a ranges file
   that lies, from a bug, a crash of an older version or a hand edit, costs a refetch).
3. A complete copy is published with the digest of the whole file, computed over the
   bytes just written (read back, then fsync-ed, then renamed into place with the
   directory fsync-ed). The first open of a copy in a ``CachedSource`` reads it whole and
   checks the digest; a copy that is short, has no digest or does not match is deleted
   and the object is fetched from the source again. It is never served.

xxh3-128 rather than SHA-256: the cache directory is this user's (0700), so the threat is
crashes and bit rot, not forgery, and verifying a 16 GB copy on open costs ~2 s instead of
~10 s. The digest is computed when the copy completes, not as each read lands: reads land
out of order, from many threads, and a running hash needs them in order.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import xxhash

from loader.errors import SourceError
from loader.sources.base import ObjectInfo, Source, check_relative_path
from loader.sources.local import read_fully

__all__ = ["CachedSource"]

log = logging.getLogger("shoal." + __name__)

_Ranges = list[tuple[int, int]]  # (the class below has a method named list)
_HASH_BLOCK = 8 << 20  # bytes read at a time to hash a file or a range


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

    def published_digest(self, path: str, offset: int, nbytes: int) -> str | None:
        """The inner source's digest of a tensor, if it publishes any (a peer)."""
        published = getattr(self.inner, "published_digest", None)
        return published(path, offset, nbytes) if published is not None else None

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
        problem = self._verify_copy(path, fd, info.size)
        if problem:
            os.close(fd)
            log.warning("discarding the cached copy of %s: %s; fetching it again", path, problem)
            for suffix in ("", ".identity", ".digest"):
                Path(f"{final}{suffix}").unlink(missing_ok=True)
            return None
        with self._lock:
            if path in self._local:
                os.close(fd)
                return self._local[path]
            self._local[path] = fd
        return fd

    def _verify_copy(self, path: str, fd: int, size: int) -> str:
        """What is wrong with a published copy (empty if nothing): point 3."""
        if os.fstat(fd).st_size != size:
            return f"{os.fstat(fd).st_size} bytes, the object has {size}"
        try:
            expected = (self.dir / f"{path}.digest").read_text().strip()
        except OSError:
            return "no digest was recorded with it"
        actual = _digest(fd, 0, size)
        if actual != expected:
            return f"its bytes hash to {actual}, {expected} was recorded"
        return ""

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
                part.ranges = [] if stale else self._load_ranges(path, fd)
                self._parts[path] = part
            return None if part.failed else part

    def _load_ranges(self, path: str, fd: int) -> _Ranges:
        """The recorded ranges whose bytes in the ``.part`` still hash as recorded (point 2)."""
        try:
            text = (self.dir / f"{path}.part.ranges").read_text()
        except OSError:
            return []
        trusted: _Ranges = []
        for line in text.splitlines():
            fields = line.split()
            try:
                begin, end, digest = int(fields[0]), int(fields[1]), fields[2]
            except (IndexError, ValueError):
                log.warning("cache %s: ignoring ranges line %r", path, line)
                continue
            if 0 <= begin < end <= os.fstat(fd).st_size and _digest(fd, begin, end) == digest:
                trusted.append((begin, end))
            else:
                log.warning("cache %s: bytes [%d, %d) are not what was recorded; refetching",
                            path, begin, end)  # fmt: skip
        return trusted

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
                _write_durably(Path(f"{base}.part.digest"), _digest(part.fd, 0, part.size))
                os.fsync(part.fd)
                os.replace(f"{base}.part", base)
                os.replace(f"{base}.part.digest", f"{base}.digest")
                os.replace(f"{base}.part.identity", f"{base}.identity")
                Path(f"{base}.part.ranges").unlink(missing_ok=True)
                _fsync_directory(base.parent)
            else:
                os.fsync(part.fd)  # the data first: the ranges must never claim a hole
                lines = (f"{a} {b} {_digest(part.fd, a, b)}\n" for a, b in part.ranges)
                _write_durably(Path(f"{base}.part.ranges"), "".join(lines))
        except OSError as exc:
            log.warning("could not settle the cached copy of %s: %s", path, exc)
        finally:
            os.close(part.fd)


def _digest(fd: int, begin: int, end: int) -> str:
    """xxh3-128 (hex) of bytes ``[begin, end)`` of ``fd``; a short file hashes what it has
    (and so matches nothing recorded for the full range)."""
    hasher = xxhash.xxh3_128()
    offset = begin
    while offset < end:
        chunk = os.pread(fd, min(_HASH_BLOCK, end - offset), offset)
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.hexdigest() if offset == end else f"short@{offset}"


def _write_durably(path: Path, text: str) -> None:
    """``path`` holds ``text`` after a crash, or its previous content: never a torn write."""
    staging = path.with_name(f".{path.name}.tmp")
    with staging.open("w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(staging, path)


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
