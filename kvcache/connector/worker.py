"""The worker side of the connector: copies between vLLM's paged KV cache and the arena.

A chunk in the arena holds, layer after layer, the payload of its ``k`` vLLM blocks in the
engine's own memory order (``kvcache.connector.layout``)::

    chunk = [layer 0: block 0 | block 1 | ... | block k-1] [layer 1: ...] ... [layer L-1: ...]

so one layer of one chunk is one contiguous range, and a step's copies are one indexed
gather (save) or scatter (load) per chunk and layer, straight between the paged cache and
the shared-memory arena, with no staging copy on the host.

Saves: the first ``save_layer`` of a step reserves the step's chunks in the daemon (chunks
already cached are skipped by the daemon's answer, chunks that do not fit are dropped), each
layer is gathered into its range as vLLM finishes it, and ``finish`` commits (the daemon
publishes a chunk only once every layer is in; a step in which some layer was never saved
aborts its reservations instead).

Loads: ``start_loads`` leases the chunks and verifies their checksums; a chunk missing or
corrupt (and every chunk after it: a prefix is only usable up to its first hole) is
reported through ``take_load_errors`` so vLLM recomputes those blocks, and a corrupt chunk
is deleted from the daemon. On CPU each layer is scattered when vLLM waits for it; on CUDA
all layers are queued on a side stream at once, from the arena registered as pinned host
memory (DMA), and ``wait_layer`` makes the compute stream wait for that layer's event.

Every daemon failure degrades to misses (loads reported as errors, saves skipped) and, for
``retry_after_s``, no further calls wait on the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from kvcache.client import BlockView, CacheClient, Reservation
from kvcache.connector.layout import LayerLayout, detect_layout
from kvcache.connector.plan import KEEP, ChunkGeometry, StepPlan
from kvcache.connector.settings import ConnectorSettings
from kvcache.errors import CacheError

__all__ = ["ConnectorWorker"]

log = logging.getLogger("shoal." + __name__)


@dataclass(slots=True)
class _Load:
    view: BlockView
    job: int  # index of its job in the plan
    rest: tuple[tuple[int, ...], ...]  # block ids of this chunk and the job's later chunks
    skip: int  # leading KEEP blocks
    index: torch.Tensor  # destination block ids (after the KEEP ones), on the cache's device
    hasher: Any = field(default_factory=xxhash.xxh3_64)


@dataclass(slots=True)
class _Save:
    reservation: Reservation
    index: torch.Tensor  # source block ids, on the cache's device


@dataclass(slots=True)
class _Step:
    plan: StepPlan
    loads: list[_Load] = field(default_factory=list)
    loaded_layers: list[str] = field(default_factory=list)  # in the order copied
    load_events: dict[str, Any] = field(default_factory=dict)
    saves: list[_Save] | None = None  # None: not reserved yet
    saved_layers: list[str] = field(default_factory=list)  # in the order copied


class _Saver:
    """The save path's own client on its own thread.

    The step's reservation is made here while the engine waits (the copies need the slots),
    but the checksums and the commit run after the step, overlapping the next forward: the
    engine's blocks are no longer read by then (CPU copies are done; on CUDA the compute
    stream is ordered after the save stream). At most one step's commit is outstanding; the
    next ``commit`` waits for it, which bounds the arena held by unpublished slots.
    """

    def __init__(self, worker: ConnectorWorker, factory: Callable[[], CacheClient]) -> None:
        self._worker = worker
        self._factory = factory
        self._client: CacheClient | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shoal-save")
        self._pending: Future[None] | None = None

    def reserve(self, plan: StepPlan) -> tuple[list[Any], memoryview | None, int]:
        """Reserve every job's chunks: (answers per job, the arena, its generation)."""
        return self._pool.submit(self._reserve, plan).result()

    def commit(self, reservations: list[Reservation], complete: bool, stream: Any) -> None:
        self.flush()
        self._pending = self._pool.submit(self._commit, reservations, complete, stream)

    def flush(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.flush()
        self._pool.submit(self._close_client).result()
        self._pool.shutdown()

    # -- on the save thread -----------------------------------------------------------

    def _connected(self) -> CacheClient | None:
        if self._client is None and time.monotonic() >= self._worker.down_until:
            try:
                self._client = self._factory()
            except CacheError as exc:
                self._failed(exc)
        return self._client

    def _failed(self, exc: Exception) -> None:
        self._worker.note_daemon_failure(exc)
        self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _reserve(self, plan: StepPlan) -> tuple[list[Any], memoryview | None, int]:
        client = self._connected()
        if client is None:
            return [], None, 0
        rank, size = self._worker.rank, self._worker.chunk_bytes
        answers: list[Any] = []
        try:
            for job in plan.saves:
                keys = job.keys[rank]
                answers.append(client.reserve(keys, [size] * len(keys), job.parents[rank]))
            return answers, client.arena_memory(), client.arena_generation
        except CacheError as exc:
            self._failed(exc)
            return [], None, 0

    def _commit(self, reservations: list[Reservation], complete: bool, stream: Any) -> None:
        client = self._client
        stats = self._worker.stats
        if client is None:
            stats["save_skipped"] += len(reservations)
            return
        try:
            if not complete:
                client.abort([r.key for r in reservations])  # some layer never came
                stats["save_skipped"] += len(reservations)
                return
            if stream is not None:
                stream.synchronize()
            stats["saved_chunks"] += client.commit(reservations)
        except CacheError as exc:
            self._failed(exc)


class ConnectorWorker:
    def __init__(
        self,
        settings: ConnectorSettings,
        geometry: ChunkGeometry,
        rank: int,
        namespace_label: str = "",
        client_factory: Callable[[], CacheClient] | None = None,
    ) -> None:
        self.settings = settings
        self.geometry = geometry
        self.rank = rank
        self._client_factory = client_factory or (
            lambda: CacheClient(
                settings.endpoint or None,
                namespace=namespace_label,
                name=f"shoal-connector-rank{rank}",
                timeout_s=settings.io_timeout_s,
            )
        )
        self._client: CacheClient | None = None
        self.down_until = 0.0
        self._saver = _Saver(self, self._client_factory)
        self._save_arena: tuple[int, torch.Tensor] | None = None  # (generation, tensor)
        self.layers: dict[str, LayerLayout] = {}
        self._layer_offsets: dict[str, int] = {}
        self.chunk_bytes = 0
        self.device = torch.device("cpu")
        self._arena: torch.Tensor | None = None
        self._arena_generation = -1
        self._pinned: list[int] = []
        self._load_stream: Any = None
        self._save_stream: Any = None
        self._step: _Step | None = None
        self._load_errors: set[int] = set()
        self.stats = {
            "loaded_chunks": 0,
            "saved_chunks": 0,
            "load_errors": 0,
            "corrupt_chunks": 0,
            "save_skipped": 0,
            "daemon_failures": 0,
        }

    # -- registration -----------------------------------------------------------------

    def register(self, kv_caches: dict[str, torch.Tensor], num_blocks: int) -> None:
        """Detect each layer's layout; layers are ordered by their numeric index."""
        names = sorted(kv_caches, key=_natural_key)
        layouts = {name: detect_layout(name, kv_caches[name], num_blocks) for name in names}
        devices = {t.device for t in kv_caches.values()}
        if len(devices) != 1:
            raise ValueError(f"KV caches span several devices: {sorted(map(str, devices))}")
        self.device = devices.pop()
        offset = 0
        for name in names:
            self._layer_offsets[name] = offset
            offset += layouts[name].block_bytes * self.geometry.blocks_per_chunk
        self.layers = layouts
        self.chunk_bytes = offset
        if self.device.type == "cuda":
            self._load_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
            self._save_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        first = layouts[names[0]]
        log.info(
            "KV layout of %d layers: %s; %d bytes per %d-token chunk",
            len(names), first.describe(), self.chunk_bytes, self.geometry.chunk_tokens,
        )  # fmt: skip

    # -- one step ---------------------------------------------------------------------

    def bind(self, plan: StepPlan) -> None:
        self._step = _Step(plan)

    def start_loads(self) -> None:
        step = self._step
        if step is None or not step.plan.loads or not self.layers:
            return
        client = self._connected()
        for job_index, job in enumerate(step.plan.loads):
            keys = job.keys[self.rank]
            if client is None:
                self._fail_loads(job.block_ids)
                continue
            try:
                views = client.get(keys, prefix=True)
            except CacheError as exc:
                self._daemon_failed(exc)
                client = None
                self._fail_loads(job.block_ids)
                continue
            verify_now = self.device.type == "cuda"  # on CPU: hashed while scattered
            good: list[BlockView] = []
            for view in views:
                if view is None or len(view.buffer) != self.chunk_bytes:
                    break
                if verify_now and not view.verify():
                    break
                good.append(view)
            rest = views[len(good) :]
            if rest and rest[0] is not None:  # leased but failed its check: corrupt
                self.stats["corrupt_chunks"] += 1
                log.warning("chunk %s failed its checksum: deleted, vLLM recomputes it",
                            rest[0].key.hex())  # fmt: skip
                self._release(client, [v for v in rest if v is not None])
                with contextlib.suppress(CacheError):
                    client.delete([rest[0].key])
            else:
                self._release(client, [v for v in rest if v is not None])
            self._fail_loads(job.block_ids[len(good) :])
            for position, view in enumerate(good):
                ids = job.block_ids[position]
                skip = sum(1 for b in ids if b == KEEP)
                index = torch.tensor(ids[skip:], dtype=torch.long, device=self.device)
                tail = job.block_ids[position : len(good)]
                step.loads.append(_Load(view, job_index, tail, skip, index))
        if step.loads and self.device.type == "cuda":
            self._queue_cuda_loads(step)

    def wait_layer(self, layer: str) -> None:
        step = self._step
        if step is None or not step.loads or layer in step.loaded_layers:
            return
        if self.device.type == "cuda":
            event = step.load_events.get(layer)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            step.loaded_layers.append(layer)
            return
        self._scatter_layer(step, layer)

    def save_layer(self, layer: str, kv_layer: torch.Tensor | None = None) -> None:
        step = self._step
        if step is None or not step.plan.saves or layer not in self.layers:
            return
        if step.saves is None:
            step.saves = self._reserve(step.plan)
        if not step.saves:
            return
        layout = self.layers[layer]
        start = self._layer_offsets[layer]
        nbytes = layout.block_bytes * self.geometry.blocks_per_chunk
        assert self._save_arena is not None
        arena = self._save_arena[1]
        if self.device.type == "cuda":
            self._save_layer_cuda(step, layout, start, nbytes, arena)
        else:
            for save in step.saves:
                out = _typed(arena, save.reservation.offset + start, nbytes, layout)
                torch.index_select(layout.blocks, 0, save.index, out=out)
        step.saved_layers.append(layer)

    def finish(self) -> None:
        """End of the step (vLLM's ``wait_for_save``): finish loads, commit saves."""
        step = self._step
        if step is None:
            return
        if step.loads:
            if self.device.type == "cuda":
                self._load_stream.synchronize()
                self.stats["loaded_chunks"] += len(step.loads)
            else:
                for layer in self.layers:
                    if layer not in step.loaded_layers:
                        self._scatter_layer(step, layer)
                self._check_loads(step)
            self._release(self._client, [load.view for load in step.loads])
            step.loads = []
        if step.saves:
            stream = None
            if self.device.type == "cuda":  # later kernels may reuse the saved blocks
                torch.cuda.current_stream(self.device).wait_stream(self._save_stream)
                stream = self._save_stream
            complete = set(step.saved_layers) == set(self.layers)
            self._saver.commit([save.reservation for save in step.saves], complete, stream)
        step.saves = []

    def flush(self) -> None:
        """Wait until the saves of finished steps are committed (tests, shutdown)."""
        self._saver.flush()

    def unbind(self) -> None:
        self._step = None

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def close(self) -> None:
        self._saver.close()
        self._unpin()
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- internals --------------------------------------------------------------------

    def _connected(self) -> CacheClient | None:
        if self._client is None:
            if time.monotonic() < self.down_until:
                return None
            try:
                self._client = self._client_factory()
            except CacheError as exc:
                self._daemon_failed(exc)
                return None
        return self._client

    def note_daemon_failure(self, exc: Exception) -> None:
        self.stats["daemon_failures"] += 1
        self.down_until = time.monotonic() + self.settings.retry_after_s
        log.warning("cache daemon failed, degrading to misses: %s", exc)

    def _daemon_failed(self, exc: Exception) -> None:
        self.note_daemon_failure(exc)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None

    def _fail_loads(self, block_ids: Sequence[tuple[int, ...]]) -> None:
        failed = {b for ids in block_ids for b in ids if b != KEEP}
        self.stats["load_errors"] += len(failed)
        self._load_errors |= failed

    def _release(self, client: CacheClient | None, views: Sequence[BlockView]) -> None:
        if client is None or not views:
            return
        try:
            client.release(views)
        except CacheError as exc:
            self._daemon_failed(exc)  # the daemon reclaims leases of a dead session

    def _arena_tensor(self) -> torch.Tensor:
        client = self._client
        if client is None:  # the daemon failed mid-step: leased bytes stay mapped
            assert self._arena is not None, "the arena is used only after a daemon call"
            return self._arena
        if self._arena is None or self._arena_generation != client.arena_generation:
            self._arena = self._map(client.arena_memory())
            self._arena_generation = client.arena_generation
        return self._arena

    def _map(self, memory: memoryview) -> torch.Tensor:
        tensor = torch.frombuffer(memory, dtype=torch.uint8)
        if self.device.type == "cuda":
            self._pin(tensor)
        return tensor

    def _pin(self, arena: torch.Tensor) -> None:
        """Register the arena as pinned host memory so copies run as DMA."""
        cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
        result = cudart.cudaHostRegister(arena.data_ptr(), arena.numel(), 0)
        if int(result) != 0:
            log.warning("cudaHostRegister of the arena failed (%s): copies stay pageable", result)
            return
        self._pinned.append(arena.data_ptr())

    def _unpin(self) -> None:
        if self._pinned:
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            for pointer in self._pinned:
                cudart.cudaHostUnregister(pointer)
            self._pinned = []

    def _scatter_layer(self, step: _Step, layer: str) -> None:
        layout = self.layers.get(layer)
        if layout is None:
            return
        start = self._layer_offsets[layer]
        nbytes = layout.block_bytes * self.geometry.blocks_per_chunk
        arena = self._arena_tensor()
        for load in step.loads:
            offset = load.view.offset + start
            src = _typed(arena, offset, nbytes, layout)
            layout.blocks.index_copy_(0, load.index, src[load.skip :])
            load.hasher.update(arena[offset : offset + nbytes].numpy())
        step.loaded_layers.append(layer)

    def _check_loads(self, step: _Step) -> None:
        """Compare each chunk's streamed hash with its checksum (vLLM reads this step's
        errors after the forward and discards the affected requests' outputs)."""
        in_order = step.loaded_layers == list(self.layers)
        failed_jobs: set[int] = set()
        for load in step.loads:
            if load.job in failed_jobs:
                continue
            digest = load.hasher.intdigest() if in_order else None
            ok = digest == load.view.checksum if in_order else load.view.verify()
            if ok:
                self.stats["loaded_chunks"] += 1
                continue
            failed_jobs.add(load.job)  # this chunk and the rest of its prefix are lost
            self._fail_loads(load.rest)
            self.stats["corrupt_chunks"] += 1
            log.warning("chunk %s failed its checksum: deleted, vLLM recomputes it",
                        load.view.key.hex())  # fmt: skip
            if self._client is not None:
                with contextlib.suppress(CacheError):
                    self._client.delete([load.view.key])

    def _queue_cuda_loads(self, step: _Step) -> None:
        arena = self._arena_tensor()
        stream = self._load_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        k = self.geometry.blocks_per_chunk
        with torch.cuda.stream(stream):
            for layer, layout in self.layers.items():
                start = self._layer_offsets[layer]
                nbytes = layout.block_bytes * k
                for load in step.loads:
                    src = _typed(arena, load.view.offset + start, nbytes, layout)[load.skip :]
                    staged = src.to(self.device, non_blocking=True)
                    layout.blocks.index_copy_(0, load.index, staged)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
                step.load_events[layer] = event

    def _save_layer_cuda(
        self, step: _Step, layout: LayerLayout, start: int, nbytes: int, arena: torch.Tensor
    ) -> None:
        assert step.saves is not None
        stream = self._save_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for save in step.saves:
                gathered = torch.index_select(layout.blocks, 0, save.index)
                out = _typed(arena, save.reservation.offset + start, nbytes, layout)
                out.copy_(gathered, non_blocking=True)

    def _reserve(self, plan: StepPlan) -> list[_Save]:
        answers, memory, generation = self._saver.reserve(plan)
        if memory is None:
            self.stats["save_skipped"] += sum(len(job.block_ids) for job in plan.saves)
            return []
        if self._save_arena is None or self._save_arena[0] != generation:
            self._save_arena = (generation, self._map(memory))
        saves: list[_Save] = []
        for job, job_answers in zip(plan.saves, answers, strict=True):
            for answer, ids in zip(job_answers, job.block_ids, strict=True):
                if isinstance(answer, Reservation):
                    index = torch.tensor(ids, dtype=torch.long, device=self.device)
                    saves.append(_Save(answer, index))
        return saves


def _typed(arena: torch.Tensor, offset: int, nbytes: int, layout: LayerLayout) -> torch.Tensor:
    """``nbytes`` of the arena at ``offset`` as ``(k, *payload)`` of the layer's dtype."""
    raw = arena[offset : offset + nbytes]
    return raw.view(layout.dtype).view(-1, *layout.payload_shape)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
