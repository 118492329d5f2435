"""Continuous batching over the simulated KV cache, step by step, as vLLM v1 schedules.

One ``schedule()`` builds one step under two budgets, ``max_num_batched_tokens`` (tokens
computed in the step) and ``max_num_seqs`` (requests in it):

1. running requests first, in arrival order: a decoding request takes 1 token, one still
   in (chunked) prefill takes what is left of its prompt, capped by the token budget. Its
   new tokens need KV blocks; when the pool has none free the *last* running request is
   preempted (vLLM's recompute preemption: its blocks are freed, its computed count reset,
   it goes back to the head of the waiting queue keeping its generated tokens) until the
   allocation fits, or the request preempts itself;
2. then, only when step 1 preempted nothing (as vLLM: the blocks a preemption freed go to
   no newcomer in the same step), waiting requests, first come first served: the longest
   cached prefix of full blocks is taken from the prefix cache (never the whole prompt:
   the last token is always computed, as vLLM caps hits at ``num_tokens - 1``), and the
   rest is chunked into the token budget. A request that does not fit in the free blocks
   stops the queue (head of line, like vLLM). A request whose adapter would make the
   step's distinct adapters exceed ``max_loras`` is skipped for this step and keeps its
   place.

A request's blocks that the step fills are cached as soon as they are allocated for it, as
vLLM's ``allocate_slots`` does: a request admitted later in the same step hits blocks
that this step computes (two identical prompts arriving together compute them once).
``update(plan)`` then applies the step: computed counts advance, a request whose known
tokens are all computed samples one token (``tokens.generated_token``), finished
requests free their blocks; the engine publishes the step's KV events after it. A
request finishes with "length" at ``max_tokens`` or at ``max_model_len`` (the simulator
never samples EOS, as vLLM with ``ignore_eos``).

LoRA: ``max_loras`` bounds the distinct adapters in one step (vLLM's GPU LoRA slots,
checked in its scheduler); ``max_cpu_loras`` bounds the adapters resident in the worker's
LRU cache (vLLM's ``LRUCacheWorkerLoRAManager``): a step that uses a non-resident adapter
pays ``lora_load_s`` and evicts the least recently used one. The API may list more adapters
than are resident, as vLLM's does.

Rejected: simulating vLLM's async scheduling or speculative decoding (neither changes what
routers and autoscalers observe at this fidelity); priority scheduling (FCFS only).
"""

from __future__ import annotations

import enum
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from sim.blocks import BlockPool, block_hash
from sim.profile import StepShape
from sim.tokens import generated_token, prompt_seed

__all__ = ["Request", "Scheduler", "SchedulerConfig", "Status", "StepPlan"]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_gpu_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 4096
    max_loras: int = 1
    max_cpu_loras: int = 1
    vocab_size: int = 32000
    enable_prefix_caching: bool = True


@dataclass(eq=False, slots=True)
class Request:
    """One request's state; owned by the scheduler, read by the engine."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    arrival_s: float
    lora: tuple[int, str] | None = None  # (lora_int_id, lora_name)
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_blocks: int = 0  # of block_ids, how many are in the prefix cache
    num_cached_tokens: int = -1  # prefix hit at the first schedule; -1 before it
    num_preemptions: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_reason: str | None = None
    seed: int = 0
    ready_s: float = 0.0  # when the engine core got it (arrival + the API server's time)

    def __post_init__(self) -> None:
        self.seed = prompt_seed(self.prompt_ids)
        self.ready_s = self.arrival_s

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, index: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[index] if index < n else self.output_ids[index - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        return [self.token(i) for i in range(start, stop)]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: how many tokens each scheduled request computes, and its cost shape."""

    scheduled: tuple[tuple[Request, int], ...]
    shape: StepShape
    preempted: tuple[Request, ...] = ()
    newly_scheduled: tuple[Request, ...] = ()  # first schedule ever (prefix stats)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What ``update`` did: tokens sampled (request, token id) and finished requests."""

    sampled: tuple[tuple[Request, int], ...]
    finished: tuple[Request, ...]


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.pool = BlockPool(
            config.num_gpu_blocks, config.block_size, caching=config.enable_prefix_caching
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._resident_loras: OrderedDict[int, None] = OrderedDict()
        self.num_preemptions = 0
        self.num_deferred = 0  # waiting requests the last step skipped for max_loras

    # -- requests in and out ------------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request: Request) -> None:
        """A client went away: drop the request wherever it is."""
        if request.status is Status.FINISHED:
            return
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._finish(request, "abort")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------

    def schedule(self) -> StepPlan:
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        loras = {r.lora[0] for r in self.running if r.lora}

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed, budget)
            assert num_new > 0, f"running request {request.request_id} has nothing to compute"
            while not self._grow(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                break
            self._cache_full_blocks(request, request.num_computed + num_new)
            scheduled.append((request, num_new))
            budget -= num_new
            index += 1

        newly: list[Request] = []
        skipped: list[Request] = []
        # vLLM admits from the waiting queue only in a step that preempted nothing.
        while (
            not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs
        ):
            request = self.waiting[0]
            if request.lora and request.lora[0] not in loras and len(loras) >= cfg.max_loras:
                skipped.append(self.waiting.popleft())
                continue
            hit = self._prefix_hit(request)
            num_computed = len(hit) * cfg.block_size
            num_new = min(request.num_tokens - num_computed, budget)
            needed = -(-(num_computed + num_new) // cfg.block_size) - len(hit)
            self.pool.touch(hit)
            fresh = self.pool.allocate(needed)
            if fresh is None:
                self.pool.free(hit)
                break
            self.waiting.popleft()
            request.block_ids = hit + fresh
            request.num_cached_blocks = len(hit)
            request.num_computed = num_computed
            self._cache_full_blocks(request, num_computed + num_new)
            request.status = Status.RUNNING
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_computed
                newly.append(request)
            if request.lora:
                loras.add(request.lora[0])
            self.running.append(request)
            scheduled.append((request, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(skipped))
        self.num_deferred = len(skipped)

        return StepPlan(tuple(scheduled), self._shape(scheduled), tuple(preempted), tuple(newly))

    def update(self, plan: StepPlan, now_s: float) -> StepResult:
        """Apply ``plan`` as computed at simulated time ``now_s`` (the step's end)."""
        sampled: list[tuple[Request, int]] = []
        finished: list[Request] = []
        for request, num_new in plan.scheduled:
            if request.status is not Status.RUNNING:
                continue  # preempted later in the same plan
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now_s
            request.num_computed += num_new
            if request.num_computed < request.num_tokens:
                continue  # a prefill chunk: nothing sampled yet
            token = generated_token(request.seed, len(request.output_ids), self.config.vocab_size)
            request.output_ids.append(token)
            if request.first_token_s is None:
                request.first_token_s = now_s
            sampled.append((request, token))
            if len(request.output_ids) >= request.max_tokens or (
                request.num_tokens >= self.config.max_model_len
            ):
                self.running.remove(request)
                self._finish(request, "length")
                finished.append(request)
        return StepResult(tuple(sampled), tuple(finished))

    # -- internals ----------------------------------------------------------------

    def _shape(self, scheduled: Sequence[tuple[Request, int]]) -> StepShape:
        prefill = decode = context = loaded = 0
        pairs = 0.0
        for request, num_new in scheduled:
            if request.num_computed >= len(request.prompt_ids) and num_new == 1:
                decode += 1
            else:
                prefill += num_new
                pairs += num_new * request.num_computed + num_new * (num_new + 1) / 2
            context += request.num_computed + num_new
            if request.lora:
                loaded += self._use_lora(request.lora[0])
        return StepShape(prefill, decode, context, loaded, pairs)

    def _use_lora(self, lora_id: int) -> int:
        """1 when ``lora_id`` had to be loaded into the CPU LoRA cache."""
        if lora_id in self._resident_loras:
            self._resident_loras.move_to_end(lora_id)
            return 0
        self._resident_loras[lora_id] = None
        while len(self._resident_loras) > self.config.max_cpu_loras:
            self._resident_loras.popitem(last=False)
        return 1

    def forget_lora(self, lora_id: int) -> None:
        """An adapter unloaded by the API leaves the worker's cache too."""
        self._resident_loras.pop(lora_id, None)

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The chained hashes of ``request``'s first ``num_blocks`` full blocks."""
        size = self.config.block_size
        hashes = request.block_hashes
        lora_name = request.lora[1] if request.lora else None
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, request.tokens(i * size, (i + 1) * size), lora_name))
        return hashes[:num_blocks]

    def _prefix_hit(self, request: Request) -> list[int]:
        if not self.config.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.config.block_size
        return self.pool.longest_hit(self._hashes(request, max_blocks))

    def _grow(self, request: Request, num_new: int) -> bool:
        needed = -(-(request.num_computed + num_new) // self.config.block_size)
        extra = needed - len(request.block_ids)
        if extra <= 0:
            return True
        fresh = self.pool.allocate(extra)
        if fresh is None:
            return False
        request.block_ids.extend(fresh)
        return True

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        """Cache the blocks that the first ``num_tokens`` tokens fill (vLLM's
        ``allocate_slots``: at schedule time, for the tokens this step computes)."""
        size = self.config.block_size
        full = min(min(num_tokens, request.num_tokens) // size, len(request.block_ids))
        start = request.num_cached_blocks
        if full <= start:
            return
        hashes = self._hashes(request, full)
        self.pool.cache(
            request.block_ids[start:full],
            hashes[start:full],
            hashes[start - 1] if start else None,
            request.tokens(start * size, full * size),
            request.lora,
        )
        request.num_cached_blocks = full

    def _preempt(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_cached_blocks = 0
        request.num_computed = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _finish(self, request: Request, reason: str) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.status = Status.FINISHED
        request.finish_reason = reason
