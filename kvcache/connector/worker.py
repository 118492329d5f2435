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
``retry_after_s``, no further calls wait on the daemon. A daemon that exited costs a step
no ``io_timeout_s`` either: both clients watch its process (``kvcache.client.session``) and
their next call fails at once. A *refused* request
(``RequestRejected``, e.g. ``bad_request``) is not a daemon failure: it is counted
(``rejected``), logged once, and only that save is skipped; the client stays connected.

Chunk size. A chunk is one block in the daemon, which refuses blocks above its
``max_block_bytes`` (its slab size, sent in the hello). ``register`` compares and raises
``ChunkTooLarge`` naming both sizes and the fix; a daemon first reached later (or a
restarted one with a smaller slab) is checked on every new connection, and while the
chunk does not fit nothing is loaded or saved (counted ``oversized``, logged once).

Arena mappings. The worker addresses the arena through two tensors (the load client's
mapping and the save client's), each tied to the client *object and* its
``arena_generation`` (a new client restarts its generation count, so the generation alone
would keep a dropped daemon's mapping). On CUDA each mapping is registered as pinned host
memory through a ``HostRegistrar``. Invariant: a registered range is always a live mapping:
when the client's arena changes, the old range is unregistered *before* the tensor that
keeps its mapping alive is dropped, and ``close`` unregisters only the current ranges.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import zmq

from kvcache.checksums import Hasher
from kvcache.client import BlockView, CacheClient, Reservation
from kvcache.connector.layout import LayerLayout, detect_layout
from kvcache.connector.metrics import Counters
from kvcache.connector.plan import KEEP, ChunkGeometry, StepPlan
from kvcache.connector.settings import ConnectorSettings
from kvcache.errors import CacheError, RequestRejected

__all__ = [
    "WORKER_COUNTERS",
    "ChunkTooLarge",
    "ConnectorWorker",
    "CudaHostRegistrar",
    "HostRegistrar",
]

log = logging.getLogger("shoal." + __name__)

WORKER_COUNTERS = (
    "loaded_chunks", "loaded_bytes", "load_seconds", "saved_chunks", "saved_bytes",
    "save_seconds", "load_errors", "corrupt_chunks", "save_skipped", "daemon_failures",
    "rejected", "oversized",
)  # fmt: skip


class ChunkTooLarge(ValueError):
    """A chunk is larger than the largest block the daemon stores."""


class HostRegistrar(Protocol):
    """Registers host memory for DMA (``cudaHostRegister``); injectable for tests."""

    def register(self, address: int, nbytes: int) -> bool: ...
    def unregister(self, address: int) -> None: ...


class CudaHostRegistrar:
    """The real one: CUDA's runtime through torch."""

    def register(self, address: int, nbytes: int) -> bool:
        result = torch.cuda.cudart().cudaHostRegister(address, nbytes, 0)  # type: ignore[no-untyped-call]
        if int(result) != 0:
            log.warning("cudaHostRegister of the arena failed (%s): copies stay pageable", result)
            return False
        return True

    def unregister(self, address: int) -> None:
        result = torch.cuda.cudart().cudaHostUnregister(address)  # type: ignore[no-untyped-call]
        if int(result) != 0:
            log.warning("cudaHostUnregister of the arena failed (%s)", result)


class _Mapping:
    """One client's arena as a uint8 tensor, remapped when the client or its arena changes,
    registered with ``registrar`` while mapped (see "Arena mappings" above)."""

    def __init__(self, registrar: HostRegistrar | None) -> None:
        self.registrar = registrar
        self.tensor: torch.Tensor | None = None
        self._owner: CacheClient | None = None
        self._generation = -1
        self._pinned: int | None = None

    def current(self, client: CacheClient) -> bool:
        return (
            self.tensor is not None
            and self._owner is client
            and self._generation == client.arena_generation
        )

    def follow(self, client: CacheClient, before_drop: Callable[[], None]) -> torch.Tensor:
        if self.current(client):
            assert self.tensor is not None
            return self.tensor
        if self.tensor is not None:
            before_drop()  # copies still reading/writing the old mapping finish first
        self.release()
        memory = client.arena_memory()
        self.tensor = torch.frombuffer(memory, dtype=torch.uint8)
        self._owner = client
        self._generation = client.arena_generation
        if self.registrar is not None and self.tensor.numel():
            address = self.tensor.data_ptr()
            if self.registrar.register(address, self.tensor.numel()):
                self._pinned = address
        return self.tensor

    def release(self) -> None:
        """Unregister, then drop the tensor (and with it, the last hold on the mapping)."""
        if self._pinned is not None:
            assert self.registrar is not None
            self.registrar.unregister(self._pinned)
            self._pinned = None
        self.tensor = None
        self._owner = None
        self._generation = -1


@dataclass(slots=True)
class _Load:
    view: BlockView
    job: int  # index of its job in the plan
    rest: tuple[tuple[int, ...], ...]  # block ids of this chunk and the job's later chunks
    skip: int  # leading KEEP blocks
    index: torch.Tensor  # destination block ids (after the KEEP ones), on the cache's device
    hasher: Any = field(default_factory=Hasher)


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
    load_seconds: float = 0.0
    save_seconds: float = 0.0


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

    def reserve(self, plan: StepPlan) -> tuple[list[Any], CacheClient | None]:
        """Reserve every job's chunks: (answers per job, the client whose arena holds the
        reservations, or None when the daemon is unavailable). The pool runs one task at a
        time, so the previous step's commit is done when this returns."""
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
                return None
            if not self._worker.fits(self._client):
                self._close_client()
        return self._client

    def _failed(self, exc: CacheError) -> None:
        self._worker.note_daemon_failure(exc)
        self._close_client()

    def _close_client(self) -> None:
        if self._client is not None:
            _close_quietly(self._client)
            self._client = None

    def _reserve(self, plan: StepPlan) -> tuple[list[Any], CacheClient | None]:
        client = self._connected()
        if client is None:
            return [], None
        rank, size = self._worker.rank, self._worker.chunk_bytes
        answers: list[Any] = []
        try:
            for job in plan.saves:
                keys = job.keys[rank]
                try:
                    answers.append(client.reserve(keys, [size] * len(keys), job.parents[rank]))
                except RequestRejected as exc:
                    self._worker.note_rejected(exc, len(keys))
                    answers.append([None] * len(keys))  # that save only is skipped
            return answers, client
        except CacheError as exc:
            self._failed(exc)
            return [], None

    def _commit(self, reservations: list[Reservation], complete: bool, stream: Any) -> None:
        client = self._client
        counters = self._worker.counters
        if client is None:
            counters.add("save_skipped", len(reservations))
            return
        try:
            if not complete:
                client.abort([r.key for r in reservations])  # some layer never came
                counters.add("save_skipped", len(reservations))
                return
            if stream is not None:
                stream.synchronize()
            counters.add("saved_chunks", client.commit(reservations))
        except RequestRejected as exc:
            self._worker.note_rejected(exc, len(reservations))
        except CacheError as exc:
            self._failed(exc)


class ConnectorWorker:
    def __init__(
        self,
        settings: ConnectorSettings,
        geometry: ChunkGeometry,
        rank: int,
        namespace_wire: str = "",
        client_factory: Callable[[], CacheClient] | None = None,
        registrar: HostRegistrar | None = None,
    ) -> None:
        """``rank``: this worker's index into the plan's per-rank keys (pipeline stage
        times tensor-parallel size plus tensor-parallel rank); ``namespace_wire``: its
        namespace as ``Namespace.to_wire`` writes it, sent in the hello; ``registrar``:
        pins the arena mappings (default: CUDA's, when the KV cache is on a GPU)."""
        self.settings = settings
        self.geometry = geometry
        self.rank = rank
        self._client_factory = client_factory or (
            lambda: CacheClient(
                settings.endpoint or None,
                namespace=namespace_wire,
                name=f"shoal-connector-rank{rank}",
                timeout_s=settings.io_timeout_s,
            )
        )
        self._client: CacheClient | None = None
        self.down_until = 0.0
        self.counters = Counters(WORKER_COUNTERS)
        self._warned: set[str] = set()
        self._saver = _Saver(self, self._client_factory)
        self._registrar = registrar
        self._load_map = _Mapping(registrar)
        self._save_map = _Mapping(registrar)
        self.layers: dict[str, LayerLayout] = {}
        self._layer_offsets: dict[str, int] = {}
        self.chunk_bytes = 0
        self.max_block_bytes = 0  # the daemon's, from the last hello (0: not known yet)
        self.device = torch.device("cpu")
        self._load_stream: Any = None
        self._save_stream: Any = None
        self._step: _Step | None = None
        self._load_errors: set[int] = set()

    @property
    def stats(self) -> dict[str, float]:
        """A snapshot of the counters (``kvcache.connector.metrics``)."""
        return self.counters.snapshot()

    def take_stats(self) -> dict[str, float]:
        """Counter increments since the last call (vLLM's ``get_kv_connector_stats``)."""
        return self.counters.take_deltas()

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
            if self._registrar is None:
                self._registrar = CudaHostRegistrar()
                self._load_map.registrar = self._save_map.registrar = self._registrar
        first = layouts[names[0]]
        log.info(
            "KV layout of %d layers: %s; %d bytes per %d-token chunk",
            len(names), first.describe(), self.chunk_bytes, self.geometry.chunk_tokens,
        )  # fmt: skip
        client = self._connected()  # checks the chunk against the daemon's largest block
        if client is None and self.max_block_bytes and self.chunk_bytes > self.max_block_bytes:
            raise ChunkTooLarge(self._too_large_message())

    def fits(self, client: CacheClient) -> bool:
        """Whether a chunk fits the daemon ``client`` is connected to (logged once if not)."""
        self.max_block_bytes = int(client.max_block_bytes)
        if not self.chunk_bytes or self.chunk_bytes <= self.max_block_bytes:
            return True
        self.counters.add("oversized")
        if "oversized" not in self._warned:
            self._warned.add("oversized")
            log.error("%s; nothing is loaded or saved", self._too_large_message())
        return False

    def _too_large_message(self) -> str:
        return (
            f"ShoalConnector: a {self.geometry.chunk_tokens}-token chunk is "
            f"{self.chunk_bytes} bytes, larger than the cache daemon's largest block "
            f"({self.max_block_bytes} bytes): lower kv_connector_extra_config chunk_tokens "
            f"(to at most {self._fitting_tokens()}) or start the daemon with "
            f"--slab-bytes of at least {self.chunk_bytes}"
        )

    def _fitting_tokens(self) -> int:
        per_token = self.chunk_bytes // self.geometry.chunk_tokens
        block = self.geometry.block_size
        return max(0, self.max_block_bytes // per_token // block * block)

    # -- one step ---------------------------------------------------------------------

    def bind(self, plan: StepPlan) -> None:
        self._step = _Step(plan)

    def start_loads(self) -> None:
        step = self._step
        if step is None or not step.plan.loads or not self.layers:
            return
        started = time.perf_counter()
        client = self._connected()
        for job_index, job in enumerate(step.plan.loads):
            keys = job.keys[self.rank]
            if client is None:
                self._fail_loads(job.block_ids)
                continue
            try:
                views = client.get(keys, prefix=True)
            except RequestRejected as exc:
                self.note_rejected(exc, len(keys))
                self._fail_loads(job.block_ids)
                continue
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
                self.counters.add("corrupt_chunks")
                log.warning("chunk %s failed its checksum: deleted, vLLM recomputes it",
                            rest[0].key.hex())  # fmt: skip
                self._release(client, [v for v in rest if v is not None])
                self._delete(client, rest[0].key)
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
        step.load_seconds += time.perf_counter() - started

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
        started = time.perf_counter()
        self._scatter_layer(step, layer)
        step.load_seconds += time.perf_counter() - started

    def save_layer(self, layer: str, kv_layer: torch.Tensor | None = None) -> None:
        step = self._step
        if step is None or not step.plan.saves or layer not in self.layers:
            return
        started = time.perf_counter()
        if step.saves is None:
            step.saves = self._reserve(step.plan)
        if not step.saves:
            step.save_seconds += time.perf_counter() - started
            return
        layout = self.layers[layer]
        start = self._layer_offsets[layer]
        nbytes = layout.block_bytes * self.geometry.blocks_per_chunk
        arena = self._save_map.tensor
        assert arena is not None, "saves are reserved only with the arena mapped"
        if self.device.type == "cuda":
            self._save_layer_cuda(step, layout, start, nbytes, arena)
        else:
            for save in step.saves:
                out = _typed(arena, save.reservation.offset + start, nbytes, layout)
                torch.index_select(layout.blocks, 0, save.index, out=out)
        step.saved_layers.append(layer)
        step.save_seconds += time.perf_counter() - started

    def finish(self) -> None:
        """End of the step (vLLM's ``wait_for_save``): finish loads, commit saves."""
        step = self._step
        if step is None:
            return
        if step.loads:
            started = time.perf_counter()
            loaded_before = self.counters.snapshot()["loaded_chunks"]
            if self.device.type == "cuda":
                self._load_stream.synchronize()
                self.counters.add("loaded_chunks", len(step.loads))
            else:
                for layer in self.layers:
                    if layer not in step.loaded_layers:
                        self._scatter_layer(step, layer)
                self._check_loads(step)
            loaded = self.counters.snapshot()["loaded_chunks"] - loaded_before
            self.counters.add("loaded_bytes", loaded * self.chunk_bytes)
            self._release(self._client, [load.view for load in step.loads])
            step.loads = []
            step.load_seconds += time.perf_counter() - started
        if step.load_seconds:
            self.counters.add("load_seconds", step.load_seconds)
            step.load_seconds = 0.0
        if step.saves:
            started = time.perf_counter()
            stream = None
            if self.device.type == "cuda":  # later kernels may reuse the saved blocks
                torch.cuda.current_stream(self.device).wait_stream(self._save_stream)
                stream = self._save_stream
            complete = set(step.saved_layers) == set(self.layers)
            if complete:
                self.counters.add("saved_bytes", len(step.saves) * self.chunk_bytes)
            self._saver.commit([save.reservation for save in step.saves], complete, stream)
            step.save_seconds += time.perf_counter() - started
        if step.save_seconds:
            self.counters.add("save_seconds", step.save_seconds)
            step.save_seconds = 0.0
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
        self._sync(self._save_stream)
        self._save_map.release()
        self._sync(self._load_stream)
        self._load_map.release()
        if self._client is not None:
            _close_quietly(self._client)
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
            if not self.fits(self._client):
                _close_quietly(self._client)
                self._client = None
        return self._client

    def note_daemon_failure(self, exc: CacheError) -> None:
        self.counters.add("daemon_failures")
        self.down_until = time.monotonic() + self.settings.retry_after_s
        log.warning("cache daemon failed, degrading to misses: %s", exc)

    def note_rejected(self, exc: RequestRejected, num_chunks: int) -> None:
        """The daemon refused one request: count it, skip it, stay connected."""
        self.counters.add("rejected", num_chunks)
        if exc.code not in self._warned:  # once per code, not once per step
            self._warned.add(exc.code)
            log.warning("the cache daemon refused a request, skipping it: %s", exc)

    def _daemon_failed(self, exc: CacheError) -> None:
        self.note_daemon_failure(exc)
        if self._client is not None:
            _close_quietly(self._client)
            self._client = None

    def _fail_loads(self, block_ids: Sequence[tuple[int, ...]]) -> None:
        failed = {b for ids in block_ids for b in ids if b != KEEP}
        self.counters.add("load_errors", len(failed))
        self._load_errors |= failed

    def _release(self, client: CacheClient | None, views: Sequence[BlockView]) -> None:
        if client is None or not views:
            return
        try:
            client.release(views)
        except CacheError as exc:
            self._daemon_failed(exc)  # the daemon reclaims leases of a dead session

    def _delete(self, client: CacheClient | None, key: bytes) -> None:
        """Best effort: a corrupt chunk left behind fails every reader's check anyway."""
        if client is None:
            return
        try:
            client.delete([key])
        except RequestRejected as exc:
            self.note_rejected(exc, 1)
        except CacheError as exc:
            self._daemon_failed(exc)

    def _sync(self, stream: Any) -> None:
        if stream is not None:
            stream.synchronize()

    def _arena_tensor(self) -> torch.Tensor:
        client = self._client
        if client is None:  # the daemon failed mid-step: leased bytes stay mapped
            assert self._load_map.tensor is not None, "the arena is used after a daemon call"
            return self._load_map.tensor
        return self._load_map.follow(client, lambda: self._sync(self._load_stream))

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
                self.counters.add("loaded_chunks")
                continue
            failed_jobs.add(load.job)  # this chunk and the rest of its prefix are lost
            self._fail_loads(load.rest)
            self.counters.add("corrupt_chunks")
            log.warning("chunk %s failed its checksum: deleted, vLLM recomputes it",
                        load.view.key.hex())  # fmt: skip
            self._delete(self._client, load.view.key)

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
        answers, client = self._saver.reserve(plan)
        if client is None:
            self.counters.add("save_skipped", sum(len(job.block_ids) for job in plan.saves))
            return []
        # The previous step's commit synchronised the save stream before the remap.
        self._save_map.follow(client, lambda: self._sync(self._save_stream))
        saves: list[_Save] = []
        for job, job_answers in zip(plan.saves, answers, strict=True):
            for answer, ids in zip(job_answers, job.block_ids, strict=True):
                if isinstance(answer, Reservation):
                    index = torch.tensor(ids, dtype=torch.long, device=self.device)
                    saves.append(_Save(answer, index))
        return saves


def _close_quietly(client: CacheClient) -> None:
    """Close a client whose daemon failed; the daemon reclaims the session on its own."""
    try:
        client.close()
    except (CacheError, zmq.ZMQError) as exc:
        log.debug("closing a failed cache client: %s", exc)


def _typed(arena: torch.Tensor, offset: int, nbytes: int, layout: LayerLayout) -> torch.Tensor:
    """``nbytes`` of the arena at ``offset`` as ``(k, *payload)`` of the layer's dtype."""
    raw = arena[offset : offset + nbytes]
    return raw.view(layout.dtype).view(-1, *layout.payload_shape)


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
