"""Checkpoint files on a local filesystem, read with positional reads straight into the
caller's buffer (``os.preadv``: no intermediate copy, no shared file offset, so any number
of threads read one descriptor at once).

Direct reads (``O_DIRECT``) bypass the page cache: the cold-start case, where the page cache
only costs a copy. ``direct="auto"`` (the default) reads a file direct when a probe finds
the page cache holding little of it (``direct_for``), ``True`` always, ``False`` never.
Direct reads need offsets, lengths and buffer addresses aligned to 4 KiB
(``direct_alignment_for``). A read that is aligned lands straight in
the caller's memory: the streamer lays out each large tensor so that it is (its memory
starts at the block boundary before its first byte, ``stream.py``). Any other read is
widened to aligned bounds into a reusable aligned scratch buffer per thread and the wanted
bytes are copied out. If the filesystem refuses ``O_DIRECT`` (tmpfs does) the source falls
back to buffered reads. On the bench VM a cold load ran 2.0 GB/s direct against 1.0
buffered (bench/RESULTS.md, loader); a warm page cache is faster than the disk, hence the
probe rather than always direct.

How many reads are in flight depends on the same probe (issue 17): a cold disk needs the
depth (4 reads ran 0.95 GB/s cold against 2.26 at 16), so cold files get the streamer's 16;
a file the page cache holds is read by memory copies, CPU-bound work that more readers than
cores only slow down, so ``is_cached`` tells the streamer to give it fewer
(``StreamOptions.cached_concurrency``: two per core by default; bench/RESULTS.md, loader).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from loader.errors import AccessDenied, ObjectNotFound, SourceError
from loader.sources.base import ObjectInfo, advance, check_relative_path

__all__ = ["LocalSource"]

_ALIGN = 4096
_PROBE_MIN_BYTES = 1 << 20  # smaller files: the page cache, whatever it holds
_IOV_MAX = 1024  # Linux's limit on iovecs per preadv


class LocalSource:
    preferred_chunk_bytes = 16 << 20

    def __init__(self, root: str | Path, *, direct: bool | Literal["auto"] = "auto") -> None:
        """``direct``: True reads every file with ``O_DIRECT``, False none, ``"auto"`` those
        whose bytes the page cache does not hold (``direct_for``)."""
        self.root = Path(root).resolve()
        self.uri = str(self.root)
        self.direct: bool | Literal["auto"] = direct if hasattr(os, "O_DIRECT") else False
        self._lock = threading.Lock()
        self._fds: dict[tuple[str, bool], int] = {}
        self._cold: dict[str, bool] = {}  # the probe's verdict per file
        self._scratch = threading.local()

    def _resolve(self, path: str) -> Path:
        full = (self.root / check_relative_path(path)).resolve()
        if self.root not in full.parents:
            raise AccessDenied(f"{path!r} resolves outside {self.root}")
        return full

    def stat(self, path: str) -> ObjectInfo:
        full = self._resolve(path)
        try:
            st = full.stat()
        except FileNotFoundError:
            raise ObjectNotFound(f"{full}: no such file") from None
        except PermissionError:
            raise AccessDenied(f"{full}: permission denied") from None
        except OSError as exc:
            raise SourceError(f"{full}: {exc.strerror}") from None
        return ObjectInfo(path, st.st_size, f"{st.st_size}-{st.st_mtime_ns}-{st.st_ino}")

    def list(self) -> list[ObjectInfo]:
        try:
            names = sorted(e.name for e in os.scandir(self.root) if e.is_file())
        except OSError as exc:
            raise SourceError(f"{self.root}: {exc.strerror}") from None
        return [self.stat(name) for name in names]

    def _fd(self, path: str, direct: bool) -> tuple[int, bool]:
        """The descriptor reads of ``path`` use, and whether it is ``O_DIRECT`` (a
        filesystem that refuses it, as tmpfs does, turns direct reads off for good)."""
        with self._lock:
            if direct and self.direct is False:
                direct = False
            fd = self._fds.get((path, direct))
            if fd is None:
                full = self._resolve(path)
                try:
                    fd = os.open(full, os.O_RDONLY | (os.O_DIRECT if direct else 0))
                except FileNotFoundError:
                    raise ObjectNotFound(f"{full}: no such file") from None
                except PermissionError:
                    raise AccessDenied(f"{full}: permission denied") from None
                except OSError as exc:
                    if direct and exc.errno == errno.EINVAL:  # no O_DIRECT here
                        self.direct = False
                        direct = False
                        fd = self._fds.get((path, False)) or os.open(full, os.O_RDONLY)
                    else:
                        raise SourceError(f"{full}: {exc.strerror}") from None
                self._fds[(path, direct)] = fd
            return fd, direct

    def direct_for(self, path: str) -> bool:
        """Whether reads of ``path`` bypass the page cache. With ``direct="auto"``, yes when
        the cache holds little of the file: a cold start's read from the disk goes straight
        into the tensors (2x buffered reads into fresh memory on the bench VM), while a
        warm cache keeps serving copies. The probe: 4 KiB at a quarter, half and three
        quarters of the file with ``RWF_NOWAIT`` (which fails rather than wait for the
        disk); two misses of three make the file cold. Asked once per file."""
        if self.direct != "auto":
            return bool(self.direct)
        return self._is_cold(path)

    def is_cached(self, path: str) -> bool:
        """Whether reads of ``path`` are copies out of the page cache (the probe of
        ``direct_for`` finds it holding the file, and reads are not direct): CPU-bound
        work, which the streamer gives fewer readers than disk reads
        (``StreamOptions.cached_concurrency``). Asked once per file."""
        return self.direct is not True and not self._is_cold(path)

    def _is_cold(self, path: str) -> bool:
        cold = self._cold.get(path)
        if cold is None:
            cold = self._cold[path] = self._probe_cold(path)
        return cold

    def _probe_cold(self, path: str) -> bool:
        fd, _ = self._fd(path, False)
        size = os.fstat(fd).st_size
        if size < _PROBE_MIN_BYTES or not hasattr(os, "RWF_NOWAIT"):
            return False
        probe = bytearray(_ALIGN)
        misses = 0
        for quarter in (1, 2, 3):
            try:
                os.preadv(fd, [probe], size * quarter // 4 // _ALIGN * _ALIGN, os.RWF_NOWAIT)
            except BlockingIOError:
                misses += 1
            except OSError:  # RWF_NOWAIT unsupported here: keep the page cache
                return False
        return misses >= 2

    def direct_alignment_for(self, path: str) -> int:
        """What a read of ``path`` must be aligned to for ``O_DIRECT`` to land it straight
        in the caller's memory (offset, length and address); 0 when reads are buffered."""
        return _ALIGN if self.direct_for(path) else 0

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd, direct = self._fd(path, self.direct_for(path))
        if direct and len(buffers) == 1 and _aligned(offset, buffers[0]):
            self._read_in_place(path, fd, offset, buffers[0])
            return
        if direct:
            self._read_direct(path, fd, offset, buffers)
            return
        end = offset + sum(len(b) for b in buffers)
        try:
            done = read_fully(fd, offset, buffers)
        except OSError as exc:
            raise SourceError(f"{self.root / path}: read at {offset}: {exc.strerror}") from None
        if offset + done < end:
            raise SourceError(
                f"{self.root / path}: file ends before byte {end} (truncated while loading?)"
            )

    def _read_in_place(self, path: str, fd: int, offset: int, buffer: memoryview) -> None:
        """A direct read straight into the caller's aligned memory (no scratch, no copy)."""
        try:
            done = read_fully(fd, offset, [buffer], align=_ALIGN)
        except OSError as exc:
            raise SourceError(
                f"{self.root / path}: direct read at {offset}: {exc.strerror}"
            ) from None
        if done < len(buffer):
            raise SourceError(
                f"{self.root / path}: file ends before byte {offset + len(buffer)} "
                "(truncated while loading?)"
            )

    def _read_direct(self, path: str, fd: int, offset: int, buffers: Sequence[memoryview]) -> None:
        """One aligned direct read over all of ``buffers`` into this thread's scratch, then
        a copy into each."""
        length = sum(len(b) for b in buffers)
        start = offset - offset % _ALIGN
        end = -(-(offset + length) // _ALIGN) * _ALIGN
        scratch = getattr(self._scratch, "buffer", None)
        if scratch is None or len(scratch) < end - start:
            scratch = mmap.mmap(
                -1, max(end - start, 8 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            )  # page-aligned
            self._scratch.buffer = scratch
        view = memoryview(scratch)[: end - start]
        try:
            done = read_fully(fd, start, [view], align=_ALIGN)
        except OSError as exc:
            raise SourceError(
                f"{self.root / path}: direct read at {start}: {exc.strerror}"
            ) from None
        if done < offset - start + length:
            raise SourceError(f"{self.root / path}: file ends before byte {offset + length}")
        at = offset - start
        for buffer in buffers:
            buffer[:] = view[at : at + len(buffer)]
            at += len(buffer)
        view.release()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_fully(fd: int, offset: int, buffers: Sequence[memoryview], *, align: int = 0) -> int:
    """``preadv`` into ``buffers`` in turn from ``offset`` until they are full or the file
    ends; the bytes read (``OSError`` passes through). With ``align`` (direct I/O), a read
    that ends off a multiple of it is the end of the file: the next would be misaligned."""
    rest = [b for b in buffers if len(b)]
    done = 0
    while rest:
        got = os.preadv(fd, rest[:_IOV_MAX], offset + done)
        done += got
        if got == 0 or (align and got % align):
            break
        rest = advance(rest, got)
    return done


def _aligned(offset: int, buffer: memoryview) -> bool:
    """Whether a direct read at ``offset`` can land in ``buffer`` itself."""
    if offset % _ALIGN or len(buffer) % _ALIGN or buffer.readonly:
        return False
    anchor = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(anchor)
    del anchor
    return address % _ALIGN == 0
