"""The scheduler side of the connector: cache lookups off the scheduler thread, and the
per-step plan of loads and saves.

Lookups. vLLM asks ``matched_tokens`` for a waiting request every time it considers it, on
its single scheduler thread; a lookup is a round trip to the node daemon (tens of µs), plus
a peer fetch when peers hold more of the chain (milliseconds). So lookups run on one
background thread with its own client: the scheduler submits the request's chunk keys (one
chain per tensor-parallel rank), waits up to ``lookup_wait_ms`` for the answer, and if it is
not there yet answers ``None`` ("not yet"), which makes vLLM skip the request this step and
ask again on the next. A hit counts only as far as every rank has the chunk. When the
cluster lookup shows peers holding more of the chain, the thread fetches it to the local
daemon first, so workers always load from local shared memory.

A cache is best effort: if the daemon is down or slow the answer is 0 (a miss) and for
``retry_after_s`` no lookup waits on it. Waiting is bounded per scheduler *step*, not per
request: all ``matched_tokens`` calls of one step together wait at most ``lookup_wait_ms``
(the budget resets in ``build_plan``, which vLLM calls once per step), so a step with many
waiting requests never stalls for their sum (review m21). The only other bound is the
lookup thread's own client timeout (``lookup_timeout_s``): a request whose lookup is in
flight is deferred (answered "not yet") until its answer or that timeout, never blocked
on, and a failed lookup answers a miss; the next ones answer misses at once for
``retry_after_s``. Nothing stacks a second timeout on the client's.

Keys. A chunk's key folds in the request's extra keys where vLLM's prefix cache does
(``kvcache.connector.extra_keys``: LoRA adapter, multimodal inputs, cache salt, prompt
embeddings), so two requests share a chunk only where vLLM itself would share the block.
A request whose extra keys cannot be encoded is neither looked up, loaded nor saved
(counted as ``unkeyable``).

Saves. A chunk is saved in the step whose forward computes its last token (prefill or,
with ``save_decode``, decode), so another request can hit it before this one finishes.
Chunks the lookup found cached, or that were loaded, are not saved again; chunks whose load
failed are saved again once vLLM has recomputed them.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvcache.client import CacheClient
from kvcache.connector.extra_keys import UnkeyableRequest, chunk_extra, has_extra_keys
from kvcache.connector.metrics import Counters, merge
from kvcache.connector.plan import KEEP, ChunkGeometry, LoadJob, SaveJob, StepPlan
from kvcache.connector.settings import ConnectorSettings
from kvcache.errors import CacheError
from kvcache.keys import BlockKey, chain_keys

__all__ = ["ConnectorScheduler", "LookupService"]

log = logging.getLogger("shoal." + __name__)

_ANSWER_TTL_S = 1.0  # an unconsumed lookup answer older than this is asked again


@dataclass(slots=True)
class _Lookup:
    num_chunks: int
    done: threading.Event = field(default_factory=threading.Event)
    hits: int = 0
    at: float = 0.0


class LookupService:
    """One thread, one client: answers "how many leading chunks are cached on every rank"."""

    def __init__(
        self,
        settings: ConnectorSettings,
        client_factory: Callable[[], CacheClient] | None = None,
    ) -> None:
        self.settings = settings
        self._client_factory = client_factory or (
            lambda: CacheClient(
                settings.endpoint or None,
                name="shoal-connector-scheduler",
                timeout_s=settings.lookup_timeout_s,
                heartbeat=False,
                populate=False,  # lookups never touch the arena's pages
            )
        )
        self._jobs: queue.SimpleQueue[tuple[_Lookup, Sequence[Sequence[bytes]]] | None] = (
            queue.SimpleQueue()
        )
        self._down_until = 0.0
        self.counters = Counters(["lookup_failures"])
        self._thread = threading.Thread(target=self._run, name="shoal-lookup", daemon=True)
        self._thread.start()

    @property
    def failures(self) -> int:
        return int(self.counters.snapshot()["lookup_failures"])

    @property
    def down(self) -> bool:
        """The daemon failed less than ``retry_after_s`` ago: lookups answer misses."""
        return time.monotonic() < self._down_until

    def submit(self, chains: Sequence[Sequence[bytes]]) -> _Lookup:
        lookup = _Lookup(num_chunks=min((len(c) for c in chains), default=0))
        if lookup.num_chunks == 0 or self.down:
            lookup.at = time.monotonic()
            lookup.done.set()  # nothing to ask, or the daemon failed moments ago: a miss
        else:
            self._jobs.put((lookup, chains))
        return lookup

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=2)

    def _run(self) -> None:
        client: CacheClient | None = None
        try:
            try:
                client = self._client_factory()  # connect now, not on the first request
            except CacheError as exc:
                log.warning("cache daemon not reachable yet: %s", exc)
            while (job := self._jobs.get()) is not None:
                lookup, chains = job
                try:
                    if client is None:
                        client = self._client_factory()
                    lookup.hits = min(self._hits(client, chain) for chain in chains)
                except CacheError as exc:
                    self.counters.add("lookup_failures")
                    self._down_until = time.monotonic() + self.settings.retry_after_s
                    log.warning("cache lookup failed, answering a miss: %s", exc)
                    if client is not None:
                        client.close()
                        client = None
                lookup.at = time.monotonic()
                lookup.done.set()
        finally:
            if client is not None:
                client.close()

    def _hits(self, client: CacheClient, keys: Sequence[bytes]) -> int:
        if not self.settings.peer_fetch:
            return client.lookup(keys)
        found = client.locate(keys)
        if found.remote_length > found.length:
            return client.fetch(keys[: found.remote_length])
        return found.length


@dataclass(slots=True)
class _Tracked:
    request: Any  # vllm.v1.request.Request
    chains: list[list[BlockKey]]  # [rank] keys of the full chunks hashed so far
    block_ids: list[int] = field(default_factory=list)
    saved_chunks: int = 0  # chunks [0, saved) are in the cache (saved, hit or loaded)
    lookup: _Lookup | None = None
    local_tokens: int = 0  # vLLM's own prefix hit, from matched_tokens
    save: bool = True
    loading: list[int] = field(default_factory=list)  # block ids it loaded into
    unkeyable: str = ""  # why its chunks cannot be keyed ("": they can)


class ConnectorScheduler:
    """Scheduler-side state, duck-typed over vLLM's ``Request`` and ``SchedulerOutput``."""

    def __init__(
        self,
        settings: ConnectorSettings,
        geometry: ChunkGeometry,
        namespaces: Sequence[bytes],
        lookups: LookupService | None = None,
    ) -> None:
        self.settings = settings
        self.geometry = geometry
        self.namespaces = list(namespaces)  # one digest per tensor-parallel rank
        self.lookups = lookups or LookupService(settings)
        self._requests: dict[str, _Tracked] = {}
        self._loads: list[LoadJob] = []
        self._loading: dict[int, tuple[str, int]] = {}  # block id -> (req, chunk) loaded
        self.counters = Counters(["lookups", "deferred", "hit_tokens", "unkeyable"])
        self._waited_s = 0.0  # inline lookup waits in this step (m21)
        self._warned: set[str] = set()

    @property
    def stats(self) -> dict[str, float]:
        return {**self.counters.snapshot(), "lookup_failures": self.lookups.failures}

    def take_stats(self) -> dict[str, float]:
        """Counter increments since the last call (vLLM's ``get_kv_connector_stats``)."""
        return merge(self.counters.take_deltas(), self.lookups.counters.take_deltas())

    # -- vLLM's scheduler calls -------------------------------------------------------

    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Tokens beyond ``num_computed_tokens`` the cache can supply, or None for "ask
        again next step"; loads are synchronous (done within the step's forward)."""
        tracked = self._track(request)
        tracked.local_tokens = num_computed_tokens
        num_tokens = int(request.num_tokens)
        chunks = self.geometry.full_chunks(num_tokens)
        if chunks * self.geometry.chunk_tokens <= num_computed_tokens:
            return 0, False
        lookup = tracked.lookup
        now = time.monotonic()
        if lookup is None or (lookup.done.is_set() and now - lookup.at > _ANSWER_TTL_S):
            chains = self._chains(tracked, chunks)
            if chains is None:
                return 0, False  # unkeyable: never shares
            self.counters.add("lookups")
            lookup = tracked.lookup = self.lookups.submit(chains)
        if not lookup.done.is_set():
            budget = self.settings.lookup_wait_ms / 1000 - self._waited_s
            started = time.monotonic()
            done = budget > 0 and lookup.done.wait(budget)
            self._waited_s += time.monotonic() - started
            if not done:
                self.counters.add("deferred")
                return None, False
        hit_tokens = min(lookup.hits * self.geometry.chunk_tokens, num_tokens - 1)
        tracked.saved_chunks = max(tracked.saved_chunks, lookup.hits)
        return max(0, hit_tokens - num_computed_tokens), False

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        tracked = self._track(request)
        tracked.lookup = None  # consumed: a later reschedule (preemption) asks afresh
        if num_external_tokens <= 0:
            return
        table = _block_table(blocks)
        local = tracked.local_tokens
        end = local + num_external_tokens
        first = local // self.geometry.chunk_tokens
        last = -(-end // self.geometry.chunk_tokens)
        block_ids: list[tuple[int, ...]] = []
        for chunk in range(first, last):
            ids = self.geometry.chunk_blocks(table, chunk, keep_below_token=local)
            if ids is None:
                break
            block_ids.append(ids)
        if not block_ids:
            return
        chains = self._chains(tracked, first + len(block_ids))
        assert chains is not None, "a load is only planned for a request that was keyed"
        job = LoadJob(
            req_id=request.request_id,
            first_chunk=first,
            keys=tuple(tuple(chain[first : first + len(block_ids)]) for chain in chains),
            block_ids=tuple(block_ids),
        )
        self._loads.append(job)
        for offset, ids in enumerate(block_ids):
            for block in ids:
                if block != KEEP:
                    self._loading[block] = (request.request_id, first + offset)
                    tracked.loading.append(block)
        tracked.saved_chunks = max(tracked.saved_chunks, first + len(block_ids))
        self.counters.add("hit_tokens", num_external_tokens)

    def build_plan(self, scheduler_output: Any) -> StepPlan:
        self._waited_s = 0.0  # vLLM builds one plan per step: a new step's wait budget
        plan = StepPlan(loads=self._loads)
        self._loads = []
        for new in scheduler_output.scheduled_new_reqs:
            tracked = self._requests.get(new.req_id)
            if tracked is not None:
                tracked.block_ids = list(_first_group(new.block_ids))
        cached = scheduler_output.scheduled_cached_reqs
        resumed = set(getattr(cached, "resumed_req_ids", ()) or ())
        for i, req_id in enumerate(cached.req_ids):
            tracked = self._requests.get(req_id)
            new_ids = cached.new_block_ids[i] if i < len(cached.new_block_ids) else None
            if tracked is None:
                continue
            if req_id in resumed:
                tracked.block_ids = list(_first_group(new_ids)) if new_ids else []
            elif new_ids:
                tracked.block_ids.extend(_first_group(new_ids))
        for req_id, num_scheduled in scheduler_output.num_scheduled_tokens.items():
            tracked = self._requests.get(req_id)
            if tracked is not None and tracked.save and self.settings.save:
                job = self._save_job(tracked, num_scheduled)
                if job is not None:
                    plan.saves.append(job)
        return plan

    def load_failed(self, block_ids: Iterable[int]) -> None:
        """vLLM reported these blocks as not loaded: save their chunks again once recomputed."""
        for block in block_ids:
            where = self._loading.get(block)
            if where is None:
                continue
            tracked = self._requests.get(where[0])
            if tracked is not None:
                tracked.saved_chunks = min(tracked.saved_chunks, where[1])

    def finished(self, request: Any) -> tuple[bool, dict[str, Any] | None]:
        tracked = self._requests.pop(request.request_id, None)
        if tracked is not None:
            for block in tracked.loading:
                if self._loading.get(block, ("",))[0] == request.request_id:
                    del self._loading[block]
        return False, None  # saves complete within the step: vLLM may free the blocks now

    def close(self) -> None:
        self.lookups.close()

    # -- internals --------------------------------------------------------------------

    def _track(self, request: Any) -> _Tracked:
        tracked = self._requests.get(request.request_id)
        if tracked is None or tracked.request is not request:
            params = getattr(request, "kv_transfer_params", None) or {}
            tracked = _Tracked(
                request=request,
                chains=[[] for _ in self.namespaces],
                save=bool(params.get("shoal_save", True)),
            )
            self._requests[request.request_id] = tracked
        return tracked

    def _chains(self, tracked: _Tracked, num_chunks: int) -> list[list[BlockKey]] | None:
        """Each rank's keys of the first ``num_chunks`` chunks, hashing only new chunks;
        None for a request whose extra keys cannot be encoded (never shared)."""
        if tracked.unkeyable:
            return None
        have = len(tracked.chains[0])
        if have < num_chunks:
            size = self.geometry.chunk_tokens
            request = tracked.request
            tokens = list(request.all_token_ids[have * size : num_chunks * size])
            extras: list[bytes] | None = None
            if has_extra_keys(request):
                try:
                    extras = [
                        chunk_extra(request, c * size, (c + 1) * size)
                        for c in range(have, have + len(tokens) // size)
                    ]
                except UnkeyableRequest as exc:
                    self._unkeyable(tracked, exc)
                    return None
            for rank, namespace in enumerate(self.namespaces):
                chain = tracked.chains[rank]
                parent = chain[-1] if chain else None
                chain.extend(chain_keys(namespace, tokens, size, parent, extras))
        return [chain[:num_chunks] for chain in tracked.chains]

    def _unkeyable(self, tracked: _Tracked, exc: UnkeyableRequest) -> None:
        tracked.unkeyable = exc.reason
        tracked.save = False
        self.counters.add("unkeyable")
        if exc.reason not in self._warned:  # once per reason, not once per request
            self._warned.add(exc.reason)
            log.warning("request %s is neither loaded nor saved: %s",
                        tracked.request.request_id, exc)  # fmt: skip

    def _save_job(self, tracked: _Tracked, num_scheduled: int) -> SaveJob | None:
        request = tracked.request
        done_tokens = min(
            int(request.num_computed_tokens) + int(num_scheduled), len(request.all_token_ids)
        )
        if not self.settings.save_decode:
            done_tokens = min(done_tokens, len(request.prompt_token_ids or ()))
        full = self.geometry.full_chunks(done_tokens)
        first = tracked.saved_chunks
        if full <= first:
            return None
        block_ids: list[tuple[int, ...]] = []
        for chunk in range(first, full):
            ids = self.geometry.chunk_blocks(tracked.block_ids, chunk)
            if ids is None:
                break
            block_ids.append(ids)
        if not block_ids:
            return None
        chains = self._chains(tracked, first + len(block_ids))
        if chains is None:
            return None
        tracked.saved_chunks = first + len(block_ids)
        return SaveJob(
            req_id=request.request_id,
            first_chunk=first,
            keys=tuple(tuple(chain[first:]) for chain in chains),
            parents=tuple(chain[first - 1] if first else None for chain in chains),
            block_ids=tuple(block_ids),
        )


def _first_group(block_ids: Any) -> list[int]:
    """vLLM passes block ids per KV-cache group (a tuple of lists); older versions a list."""
    if block_ids and isinstance(block_ids[0], list | tuple):
        return list(block_ids[0])
    return list(block_ids or ())


def _block_table(blocks: Any) -> list[int]:
    """Block ids from a ``KVCacheBlocks`` (or, in older vLLM, a plain list)."""
    get = getattr(blocks, "get_block_ids", None)
    return _first_group(get() if get is not None else blocks)
