"""Staged checkpoints: one shared-memory segment per checkpoint, filled by the streamer.

Invariant: every checkpoint id in the table is *staging* (its bytes are reserved against
the capacity and its segment is being filled) or *ready* (its segment is complete and
counted as staged); a staging that fails or that every caller left is unlinked and its
reservation returned before anyone can join it again. ``staged + staging <= capacity``.

The segment format (layout, header, identity) is ``loader.sidecar.segment``'s.

Coalescing and cancellation: each caller holds a ``Ticket``. The first starts a staging
thread; later callers join it. When the last ticket of a staging is released before it is
ready (the caller's RPC was cancelled: its process died), the staging is cancelled: the
rate limiter's sleeps are cut short, the streamer's reads drain, the segment is unlinked and
the capacity returned. A *detached* staging (``stage(detach=True)``: a controller warming a
node, which does not wait) is never cancelled by callers leaving; ``evict`` cancels it, and
if it fails its error is kept for ``list`` (state "failed") until it is staged again or
evicted. A ready checkpoint stays until evicted (it is a cache for the next
``Load``). Rejected: one staging per caller (N engines of a node would each pull the
checkpoint from object storage) and making capacity an LRU cache that evicts ready
checkpoints by itself (an engine about to map one would find it gone; eviction is an
operator's or controller's decision, ``RESOURCE_EXHAUSTED`` tells them to make it).

Evicting unlinks the name only: pages stay alive while any process maps them, so a client
already holding the mapping keeps valid tensors, and the memory returns to the system when
the last mapping goes. The capacity counts what the sidecar holds, not those mappings.

Serving files to peers (``files``, ``read_file``): a whole staging (tp_size 1) also keeps
what it needs to present the checkpoint's files again (``loader.sidecar.files``). A read
takes a view of the segment's mapping under the lock, so an eviction during the read only
unlinks the name; the mapping goes when the read's view does.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from loader.errors import (
    CapacityExceeded,
    LoaderError,
    SourceUnavailable,
    StagingConflict,
    UnknownCheckpoint,
)
from loader.plan import DTYPES, tp_slice_rule
from loader.sidecar.allow import AllowRule, check_allowed
from loader.sidecar.files import Span, StagedFiles, file_spans, staged_files
from loader.sidecar.metrics import NO_EVENTS, StagingEvents
from loader.sidecar.segment import (
    DATA_OFFSET,
    HEADER,
    SEGMENT_MAGIC,
    SEGMENT_VERSION,
    StagedTable,
    StagedTensor,
    StageSpec,
    StagingInfo,
    State,
    layout,
)
from loader.sources.base import Source
from loader.stream import Progress, RateLimiter, Streamer, StreamOptions

__all__ = ["Origin", "Stager", "StagerStatistics", "Ticket"]

log = logging.getLogger("shoal." + __name__)

DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_FAILED = 64  # failed detached stagings kept for list()
Origin = Literal["staged", "joined", "cached"]
OpenSource = Callable[[str], tuple[Source, str | None]]


@dataclass(frozen=True, slots=True)
class StagerStatistics:
    staged_bytes: int
    staging_bytes: int
    capacity_bytes: int
    num_checkpoints: int
    num_stagings: int


class _Segment:
    """The sidecar's side of one segment file: create (0600, fallocate), map, unlink."""

    def __init__(self, path: Path, size: int, token: bytes) -> None:
        self.path = path
        self.size = size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            self._mmap: mmap.mmap | None = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise CapacityExceeded(
                    f"{path.parent} has no room for {_size(size)}: {exc.strerror}"
                ) from None
            raise
        finally:
            os.close(fd)
        # No MADV_POPULATE_WRITE: fallocate has allocated the pages, and the minor faults
        # that remain are taken by the reader threads in parallel (measured on 512 MiB:
        # 0.24 s for fallocate + reads, 0.30 s with populating the page tables first).
        self._mmap[: HEADER.size] = HEADER.pack(
            SEGMENT_MAGIC, SEGMENT_VERSION, DATA_OFFSET, size, token
        )
        self._bytes: torch.Tensor | None = torch.frombuffer(self._mmap, dtype=torch.uint8)

    def view(self, offset: int, nbytes: int) -> torch.Tensor:
        assert self._bytes is not None, "view of a released segment"
        return self._bytes[offset : offset + nbytes]

    def reader(self) -> memoryview:
        """A view of the whole mapping that keeps it alive until released (see release)."""
        assert self._mmap is not None, "reader of a released segment"
        return memoryview(self._mmap)

    def release(self) -> None:
        """Unlink the name and drop the sidecar's mapping (views still held keep theirs)."""
        self.path.unlink(missing_ok=True)
        self._bytes = None
        if self._mmap is not None:
            with contextlib.suppress(BufferError):  # a view still exported: GC unmaps it
                self._mmap.close()
            self._mmap = None


class _Cancelled(Exception):
    """Raised inside the streamer's progress hook to stop a staging nobody waits for."""


@dataclass(eq=False)
class _Entry:
    spec: StageSpec
    started: float
    state: State = "staging"
    size: int = 0  # reserved once planned
    progress: Progress | None = None
    table: StagedTable | None = None
    files: StagedFiles | None = None  # ready and whole (tp_size 1) only
    error: BaseException | None = None
    segment: _Segment | None = None
    waiters: int = 0
    num_loads: int = 0
    detached: bool = False  # no caller needs to stay for the staging to go on
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Ticket:
    """One caller's interest in one staging. ``release()`` when the caller is gone: the last
    release of a staging that is not ready cancels it. Idempotent."""

    def __init__(self, stager: Stager, entry: _Entry, origin: Origin) -> None:
        self._stager = stager
        self._entry = entry
        self.origin: Origin = origin
        self._released = False

    @property
    def checkpoint_id(self) -> str:
        return self._entry.spec.checkpoint_id

    @property
    def progress(self) -> Progress | None:
        return self._entry.progress

    def wait(self, timeout_s: float) -> bool:
        """True once the staging is over (ready or failed)."""
        return self._entry.done.wait(timeout_s)

    def result(self) -> StagedTable:
        """The table of the ready checkpoint, or the error that ended its staging."""
        entry = self._entry
        assert entry.done.is_set(), "result() before the staging is over"
        if entry.error is not None:
            raise entry.error
        assert entry.table is not None
        return entry.table

    def release(self) -> None:
        self._stager._release(self)


class Stager:
    """Owns every staged checkpoint of one sidecar; thread-safe."""

    def __init__(
        self,
        shm_dir: str | Path,
        segment_prefix: str,
        capacity_bytes: int,
        *,
        open_source: OpenSource,
        options: StreamOptions | None = None,
        rate_bytes_per_s: float = 0.0,
        allow: Sequence[AllowRule] | None = None,
        clock: Callable[[], float] = time.monotonic,
        events: StagingEvents = NO_EVENTS,
    ) -> None:
        self.shm_dir = Path(shm_dir)
        self.prefix = segment_prefix
        self.capacity_bytes = capacity_bytes
        self._open_source = open_source
        self._options = options or StreamOptions()
        self._rate = rate_bytes_per_s
        self._allow = None if allow is None else list(allow)
        self._clock = clock
        self._events = events
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._failed: dict[str, tuple[_Entry, str]] = {}  # detached stagings that failed
        self._staged = 0
        self._reserved = 0
        self._num_stagings = 0

    def remove_stale_segments(self) -> int:
        """Unlink segments of this name a dead sidecar left (the caller holds the name's
        lock, so none of them is live)."""
        removed = 0
        for path in self.shm_dir.glob(f"{self.prefix}*"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    # -- calls from the service -----------------------------------------------------------

    def stage(self, spec: StageSpec, *, load: bool = False, detach: bool = False) -> Ticket:
        """Start staging ``spec``, or join the staging under way, or take the ready one.
        ``detach``: the staging goes on when every caller has left (module docstring)."""
        checkpoint_id = spec.checkpoint_id
        while True:
            with self._lock:
                self._failed.pop(checkpoint_id, None)
                entry = self._entries.get(checkpoint_id)
                if entry is None:
                    entry = _Entry(spec, self._clock())
                    self._entries[checkpoint_id] = entry
                    self._num_stagings += 1
                    origin: Origin = "staged"
                elif entry.cancel.is_set():
                    doomed = entry  # being torn down: wait for it, then start afresh
                    origin = "joined"
                    entry = None
                else:
                    origin = "cached" if entry.state == "ready" else "joined"
                if entry is not None:
                    entry.waiters += 1
                    entry.num_loads += int(load)
                    entry.detached |= detach
                    break
            doomed.done.wait()
        if origin == "staged":
            threading.Thread(
                target=self._run, args=(entry,), name=f"shoal-stage-{checkpoint_id}", daemon=True
            ).start()
        return Ticket(self, entry, origin)

    def list(self) -> list[StagingInfo]:
        now = self._clock()
        with self._lock:
            entries = [(e, "") for e in self._entries.values()]
            entries += list(self._failed.values())
        return [
            StagingInfo(
                e.spec.checkpoint_id,
                e.spec.uri,
                e.spec.tp_rank,
                max(e.spec.tp_size, 1),
                e.size if e.state != "failed" else 0,
                e.state,
                now - e.started,
                e.progress.bytes_done if e.progress else (e.size if e.state == "ready" else 0),
                e.num_loads,
                error,
            )
            for e, error in entries
        ]

    def evict(self, checkpoint_id: str) -> int:
        """Forget a ready checkpoint and unlink its segment; the bytes freed. A detached
        staging is cancelled (0 bytes: its reservation returns as it stops); a failed one
        is forgotten."""
        with self._lock:
            if self._failed.pop(checkpoint_id, None) is not None:
                return 0
            entry = self._entries.get(checkpoint_id)
            if entry is None:
                raise UnknownCheckpoint(f"no staged checkpoint {checkpoint_id!r} (see List)")
            if entry.state != "ready" and entry.detached:
                entry.detached = False  # an operator's cancel is not a failure to keep
                entry.cancel.set()
                log.info("detached staging cancelled", extra={"uri": entry.spec.uri})
                return 0
            if entry.state != "ready":
                raise StagingConflict(
                    f"checkpoint {checkpoint_id} ({entry.spec.uri}) is still staging; it is "
                    "cancelled when every caller waiting on it has gone"
                )
            del self._entries[checkpoint_id]
            self._staged -= entry.size
        if entry.segment is not None:
            entry.segment.release()
        log.info("evicted", extra={"checkpoint_id": checkpoint_id, "bytes": entry.size})
        return entry.size

    def files(self, uri: str) -> StagedFiles:
        """The files of ``uri`` as staged whole and ready here, for a peer to read.

        ``UnknownCheckpoint`` if not staged here, ``SourceUnavailable`` while still staging
        (worth asking again), ``StagingConflict`` if staged only sliced for tensor
        parallelism (a whole staging is needed: ``files`` point 1)."""
        with self._lock:
            return self._files_locked(uri)

    def read_file(
        self, uri: str, path: str, offset: int, length: int, *, token: bytes = b"",
        chunk_bytes: int = 2 << 20,
    ) -> Iterator[bytes]:  # fmt: skip
        """Bytes ``[offset, offset + length)`` of one file of ``uri``, in chunks of at most
        ``chunk_bytes``. Every check happens before this returns: a refused range (outside
        the file, or touching bytes not held) raises here, never halfway through."""
        assert chunk_bytes > 0, "chunk_bytes must be positive"
        with self._lock:
            files = self._files_locked(uri)
            if token and token != files.token:
                raise StagingConflict(
                    f"{uri} was staged again since this load began; load it again"
                )
            staged = files.file(path)
            spans = file_spans(staged, offset, length)
            entry = self._entries[files.checkpoint_id]
            assert entry.segment is not None, f"ready checkpoint {uri} has no segment"
            segment = entry.segment.reader()
        return _chunks(segment, staged.prefix, spans, chunk_bytes)

    def _files_locked(self, uri: str) -> StagedFiles:
        if not uri:
            raise ValueError("uri is empty")
        variants = {uri, uri.rstrip("/"), uri.rstrip("/") + "/"}  # a folder, with or without /
        found = [e for e in self._entries.values()
                 if e.spec.uri in variants and not e.cancel.is_set()]  # fmt: skip
        whole = [e for e in found if max(e.spec.tp_size, 1) == 1]
        for entry in whole:
            if entry.state == "ready":
                assert entry.files is not None, f"whole staging of {uri} kept no files"
                return entry.files
        if whole:
            done = whole[0].progress.bytes_done if whole[0].progress else 0
            raise SourceUnavailable(
                f"{uri} is still staging here ({done} of {whole[0].size} bytes): read it "
                "from its origin, or again once it is staged"
            )
        if found:
            raise StagingConflict(
                f"{uri} is staged here only sliced for tensor parallelism (tp_size "
                f"{found[0].spec.tp_size}); only a checkpoint staged whole can be served as "
                "files: prefetch it without --tp-size"
            )
        raise UnknownCheckpoint(
            f"this sidecar holds no staged {uri} (shoal loader prefetch it here, or read it "
            "from its origin)"
        )

    def statistics(self) -> StagerStatistics:
        with self._lock:
            return StagerStatistics(
                self._staged, self._reserved, self.capacity_bytes, len(self._entries),
                self._num_stagings,
            )  # fmt: skip

    def close(self) -> None:
        """Cancel every staging, wait for them, unlink every segment."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            entry.detached = False
            entry.cancel.set()
        for entry in entries:
            entry.done.wait(30)
            if entry.state == "ready" and entry.segment is not None:
                entry.segment.release()
        with self._lock:
            self._entries.clear()
            self._failed.clear()
            self._staged = self._reserved = 0

    # -- internals --------------------------------------------------------------------------

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket._released:
                return
            ticket._released = True
            entry = ticket._entry
            entry.waiters -= 1
            if entry.waiters == 0 and entry.state == "staging" and not entry.detached:
                log.info("every caller left; cancelling", extra={"uri": entry.spec.uri})
                entry.cancel.set()

    def _run(self, entry: _Entry) -> None:
        spec = entry.spec
        try:
            check_allowed(spec.uri, self._allow)
            if entry.cancel.is_set():
                raise _Cancelled
            source, file = self._open_source(spec.uri)
            try:
                self._stage(entry, source, file)
            finally:
                source.close()
            self._events.ended("ready")
        except _Cancelled:
            self._events.ended("cancelled")
            self._fail(
                entry,
                StagingConflict(f"staging {spec.uri} cancelled: every caller left, or evicted"),
            )
        except LoaderError as exc:
            self._events.ended("failed")
            self._fail(entry, exc)
        except Exception as exc:  # a bug: tell the callers (INTERNAL), keep serving
            log.exception("staging failed unexpectedly", extra={"uri": spec.uri})
            self._events.ended("failed")
            self._fail(entry, exc)

    def _stage(self, entry: _Entry, source: Source, file: str | None) -> None:
        from loader.checkpoint import open_checkpoint

        spec = entry.spec
        concurrency = self._options.concurrency
        checkpoint = open_checkpoint(source, file, concurrency=concurrency)
        plans = checkpoint.plan(tp_slice_rule(spec.tp_rank, max(spec.tp_size, 1)))
        offsets, size = layout(plans)
        self._reserve(entry, size)
        if entry.cancel.is_set():
            raise _Cancelled
        token = os.urandom(16)
        path = self.shm_dir / f"{self.prefix}{spec.checkpoint_id}"
        segment = entry.segment = _Segment(path, size, token)
        where = {plan.name: offset for plan, offset in zip(plans, offsets, strict=True)}
        nbytes = {plan.name: plan.nbytes for plan in plans}
        rates = [r for r in (self._rate, spec.rate_bytes_per_s) if r > 0]
        options = StreamOptions(
            concurrency=concurrency,
            chunk_bytes=self._options.chunk_bytes,
            max_inflight_bytes=size,  # the segment is the memory: never throttle on it
            rate_bytes_per_s=min(rates, default=0.0),
            order="layers" if spec.order == "layers" else "file",
            digests=dict(spec.digests),
        )

        def progress(p: Progress) -> None:
            entry.progress = p
            if entry.cancel.is_set():
                raise _Cancelled

        def cut_short(seconds: float) -> None:
            entry.cancel.wait(seconds)  # a cancelled staging stops waiting for tokens

        streamer = Streamer(
            source, plans, options, on_progress=progress,
            limiter=RateLimiter(options.rate_bytes_per_s, sleep=cut_short),
            allocate=lambda plan: segment.view(where[plan.name], plan.nbytes),
        )  # fmt: skip
        stream = iter(streamer)
        sha256: dict[str, str] = {}
        try:
            for name, _tensor in stream:
                if entry.cancel.is_set():
                    raise _Cancelled
                # M5: the digest of the bytes as they landed, sent with the table; hashlib
                # releases the GIL, so the streamer's reads go on meanwhile.
                view = segment.view(where[name], nbytes[name])
                sha256[name] = hashlib.sha256(memoryview(view.numpy())).hexdigest()  # type: ignore[arg-type]
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # drains the reads in flight before the segment can go
        stats = streamer.statistics()
        entry.progress = Progress(stats.bytes_read, stats.bytes_read, stats.tensors,
                                  stats.tensors, stats.elapsed_s)  # fmt: skip
        tensors = tuple(
            StagedTensor(p.name, DTYPE_NAMES[p.dtype], p.shape, offset, p.nbytes, sha256[p.name])
            for p, offset in zip(plans, offsets, strict=True)
        )
        table = StagedTable(spec.checkpoint_id, str(path), size, token, tensors,
                            self._clock() - entry.started)  # fmt: skip
        files = None
        if max(spec.tp_size, 1) == 1:
            files = staged_files(spec.checkpoint_id, token, checkpoint.files,
                                 checkpoint.prefixes, plans, offsets, sha256)  # fmt: skip
        with self._lock:
            # Checked under the lock that evict and the last caller's release take to
            # cancel: a staging cancelled after its last read is torn down, never ready.
            cancelled = entry.cancel.is_set()
            if not cancelled:
                entry.table = table
                entry.files = files
                entry.state = "ready"
                self._reserved -= size
                self._staged += size
        if cancelled:
            raise _Cancelled
        self._events.staged(spec.uri, stats.bytes_read, table.staging_s)
        entry.done.set()
        log.info("staged", extra={"uri": spec.uri, "bytes": size, "gbps": round(stats.gbps, 3)})

    def _reserve(self, entry: _Entry, size: int) -> None:
        with self._lock:
            free = self.capacity_bytes - self._staged - self._reserved
            if size > free:
                raise CapacityExceeded(
                    f"{entry.spec.uri} needs {_size(size)} of shared memory; the sidecar "
                    f"holds {_size(self._staged)} staged and {_size(self._reserved)} staging "
                    f"of its {_size(self.capacity_bytes)} capacity ({_size(free)} free): "
                    "evict a checkpoint (shoal loader evict) or raise --capacity-bytes"
                )
            self._reserved += size
            entry.size = size

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        if entry.segment is not None:
            entry.segment.release()
            entry.segment = None
        # The traceback holds the streamer's frames and so views of the segment: drop it, so
        # the mapping goes now rather than whenever the error object does.
        error.__traceback__ = None
        with self._lock:
            self._reserved -= entry.size
            if self._entries.get(entry.spec.checkpoint_id) is entry:
                del self._entries[entry.spec.checkpoint_id]
                if entry.detached:  # evict and close clear it before they cancel
                    entry.state = "failed"
                    reason = f"{type(error).__name__}: {error}"
                    self._failed[entry.spec.checkpoint_id] = (entry, reason)
                    while len(self._failed) > _MAX_FAILED:  # the oldest go first
                        del self._failed[next(iter(self._failed))]
            entry.error = error
        entry.done.set()
        log.info("staging ended", extra={"uri": entry.spec.uri, "error": str(error)})


def _chunks(
    segment: memoryview, prefix: bytes, spans: list[Span], chunk_bytes: int
) -> Iterator[bytes]:
    """The bytes of ``spans`` in chunks of ``chunk_bytes`` (the last may be shorter): one
    copy each, out of the mapping (or the prefix) into the chunk."""
    try:
        parts: list[memoryview | bytes] = []
        size = 0
        for span in spans:
            source = segment if span.in_segment else memoryview(prefix)
            start, left = span.start, span.length
            while left:
                take = min(left, chunk_bytes - size)
                parts.append(source[start : start + take])
                size += take
                start += take
                left -= take
                if size == chunk_bytes:
                    yield b"".join(parts)
                    parts, size = [], 0
        if parts:
            yield b"".join(parts)
    finally:
        segment.release()


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit} ({nbytes} bytes)"
    return f"{nbytes} bytes"
