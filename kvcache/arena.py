"""The shared-memory arena: one file in /dev/shm that every engine on the node maps.

Layout of ``<shm_dir>/shoal-<name>.arena`` (mode 0600: only the daemon's user maps it)::

    0            64                                  4096                       4096 + N
    +------------+-----------------------------------+--------------------------+
    | header     | zero padding                      | data region: N bytes      |
    +------------+-----------------------------------+--------------------------+
    header (little endian): magic "SHOALKV1" | u32 version | u32 header_bytes |
                            u64 data_bytes | u64 daemon pid | u64 created_ns |
                            16 B instance id

1. Only the daemon writes the header, once, before any client learns the path.
2. Block offsets on the wire are relative to the data region (``DATA_OFFSET``), which is
   page aligned, so every slot (also page aligned, see ``kvcache.allocator``) is too.
3. The daemon holds an exclusive ``flock`` on ``shoal-<name>.arena.lock`` (beside the
   arena, never removed) for its whole life, taken *before* it touches the arena. A new
   daemon that can take the lock knows any arena file there was left by a dead owner
   (kill -9, OOM) and replaces it; if the lock is held, another live daemon owns that
   name and startup fails with a clear error. A separate lock file closes the race of
   locking the arena itself (between one daemon's create and its flock, a second could
   lock and unlink the new file, and both would run); unlike a pid file it cannot be
   fooled by pid reuse.
4. Clients check magic, version, size and the instance id the daemon sent in its hello
   reply, so a client never maps a stale arena left by an earlier daemon.
5. The daemon reserves every page of the arena at start (``posix_fallocate``). A sparse
   tmpfs file smaller than its mapping is a trap: the first write past what the tmpfs
   can still give kills the *writer* (an engine) with SIGBUS. A daemon that cannot
   reserve its arena refuses to start with a message naming the tmpfs, its size and the
   size asked for; a reserved arena can no longer be starved by other tenants of the
   tmpfs. Only "this filesystem cannot fallocate" (EOPNOTSUPP/EINVAL) falls back to
   writing zeros into every page, which reserves them just the same.
6. With ``populate`` the mapping is prefaulted for writing (MADV_POPULATE_WRITE): page
   tables are filled up front, so the first copy into a slot does not pay a page fault
   per 4 KiB (measured on these VMs: first touch ~1 GB/s against 6-13 GB/s for touched
   pages). Only EINVAL (a kernel older than 5.14) is tolerated; any other failure is an
   error, never a silent "fault in later".
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import struct
import time
from pathlib import Path

from kvcache.errors import ArenaError

__all__ = ["DATA_OFFSET", "Arena", "ArenaHeader", "map_arena", "reserve_file"]

log = logging.getLogger("shoal." + __name__)

MAGIC = b"SHOALKV1"
VERSION = 1
DATA_OFFSET = 4096
_HEADER = struct.Struct("<8sIIQQQ16s")


class ArenaHeader:
    __slots__ = ("created_ns", "data_bytes", "instance_id", "pid")

    def __init__(self, data_bytes: int, pid: int, created_ns: int, instance_id: bytes) -> None:
        self.data_bytes = data_bytes
        self.pid = pid
        self.created_ns = created_ns
        self.instance_id = instance_id

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC, VERSION, DATA_OFFSET, self.data_bytes, self.pid, self.created_ns,
            self.instance_id,
        )  # fmt: skip

    @classmethod
    def unpack(cls, raw: bytes, path: Path) -> ArenaHeader:
        if len(raw) < _HEADER.size:
            raise ArenaError(f"{path}: file too short to be a Shoal arena")
        magic, version, header_bytes, data_bytes, pid, created, instance = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise ArenaError(f"{path}: not a Shoal arena (bad magic)")
        if version != VERSION or header_bytes != DATA_OFFSET:
            raise ArenaError(f"{path}: arena version {version}, this client speaks {VERSION}")
        return cls(data_bytes, pid, created, instance)


# madvise(MADV_POPULATE_WRITE), Linux >= 5.14; not exported by Python 3.11's mmap module.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
# "This filesystem or kernel does not do that": the only errors a fallback may follow.
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)
_K8S_HINT = (
    "in Kubernetes mount an emptyDir {medium: Memory, sizeLimit: <at least the arena>} "
    "at the shm_dir (Docker: --shm-size), or lower --shm-bytes"
)


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def _size(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.1f} GiB"
    return f"{nbytes / (1 << 20):.1f} MiB"


def _no_room(directory: Path, nbytes: int, reason: str) -> ArenaError:
    try:
        fs = os.statvfs(directory)
        room = (
            f"the tmpfs mounted at {_mount_point(directory)} has {_size(fs.f_blocks * fs.f_frsize)}"
            f" ({_size(fs.f_bavail * fs.f_frsize)} free)"
        )
    except OSError:
        room = "its filesystem size is unknown"
    return ArenaError(
        f"cannot reserve a {_size(nbytes)} arena in {directory} ({reason}): {room}; {_K8S_HINT}"
    )


def reserve_file(fd: int, nbytes: int, path: Path) -> None:
    """Allocate every page of ``fd``'s first ``nbytes`` now, so no later write can SIGBUS.

    Raises ``ArenaError`` naming the filesystem and its room when it is too small.
    """
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise _no_room(path.parent, nbytes, exc.strerror or "no space") from None
            raise ArenaError(f"cannot reserve {path}: {exc.strerror}") from None
    # No fallocate on this filesystem: touching every page reserves it just the same.
    os.ftruncate(fd, nbytes)
    zeros = bytes(1 << 20)
    try:
        for start in range(0, nbytes, len(zeros)):
            os.pwrite(fd, zeros[: min(len(zeros), nbytes - start)], start)
    except OSError as exc:
        raise _no_room(path.parent, nbytes, exc.strerror or "write failed") from None


def _map(fd: int, nbytes: int, populate: bool) -> mmap.mmap:
    mapping = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if populate:
        # Prefault for writing, not just reading: MAP_POPULATE on a shared mapping maps
        # pages read-only, and the first write to each 4 KiB page then still takes a fault
        # (measured: the first put into fresh slots ran 25% slower). Contents are untouched.
        try:
            mapping.madvise(_MADV_POPULATE_WRITE)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:  # EFAULT/ENOMEM: the pages are not there
                mapping.close()
                raise ArenaError(f"cannot prefault the arena mapping: {exc.strerror}") from None
            log.debug("MADV_POPULATE_WRITE unavailable", extra={"errno": exc.errno})
    return mapping


class Arena:
    """The daemon's side: locks the name, creates, reserves, maps and finally removes the
    arena file."""

    def __init__(self, path: Path, data_bytes: int, *, populate: bool = False) -> None:
        if data_bytes <= 0 or data_bytes % mmap.PAGESIZE:
            raise ArenaError(f"arena size {data_bytes} must be a positive multiple of a page")
        self.path = path
        self.data_bytes = data_bytes
        self.lock_path = path.with_name(path.name + ".lock")
        self._lock_fd = self._lock(self.lock_path)
        try:
            self._fd = self._create(path, data_bytes, populate)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.mmap[: _HEADER.size] = self.header.pack()

    @staticmethod
    def _lock(path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ArenaError(f"cannot open the arena lock {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArenaError(
                f"arena {path.with_suffix('')} is held by a running daemon; stop it or "
                "choose another --name"
            ) from None
        return fd

    def _create(self, path: Path, data_bytes: int, populate: bool) -> int:
        self._remove_stale(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ArenaError(f"cannot create arena {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # for daemons of older versions
            reserve_file(fd, DATA_OFFSET + data_bytes, path)
            self.header = ArenaHeader(data_bytes, os.getpid(), time.time_ns(), os.urandom(16))
            self.mmap = _map(fd, DATA_OFFSET + data_bytes, populate)
        except (OSError, ArenaError) as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if isinstance(exc, ArenaError):
                raise
            raise ArenaError(f"cannot size or map arena {path}: {exc.strerror}") from None
        return fd

    @staticmethod
    def _remove_stale(path: Path) -> None:
        """Remove an arena left by a dead daemon (we hold the name's lock)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ArenaError(f"cannot inspect existing arena {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a daemon of an older version
        except BlockingIOError:
            raise ArenaError(
                f"arena {path} is held by a running daemon; stop it or choose another --name"
            ) from None
        finally:
            os.close(fd)
        log.warning("removing stale arena left by a dead daemon", extra={"path": str(path)})
        path.unlink(missing_ok=True)

    def close(self) -> None:
        """Unmap and remove the file (clean exit); the lock file stays, unlocked."""
        self.path.unlink(missing_ok=True)
        self.mmap.close()
        os.close(self._fd)
        os.close(self._lock_fd)


def map_arena(
    path: str | Path, instance_id: bytes, *, populate: bool = False
) -> tuple[mmap.mmap, ArenaHeader]:
    """The client's side: map an existing arena read-write and check it is the live one."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise ArenaError(f"cannot open arena {path}: {exc.strerror}") from None
    try:
        header = ArenaHeader.unpack(os.pread(fd, _HEADER.size, 0), path)
        if header.instance_id != instance_id:
            raise ArenaError(f"{path} belongs to another daemon instance (stale arena)")
        size = os.fstat(fd).st_size
        if size != DATA_OFFSET + header.data_bytes:
            raise ArenaError(f"{path}: size {size} does not match its header")
        return _map(fd, size, populate), header
    finally:
        os.close(fd)
