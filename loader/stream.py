"""The streamer: many concurrent ranged reads, straight into each tensor's memory, yielding
every tensor the moment its last byte lands.

Work is cut into *reads* of at most ``chunk_bytes`` of one file, walking the tensors in
load order::

    a large tensor                     ──► several reads, each landing in its own part of
                                           the tensor's memory
    neighbours in one file (holes      ──► one read (one ``preadv`` with several iovecs, one
      < merge_gap_bytes between them)      ranged GET) whose bytes land in each tensor's
                                           memory in turn; the holes' bytes are dropped

No byte is copied after it lands, and a request costs the same whatever it carries: on an
object store a GET per tensor was the bottleneck (a 1B Llama has 147 tensors in 2.2 GB).

Reads are issued in the plan's order (``order``: file order, layer order, or a caller's
priority list first), at most ``concurrency`` at once on a thread pool (I/O releases the
GIL), and at most ``rate_bytes_per_s`` on average (a token bucket shared by the readers).
A file the source copies out of the page cache (``is_cached``: ``LocalSource`` on a warm
file) gets at most ``cached_concurrency`` reads at once (two per core): its reads are
memory copies, and more copiers than cores only contend (issue 17).

First touch. A warm load's cost is mostly faulting in the fresh destination memory (zeroing
each page, the fault, memcg accounting: bench/RESULTS.md, loader), not the copy. So each
reader, before a buffered read into memory the streamer allocated itself, faults the
read's destination pages in with one ``madvise(MADV_POPULATE_WRITE)`` (``_pages.py``)
instead of one fault per 4 KiB page inside the copy (``prefault``; the faults stay spread
over the readers, and the time stays inside the load's clock).
CPU tensors are ``torch.empty`` unless the caller passes ``allocate``; where the source
reads a file direct (``direct_alignment_for``: ``LocalSource`` on a cold file, or with
``direct=True``), each of its tensors of 1 MiB or more gets its own page-aligned mapping
that starts ``offset % alignment`` bytes before its first byte, and is read in whole
aligned blocks straight into it (no scratch copy); the tail short of a block is an
ordinary read. (Transparent huge pages for CPU tensors were tried: 3x faster to fault in
while the VM's memory is backed, 3x slower once the balloon's free page reporting has
handed it back; bench/RESULTS.md, loader.)

The memory bound. ``max_inflight_bytes`` caps what the streamer holds: destination tensors
allocated and not yet handed out. A read whose tensors are not allocated yet waits until
they fit under the bound, or until no read is in flight (so a tensor larger than the bound
still loads, and so does one whose last bytes share a read with the next tensor's first).
A caller that drops each tensor after using it therefore never has more than the bound
(plus one tensor) in memory; ``statistics().peak_held_bytes`` reports
the high-water mark. That one tensor is the documented exception to the bound, and it is
bounded itself: the planner refuses a header declaring a tensor over
``loader.plan.MAX_TENSOR_BYTES`` (64 GiB) or past the end of its file, so a hostile header
cannot make the streamer allocate more than that.

Failures: the first read that fails cancels the rest and raises its ``SourceError``; a tensor
whose bytes do not match its published digest raises ``IntegrityError`` naming it. Digests
are the caller's (``digests``) or, for a whole tensor, the source's own: a source with a
``published_digest(path, offset, nbytes)`` method (a peer sidecar, which hashed what it
staged) has every tensor it publishes a digest for checked.

Rejected: asyncio with aiobotocore/httpx (every source would need an async twin, and the
work is I/O plus memcpy that threads overlap well); mmap + copy (reads every byte twice and
faults pages one at a time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Literal

import torch

from loader._pages import populate_write
from loader.errors import IntegrityError, LoaderError
from loader.plan import TensorPlan
from loader.sources.base import Source
from loader.staging import StagingRing

__all__ = [
    "Progress",
    "RateLimiter",
    "StreamOptions",
    "StreamStatistics",
    "Streamer",
    "order_plans",
]

MiB = 1 << 20
DEFAULT_CHUNK_BYTES = 16 * MiB
_DIRECT_MIN_BYTES = 1 * MiB  # smaller tensors go through the source's aligned scratch
# A copy out of the page cache populates and reads this much at a time (see ``_read``).
PREFAULT_STEP_BYTES = 1 * MiB
Order = Literal["file", "layers", "priority"]


@dataclass(frozen=True, slots=True)
class StreamOptions:
    concurrency: int = 16
    chunk_bytes: int = 0  # 0: the source's preferred_chunk_bytes (16 MiB where it has none)
    max_inflight_bytes: int = 1024 * MiB
    rate_bytes_per_s: float = 0.0  # 0: unlimited
    order: Order = "file"
    priority: tuple[str, ...] = ()  # with order="priority": these names first, in this order
    merge_gap_bytes: int = 64 << 10  # a hole up to this is read and dropped; < 0: no joins
    digests: Mapping[str, str] = field(default_factory=dict)  # name -> "sha256:<hex>"
    # Each reader faults in its destination's pages in one call before a buffered read
    # copies into them (loader/_pages.py); only for memory the streamer allocates itself.
    prefault: bool = True
    # Reads in flight of a file the source says the page cache holds (``is_cached``):
    # memory copies, CPU-bound, so more readers than cores only contend; 0: two per core.
    # Never more than ``concurrency``; a cold file keeps all ``concurrency`` (the disk
    # needs the depth).
    cached_concurrency: int = 0

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.chunk_bytes < 0 or self.max_inflight_bytes < 1:
            raise ValueError(
                "concurrency and max_inflight_bytes must be positive, chunk_bytes >= 0"
            )
        if self.cached_concurrency < 0:
            raise ValueError("cached_concurrency must be >= 0 (0: two reads per core)")
        if self.rate_bytes_per_s < 0:
            raise ValueError("rate_bytes_per_s must be >= 0")


@dataclass(frozen=True, slots=True)
class Progress:
    bytes_done: int
    bytes_total: int
    tensors_done: int
    tensors_total: int
    elapsed_s: float


@dataclass(frozen=True, slots=True)
class StreamStatistics:
    bytes_read: int
    num_reads: int
    tensors: int
    elapsed_s: float
    first_tensor_s: float | None
    peak_held_bytes: int

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0


class RateLimiter:
    """Token bucket: ``acquire(n)`` waits until ``n`` bytes fit in the average rate, with a
    burst of one second's worth. Time and sleep are injectable for tests."""

    def __init__(
        self,
        rate: float,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = rate
        self._last = clock()

    def acquire(self, n: int) -> None:
        if self.rate <= 0:
            return
        with self._lock:  # reservations are ordered: a later reader waits behind earlier ones
            now = self._clock()
            self._tokens = min(self.rate, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= n
            debt = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if debt > 0:
            self._sleep(debt)


_LAYER = re.compile(r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\.")


def order_plans(
    plans: Sequence[TensorPlan], order: Order, priority: Sequence[str] = ()
) -> list[TensorPlan]:
    """``file``: as planned. ``layers``: embeddings, then layer 0, 1, ..., then the rest
    (final norm, head), so an engine could start on the first layers early.
    ``priority``: the named tensors first, in the given order, then file order."""
    if order == "file":
        return list(plans)
    if order == "layers":

        def rank(item: tuple[int, TensorPlan]) -> tuple[float, int]:
            position, plan = item
            match = _LAYER.search(plan.name)
            if match:
                return float(match.group(1)), position
            return (-1.0 if "embed" in plan.name else float("inf")), position

        return [plan for _, plan in sorted(enumerate(plans), key=rank)]
    if order == "priority":
        first = {name: i for i, name in enumerate(priority)}
        unknown = set(first) - {p.name for p in plans}
        if unknown:
            raise LoaderError(f"priority names tensors the checkpoint lacks: {sorted(unknown)[:5]}")
        return sorted(plans, key=lambda p: first.get(p.name, len(first)))
    raise ValueError(f"unknown order {order!r}")


@dataclass(slots=True)
class _Tensor:
    plan: TensorPlan
    remaining: int  # bytes of its pieces not landed yet (lead included)
    align: int = 0  # > 0: read with direct I/O in blocks of this many bytes
    lead: int = -1  # >= 0 (direct): its memory starts this many bytes before its first byte
    data: torch.Tensor | None = None  # uint8, allocated when its first read is issued
    view: memoryview | None = None  # where pieces land: ``lead`` bytes, then ``data``'s


@dataclass(slots=True)
class _Piece:
    tensor: _Tensor
    file_offset: int
    length: int
    dest_offset: int  # in the tensor's ``view``
    slack: int = 0  # leading bytes that are not the tensor's (a direct tensor's lead)


@dataclass(slots=True)
class _Read:
    path: str
    offset: int
    length: int
    room: int  # how many more bytes (holes included) may join this read
    pieces: list[_Piece]


def _reads(tensors: Sequence[_Tensor], options: StreamOptions) -> list[_Read]:
    """Cut the tensors' byte ranges, in load order, into reads (see the module docstring).

    A tensor with ``lead >= 0`` is read from ``offset - lead`` (an ``align`` boundary) in
    reads of whole ``align`` blocks that nothing joins, so direct I/O can land them in its
    (aligned) memory; the tail short of a block is an ordinary piece."""
    reads: list[_Read] = []
    budget = options.chunk_bytes
    assert budget > 0, "the Streamer resolves chunk_bytes=0 to its source's preference"
    for tensor in tensors:
        path = tensor.plan.path
        dest = 0
        ranges = tensor.plan.ranges
        if tensor.lead >= 0:
            align = tensor.align
            ((offset, length),) = tensor.plan.ranges
            start, end = offset - tensor.lead, (offset + length) // align * align
            step = max(align, budget // align * align)
            for at in range(start, end, step):
                take = min(step, end - at)
                slack = max(0, offset - at)
                reads.append(
                    _Read(path, at, take, 0, [_Piece(tensor, at, take, at - start, slack)])
                )
            ranges, dest = ((end, offset + length - end),), end - start  # the tail, maybe empty
        for offset, length in ranges:
            done = 0
            while done < length:
                at = offset + done
                last = reads[-1] if reads else None
                hole = at - (last.offset + last.length) if last and last.path == path else -1
                if last is not None and 0 <= hole <= options.merge_gap_bytes and last.room > hole:
                    take = min(length - done, last.room - hole)
                    last.length += hole + take
                    last.room -= hole + take
                    last.pieces.append(_Piece(tensor, at, take, dest + done))
                else:
                    take = min(length - done, budget)
                    room = budget - take
                    reads.append(
                        _Read(path, at, take, room, [_Piece(tensor, at, take, dest + done)])
                    )
                done += take
            dest += length
    return reads


def _in_steps(
    parts: Sequence[tuple[memoryview, int]], step: int
) -> Iterator[list[tuple[memoryview, int]]]:
    """``parts`` (buffers and their addresses, 0 for none) cut into consecutive runs of
    ``step`` bytes (the last shorter), each buffer split where a run ends."""
    run: list[tuple[memoryview, int]] = []
    room = step
    for buffer, address in parts:
        at = 0
        while at < len(buffer):
            take = min(room, len(buffer) - at)
            run.append((buffer[at : at + take], address + at if address else 0))
            at += take
            room -= take
            if room == 0:
                yield run
                run, room = [], step
    if run:
        yield run


def _num_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _aligned_empty(lead: int, nbytes: int) -> tuple[torch.Tensor, memoryview]:
    """A uint8 tensor of ``nbytes`` starting ``lead`` bytes into a fresh page-aligned
    mapping, and a view of the mapping from its start (private anonymous memory, as
    malloc's; the tensor keeps the mapping alive)."""
    region = mmap.mmap(-1, lead + nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    return raw[lead:], memoryview(raw.numpy())  # type: ignore[arg-type]


class Streamer:
    """Iterate to get ``(name, tensor)`` pairs as they complete (on ``device``)."""

    def __init__(
        self,
        source: Source,
        plans: Sequence[TensorPlan],
        options: StreamOptions | None = None,
        *,
        device: str | torch.device = "cpu",
        on_progress: Callable[[Progress], None] | None = None,
        limiter: RateLimiter | None = None,
        allocate: Callable[[TensorPlan], torch.Tensor] | None = None,
        staging: bool | None = None,
    ) -> None:
        """``allocate(plan)`` returns the uint8 tensor of ``plan.nbytes`` a tensor's bytes
        land in (default: a new CPU tensor); a sidecar passes views of its shared memory.
        Memory it returns counts against the in-flight bound like the default's.

        ``staging`` (default: whenever ``device`` is not the CPU) reads through a
        ``StagingRing`` of ``max_inflight_bytes`` (pinned on CUDA) and copies each slot into
        tensors allocated on the device, overlapping the copies with the next reads."""
        self.source = source
        options = options or StreamOptions()
        if not options.chunk_bytes:
            chunk = int(getattr(source, "preferred_chunk_bytes", DEFAULT_CHUNK_BYTES))
            options = dataclasses.replace(options, chunk_bytes=chunk)
        if not getattr(source, "reads_holes", True) and options.merge_gap_bytes > 0:
            options = dataclasses.replace(options, merge_gap_bytes=0)  # a peer: tensors only
        self.options = options
        # A source that publishes digests of what it serves (a peer sidecar: M5) has every
        # whole tensor it knows checked, unless the caller gave a digest for it.
        self._published: Callable[[str, int, int], str | None] | None = getattr(
            source, "published_digest", None
        )
        self.device = torch.device(device)
        ordered = order_plans(plans, self.options.order, self.options.priority)
        self._tensors = [_Tensor(plan, plan.nbytes) for plan in ordered]
        self._bytes_total = sum(t.remaining for t in self._tensors)
        staged = self.device.type != "cpu" if staging is None else staging
        # Direct I/O straight into the destination: only where this streamer owns the
        # memory (no allocate hook, no staging ring) and the source asks for alignment.
        alignment = getattr(source, "direct_alignment_for", None)
        if alignment is not None and allocate is None and not staged:
            for tensor in self._tensors:
                if len(tensor.plan.ranges) == 1 and tensor.plan.nbytes >= _DIRECT_MIN_BYTES:
                    tensor.align = int(alignment(tensor.plan.path))
                if tensor.align:
                    tensor.lead = tensor.plan.ranges[0][0] % tensor.align
                    tensor.remaining += tensor.lead
        self._reads = _reads(self._tensors, self.options)
        self._on_progress = on_progress
        self._ring: StagingRing | None = None
        if staged:
            slot = self.options.chunk_bytes
            self._ring = StagingRing(
                self.device, max(1, self.options.max_inflight_bytes // slot), slot
            )
        self._allocate_tensor = allocate or (
            lambda plan: torch.empty(plan.nbytes, dtype=torch.uint8)
        )
        # Fresh memory the streamer owns is faulted in by the reader about to fill it; a
        # caller's memory (``allocate``) may be touched already, and a staging ring is.
        self._prefault = self.options.prefault and allocate is None and not staged
        self._cached: Callable[[str], bool] | None = getattr(source, "is_cached", None)
        self._limits: dict[str, int] = {}  # path -> reads in flight while reading it
        self._copies: dict[str, bool] = {}  # path -> the source copies it from memory
        self._limiter = limiter or RateLimiter(self.options.rate_bytes_per_s)
        self._bytes_done = 0
        self._done = 0
        self._held = 0
        self._peak_held = 0
        self._start = 0.0
        self._first: float | None = None
        self._elapsed = 0.0

    def statistics(self) -> StreamStatistics:
        return StreamStatistics(
            bytes_read=self._bytes_done,
            num_reads=len(self._reads),
            tensors=self._done,
            elapsed_s=self._elapsed,
            first_tensor_s=self._first,
            peak_held_bytes=self._peak_held,
        )

    def load_into(self, state: dict[str, torch.Tensor]) -> StreamStatistics:
        """Copy every tensor into ``state[name]`` (which must have its shape), or add it."""
        for name, tensor in self:
            target = state.get(name)
            if target is None:
                state[name] = tensor
            elif tuple(target.shape) != tuple(tensor.shape):
                raise LoaderError(
                    f"{name}: the destination has shape {tuple(target.shape)}, "
                    f"the checkpoint {tuple(tensor.shape)}"
                )
            else:
                with torch.no_grad():
                    target.copy_(tensor)
        return self.statistics()

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        self._start = time.monotonic()
        pending = deque(self._reads)
        inflight: dict[Future[None], _Read] = {}
        slots: dict[Future[None], int] = {}
        if self._ring is not None:
            self._hold(self._ring.nbytes)  # the ring is the load's host memory
        pool = ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="shoal-load")
        try:
            for tensor in self._tensors:
                if tensor.remaining == 0:  # empty tensors complete at once
                    yield self._finish(tensor)
            while pending or inflight:
                while pending and len(inflight) < self._reads_in_flight(pending[0].path):
                    read = pending[0]
                    ring = self._ring
                    if ring is not None:
                        slot = ring.try_acquire()
                        if slot is None and inflight:
                            break  # a slot frees up when a read completes and is copied
                        if slot is None:
                            slot = ring.wait_for_slot()
                        pending.popleft()
                        self._allocate(read)
                        future = pool.submit(self._read_into, read, ring.view(slot, read.length))
                        inflight[future] = read
                        slots[future] = slot
                        continue
                    need = self._new_bytes(read)
                    over = self._held + need > self.options.max_inflight_bytes
                    if need and inflight and over:
                        break  # wait for tensors to be handed out
                    # With nothing in flight, nothing would free memory: the read goes, even
                    # over the bound (a tensor larger than it, or one whose tail shares this
                    # read with the next tensor's head).
                    pending.popleft()
                    self._allocate(read)
                    inflight[pool.submit(self._read, read)] = read
                if not inflight:
                    continue
                finished, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for future in finished:
                    read = inflight.pop(future)
                    slot = slots.pop(future, None)
                    try:
                        future.result()  # raises the source's error
                    except BaseException:
                        if slot is not None and self._ring is not None:
                            self._ring.release(slot)
                        raise
                    if slot is not None and self._ring is not None:
                        self._ring.copy_out(slot, [
                            (p.tensor.data, p.dest_offset, p.file_offset - read.offset, p.length)
                            for p in read.pieces if p.tensor.data is not None
                        ])  # fmt: skip
                    for piece in read.pieces:
                        piece.tensor.remaining -= piece.length
                        self._bytes_done += piece.length - piece.slack
                        if piece.tensor.remaining == 0:
                            yield self._finish(piece.tensor)
                if self._on_progress is not None:
                    self._on_progress(self._progress())
        finally:
            for future in inflight:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            if self._ring is not None:
                self._ring.drain()
            self._elapsed = time.monotonic() - self._start

    # -- internals --------------------------------------------------------------------

    def _progress(self) -> Progress:
        return Progress(
            self._bytes_done, self._bytes_total, self._done, len(self._tensors),
            time.monotonic() - self._start,
        )  # fmt: skip

    def _reads_in_flight(self, path: str) -> int:
        """How many reads may be in flight while the next is one of ``path``: all
        ``concurrency`` for a file read from the disk or the network, fewer for one the
        source copies out of the page cache (``cached_concurrency``)."""
        limit = self._limits.get(path)
        if limit is None:
            limit = self.options.concurrency
            copies = self._copies[path] = self._cached is not None and self._cached(path)
            if copies:
                cached = self.options.cached_concurrency or 2 * _num_cores()
                limit = max(1, min(limit, cached))
            self._limits[path] = limit
        return limit

    def _hold(self, nbytes: int) -> None:
        self._held += nbytes
        self._peak_held = max(self._peak_held, self._held)

    def _new_bytes(self, read: _Read) -> int:
        fresh = {id(p.tensor): p.tensor.plan.nbytes for p in read.pieces if p.tensor.data is None}
        return sum(fresh.values())

    def _allocate(self, read: _Read) -> None:
        for piece in read.pieces:
            tensor = piece.tensor
            if tensor.data is None and self._ring is not None:
                tensor.data = torch.empty(tensor.plan.nbytes, dtype=torch.uint8, device=self.device)
            elif tensor.data is None and tensor.lead >= 0:
                tensor.data, tensor.view = _aligned_empty(tensor.lead, tensor.plan.nbytes)
                self._hold(tensor.plan.nbytes)
            elif tensor.data is None:
                tensor.data = self._allocate_tensor(tensor.plan)
                assert (
                    tensor.data.dtype == torch.uint8 and tensor.data.numel() == tensor.plan.nbytes
                ), f"allocate() must return {tensor.plan.nbytes} uint8 elements"
                tensor.view = memoryview(tensor.data.numpy())  # type: ignore[arg-type]
                self._hold(tensor.plan.nbytes)

    def _read_into(self, read: _Read, buffer: memoryview) -> None:
        self._limiter.acquire(read.length)
        self.source.read_into(read.path, read.offset, buffer)

    def _read(self, read: _Read) -> None:
        """One request for the whole read: each piece lands in its tensor, the holes between
        them in this read's own buffer, each hole its own part of it (a caching source
        writes them through too, so they must be the file's bytes).

        With ``prefault`` (memory the streamer allocated, buffered reads), this reader
        faults the pieces' pages in first (``_pages.populate_write``). A copy out of the
        page cache goes in steps of ``PREFAULT_STEP_BYTES``, each populated just before
        its ``preadv``, so the copy lands in pages the kernel has just zeroed, still in the
        CPU's cache; a read from the disk or the network stays one request."""
        self._limiter.acquire(read.length)
        holes = read.length - sum(piece.length for piece in read.pieces)
        spare = memoryview(bytearray(holes)) if holes else None
        parts: list[tuple[memoryview, int]] = []  # (buffer, its address; 0: a hole's)
        at = read.offset
        for piece in read.pieces:
            if piece.file_offset > at:
                assert spare is not None
                gap = piece.file_offset - at
                parts.append((spare[:gap], 0))
                spare = spare[gap:]
            view, data = piece.tensor.view, piece.tensor.data
            assert view is not None and data is not None
            buffer = view[piece.dest_offset : piece.dest_offset + piece.length]
            parts.append((buffer, data.data_ptr() + piece.dest_offset))
            at = piece.file_offset + piece.length
        # Direct reads (a tensor with a lead) fault their pages in themselves.
        prefault = self._prefault and all(p.tensor.lead < 0 for p in read.pieces)
        stepped = prefault and self._copies.get(read.path, False)
        offset = read.offset
        for step in _in_steps(parts, PREFAULT_STEP_BYTES) if stepped else [parts]:
            for buffer, address in step if prefault else ():
                if address:
                    populate_write(address, len(buffer))
            self.source.read_scatter(read.path, offset, [b for b, _ in step])
            offset += sum(len(b) for b, _ in step)

    def _finish(self, tensor: _Tensor) -> tuple[str, torch.Tensor]:
        plan = tensor.plan
        data = tensor.data if tensor.data is not None else torch.empty(0, dtype=torch.uint8)
        digest = self.options.digests.get(plan.name)
        if digest is None and self._published is not None and len(plan.ranges) == 1:
            digest = self._published(plan.path, *plan.ranges[0])
        if digest is not None:
            algorithm, _, expected = digest.partition(":")
            try:
                hasher = hashlib.new(algorithm)
            except ValueError:
                raise IntegrityError(
                    f"{plan.name}: unknown digest algorithm {algorithm!r}"
                ) from None
            host = data if data.device.type == "cpu" else data.cpu()
            hasher.update(memoryview(host.numpy()))  # type: ignore[arg-type]
            actual = hasher.hexdigest()
            if actual != expected:
                raise IntegrityError(f"{plan.name}: {algorithm} {actual} != published {expected}")
        out = data.view(plan.dtype).view(plan.shape)
        if self._ring is not None:
            self._ring.publish()  # the caller's stream waits for this tensor's copies
        elif self.device.type != "cpu":
            out = out.to(self.device)
        if tensor.view is not None or self._ring is None:
            self._held -= plan.nbytes
        tensor.data = None
        tensor.view = None
        self._done += 1
        if self._first is None:
            self._first = time.monotonic() - self._start
        return plan.name, out
