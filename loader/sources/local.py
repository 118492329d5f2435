"""Checkpoint files on a local filesystem, read with positional reads straight into the
caller's buffer (``os.preadv``: no intermediate copy, no shared file offset, so any number
of threads read one descriptor at once).

``direct=True`` opens files with ``O_DIRECT``: reads bypass the page cache (the cold-start
case, where the page cache only costs a copy), which requires offsets, lengths and buffer
addresses aligned to 4 KiB (``direct_alignment``). A read that is aligned lands straight in
the caller's memory: the streamer lays out each large tensor so that it is (its memory
starts at the block boundary before its first byte, ``stream.py``). Any other read is
widened to aligned bounds into a reusable aligned scratch buffer per thread and the wanted
bytes are copied out. If the filesystem refuses ``O_DIRECT`` (tmpfs does) the source falls
back to buffered reads. Direct reads bypass a warm page cache too, so they are the choice
for a cold start (2.4x buffered reads into fresh memory on the bench VM), not the default.

Local loads keep the streamer's 16 reads in flight, like remote ones: a cold disk needs the
depth (4 reads ran 0.95 GB/s cold against 2.26 at 16), and a warm page cache gains little
from fewer (4.0 against 3.6 GB/s, within this machine's noise; bench/RESULTS.md, loader).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from loader.errors import AccessDenied, ObjectNotFound, SourceError
from loader.sources.base import ObjectInfo, advance, check_relative_path

__all__ = ["LocalSource"]

_ALIGN = 4096
_IOV_MAX = 1024  # Linux's limit on iovecs per preadv


class LocalSource:
    preferred_chunk_bytes = 16 << 20

    def __init__(self, root: str | Path, *, direct: bool = False) -> None:
        self.root = Path(root).resolve()
        self.uri = str(self.root)
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
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

    def _fd(self, path: str) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                full = self._resolve(path)
                flags = os.O_RDONLY | (os.O_DIRECT if self.direct else 0)
                try:
                    fd = os.open(full, flags)
                except FileNotFoundError:
                    raise ObjectNotFound(f"{full}: no such file") from None
                except PermissionError:
                    raise AccessDenied(f"{full}: permission denied") from None
                except OSError as exc:
                    if self.direct and exc.errno == 22:  # EINVAL: no O_DIRECT here
                        self.direct = False
                        return self._fd_unlocked_buffered(path, full)
                    raise SourceError(f"{full}: {exc.strerror}") from None
                self._fds[path] = fd
            return fd

    def _fd_unlocked_buffered(self, path: str, full: Path) -> int:
        fd = os.open(full, os.O_RDONLY)
        self._fds[path] = fd
        return fd

    @property
    def direct_alignment(self) -> int:
        """What a read must be aligned to for ``O_DIRECT`` to land it straight in the
        caller's memory (offset, length and address); 0 when reads are buffered."""
        return _ALIGN if self.direct else 0

    def read_into(self, path: str, offset: int, buffer: memoryview) -> None:
        self.read_scatter(path, offset, [buffer])

    def read_scatter(self, path: str, offset: int, buffers: Sequence[memoryview]) -> None:
        fd = self._fd(path)
        if self.direct and len(buffers) == 1 and _aligned(offset, buffers[0]):
            self._read_in_place(path, fd, offset, buffers[0])
            return
        if self.direct:
            self._read_direct(path, fd, offset, buffers)
            return
        end = offset + sum(len(b) for b in buffers)
        rest = [b for b in buffers if len(b)]
        while rest:
            try:
                got = os.preadv(fd, rest[:_IOV_MAX], offset)
            except OSError as exc:
                raise SourceError(f"{self.root / path}: read at {offset}: {exc.strerror}") from None
            if got == 0:
                raise SourceError(
                    f"{self.root / path}: file ends before byte {end} (truncated while loading?)"
                )
            offset += got
            rest = advance(rest, got)

    def _read_in_place(self, path: str, fd: int, offset: int, buffer: memoryview) -> None:
        """A direct read straight into the caller's aligned memory (no scratch, no copy)."""
        done = 0
        while done < len(buffer):
            try:
                got = os.preadv(fd, [buffer[done:]], offset + done)
            except OSError as exc:
                raise SourceError(
                    f"{self.root / path}: direct read at {offset + done}: {exc.strerror}"
                ) from None
            if got == 0 or (got % _ALIGN and done + got < len(buffer)):
                raise SourceError(
                    f"{self.root / path}: file ends before byte {offset + len(buffer)} "
                    "(truncated while loading?)"
                )
            done += got

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
        done = 0
        try:
            while done < end - start:
                got = os.preadv(fd, [view[done:]], start + done)
                if got == 0:
                    break
                done += got
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


def _aligned(offset: int, buffer: memoryview) -> bool:
    """Whether a direct read at ``offset`` can land in ``buffer`` itself."""
    if offset % _ALIGN or len(buffer) % _ALIGN or buffer.readonly:
        return False
    anchor = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(anchor)
    del anchor
    return address % _ALIGN == 0
