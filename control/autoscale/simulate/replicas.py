"""Simulated replicas: continuous batching priced by the engine simulator's step profile.

Each ``SimReplica`` runs the same schedule as ``sim.scheduler`` (vLLM v1): every step
decodes one token for each running request that has finished its prompt, and spends the
rest of the token budget (``max_num_batched_tokens``) on prompts, first come first
served; a step costs ``StepProfile.step_s`` of its shape. Requests wait while the batch
holds ``max_num_seqs`` or the KV cache cannot take their prompt; when decoding fills the
cache the newest running request is preempted and recomputed later (vLLM's recompute
preemption). TTFT, TPOT and queueing come out of that, not out of a formula.

The approximation (why this is fast): steps are not taken one by one. Between two events
(an arrival at the engine, a prompt finished, a request finished, the KV cache full, the
end of the caller's tick) every step has the same shape, so a *segment* of ``k`` steps
(``k`` may be fractional) is priced at once: ``k`` times the step time of that shape.
Within a segment the prompt queue is a fluid: ``budget - decoding`` prompt tokens per step
stream through the queue head, so several short prompts share one step as they do in
vLLM. The cost is O(events), about three per request, instead of O(steps) (an hour of a
busy replica is ~10^5 steps of ~20 ms). What it leaves out: a step's context term uses the
context at the segment's start (it grows by ``decoding`` tokens per step), a prompt's
blocks are reserved whole when it is admitted (vLLM allocates them chunk by chunk), and no
prefix caching (every prompt computes in full). ``tests/unit/test_autoscale_replicas.py``
replays the same requests through ``sim.scheduler`` step by step: mean TTFT -6%, +10% and
-2% off on a light, an overloaded and a KV-bound load (p90 -4..+12%, end-to-end -2..+8%),
at 1% of the time.

A replica exposes what a vLLM engine's ``/metrics`` does: gauges (KV usage, waiting,
running) and counters (prompt and generation tokens, finished requests, the TTFT
histogram's sum and count) as a ``ReplicaCounters`` value; ``pipeline.py`` turns counters
into rates the way a scraper or Prometheus does.

Rejected: stepping ``sim.scheduler`` itself (exact, but ~50x too slow for an hour of a
fleet x 5 policies x 6 traces in the bench's three minutes); a pure M/G/c queue (no
batching, so TTFT under load and KV pressure, what the policies react to, would be wrong).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from sim.profile import DEFAULT_PROFILE, StepProfile

__all__ = ["ReplicaConfig", "ReplicaCounters", "SimReplica", "SimRequest", "request_work_s"]

_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class ReplicaConfig:
    """One replica's engine: its step profile and vLLM's batch limits.

    Defaults are ``shoal sim engine``'s: the 7B/A100 roofline profile, 8,192 blocks of 16
    tokens (131,072 tokens of KV), 256 sequences, 2,048 tokens per step.
    """

    profile: StepProfile = DEFAULT_PROFILE
    kv_capacity_tokens: int = 8192 * 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        assert self.kv_capacity_tokens > 1 and self.max_num_seqs > 0, "bad replica config"
        assert self.max_num_batched_tokens > self.max_num_seqs // 64, "bad token budget"


@dataclass(eq=False, slots=True)
class SimRequest:
    """A request's life; owned by the replica serving it, read by the run's figures."""

    index: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ready_s: float = 0.0  # reaches the engine core (arrival + hold + API server time)
    first_token_s: float | None = None
    finish_s: float | None = None
    generated: int = 0  # tokens generated before the current prefill/decode run
    remaining: float = 0.0  # prompt tokens left to compute (prefill)
    context: int = 0  # tokens its prefill computes: prompt + generated (after preemption)
    start_g: float = 0.0  # replica's decode-step count when its decoding started
    preemptions: int = 0

    @property
    def tpot_s(self) -> float | None:
        if self.finish_s is None or self.first_token_s is None:
            return None
        if self.output_tokens <= 1:
            return 0.0
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)


@dataclass(frozen=True, slots=True)
class ReplicaCounters:
    """What one scrape of a replica's ``/metrics`` reads (vLLM's series)."""

    now_s: float
    kv_cache_usage: float  # vllm:kv_cache_usage_perc
    num_waiting: int  # vllm:num_requests_waiting
    num_running: int  # vllm:num_requests_running
    prompt_tokens_total: float  # vllm:prompt_tokens_total
    generation_tokens_total: float  # vllm:generation_tokens_total
    requests_total: int  # vllm:request_success_total
    ttft_sum_s: float  # vllm:time_to_first_token_seconds_sum
    ttft_count: int  # vllm:time_to_first_token_seconds_count


def request_work_s(profile: StepProfile, prompt: int, output: int) -> float:
    """Step time one request adds to a replica that batches it among many: its prompt's
    linear and attention compute, one decode slot per output token, and reading its KV
    (mean context ``prompt + output/2``) once per decode step. Excludes ``c0``, which a
    full batch shares (``run.needed_replicas`` charges it per step)."""
    return (
        profile.c_prefill_s * prompt
        + profile.c_attn_s * prompt * (prompt + 1) / 2
        + profile.c_decode_s * output
        + profile.c_kv_s * output * (prompt + output / 2)
    )


class SimReplica:
    """One engine's batch on virtual time; ``advance(t)`` runs it up to ``t``."""

    def __init__(self, replica_id: str, config: ReplicaConfig, now_s: float) -> None:
        self.replica_id = replica_id
        self.config = config
        self.now_s = now_s
        self.draining = False
        self._inbox: deque[SimRequest] = deque()  # dispatched, not yet at the engine core
        self._waiting: deque[SimRequest] = deque()
        self._prefill: deque[SimRequest] = deque()  # admitted, prompt being computed
        self._decoding: dict[SimRequest, float] = {}  # -> decode step count at finish
        self._finish_heap: list[tuple[float, int, SimRequest]] = []
        self._g = 0.0  # decode steps taken (each decodes one token per running request)
        self._kv_decode = 0.0  # KV tokens of decoding requests
        self._kv_prefill = 0  # KV tokens reserved by admitted prompts
        self._prefill_left = 0.0  # prompt tokens left over self._prefill
        self._queued_prompt = 0  # prompt tokens of inbox + waiting
        self._queued_output = 0  # output tokens of inbox + waiting + prefill
        self._sum_finish_g = 0.0  # over decoding requests
        self._prompt_total = 0.0
        self._generation_total = 0.0
        self._requests_total = 0
        self._ttft_sum = 0.0
        self._ttft_count = 0
        self.finished: list[SimRequest] = []  # taken by the run with take_finished()

    # -- requests in and out --------------------------------------------------------

    def add(self, request: SimRequest) -> None:
        """Dispatch ``request``; it reaches the engine core at ``request.ready_s``."""
        cap = self.config.kv_capacity_tokens - 1
        if request.prompt_tokens + request.output_tokens > cap:
            # vLLM rejects a request longer than max_model_len; the replay keeps it, cut
            # to fit, so every request of a trace is served and counted.
            request.prompt_tokens = max(1, cap - request.output_tokens)
            request.output_tokens = min(request.output_tokens, cap - request.prompt_tokens)
        request.context = request.prompt_tokens
        self._inbox.append(request)
        self._queued_prompt += request.prompt_tokens
        self._queued_output += request.output_tokens

    def take_finished(self) -> list[SimRequest]:
        done, self.finished = self.finished, []
        return done

    @property
    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._prefill or self._decoding)

    @property
    def num_unfinished(self) -> int:
        return len(self._inbox) + len(self._waiting) + len(self._prefill) + len(self._decoding)

    def outstanding_work_s(self) -> float:
        """Seconds of step time this replica owes its requests (least-work dispatch)."""
        p = self.config.profile
        decode_left = self._sum_finish_g - len(self._decoding) * self._g + self._queued_output
        prompt_left = self._prefill_left + self._queued_prompt
        return p.c_prefill_s * prompt_left + p.c_decode_s * decode_left

    def counters(self) -> ReplicaCounters:
        kv = (self._kv_decode + self._kv_prefill) / self.config.kv_capacity_tokens
        return ReplicaCounters(
            now_s=self.now_s,
            kv_cache_usage=min(1.0, max(0.0, kv)),
            num_waiting=len(self._waiting),
            num_running=len(self._decoding) + len(self._prefill),
            prompt_tokens_total=self._prompt_total,
            generation_tokens_total=self._generation_total,
            requests_total=self._requests_total,
            ttft_sum_s=self._ttft_sum,
            ttft_count=self._ttft_count,
        )

    # -- time -----------------------------------------------------------------------

    def advance(self, until_s: float) -> None:
        """Run the batch from ``now_s`` to ``until_s`` (segments of equal steps)."""
        cfg = self.config
        p = cfg.profile
        while self.now_s < until_s - _EPS:
            self._admit()
            num_decoding = len(self._decoding)
            if num_decoding == 0 and not self._prefill:
                # Idle: sleep until the next request reaches the engine, or the tick's end.
                nxt = self._inbox[0].ready_s if self._inbox else until_s
                if self._waiting and nxt <= self.now_s:
                    raise AssertionError("an idle replica could not admit its waiting head")
                self.now_s = min(until_s, max(self.now_s, nxt))
                continue
            budget = max(0, cfg.max_num_batched_tokens - num_decoding)
            head = self._prefill[0] if self._prefill else None
            per_step = min(float(budget), self._prefill_left) if head is not None else 0.0
            pairs = 0.0
            if head is not None and per_step > 0:
                done = head.context - head.remaining
                pairs = per_step * (done + per_step / 2)
            context = self._kv_decode + (self._kv_prefill - self._prefill_left) + per_step
            step_s = (
                p.c0_s
                + p.c_decode_s * num_decoding
                + p.c_prefill_s * per_step
                + p.c_kv_s * context
                + p.c_attn_s * pairs
            )
            steps = (until_s - self.now_s) / step_s
            if self._inbox:
                steps = min(steps, max(0.0, (self._inbox[0].ready_s - self.now_s) / step_s))
            if self._finish_heap:
                steps = min(steps, max(0.0, self._finish_heap[0][0] - self._g))
            if head is not None and per_step > 0:
                steps = min(steps, head.remaining / per_step)
            if num_decoding:
                room = cfg.kv_capacity_tokens - self._kv_decode - self._kv_prefill
                steps = min(steps, max(0.0, room / num_decoding))
            self._run(steps, step_s, num_decoding, per_step)
            self._events()

    def _run(self, steps: float, step_s: float, num_decoding: int, per_step: float) -> None:
        self.now_s += steps * step_s
        self._g += steps
        grown = steps * num_decoding
        self._kv_decode += grown
        self._generation_total += grown
        prompt = steps * per_step
        self._prompt_total += prompt
        self._prefill_left -= prompt
        if self._prefill:
            self._prefill[0].remaining -= prompt  # the segment ends when the head is done

    def _events(self) -> None:
        now = self.now_s
        while self._prefill and self._prefill[0].remaining <= _EPS:
            request = self._prefill.popleft()
            self._prefill_left += request.remaining  # rounding residue
            request.remaining = 0.0
            self._kv_prefill -= request.context
            self._queued_output -= request.output_tokens
            request.generated += 1  # the step that finishes a prompt samples a token
            self._generation_total += 1
            if request.first_token_s is None:
                request.first_token_s = now
                self._ttft_sum += now - request.arrival_s
                self._ttft_count += 1
            left = request.output_tokens - request.generated
            if left <= 0:
                self._finish(request, now)
                continue
            request.start_g = self._g
            finish_g = self._g + left
            self._decoding[request] = finish_g
            self._sum_finish_g += finish_g
            self._kv_decode += request.context + 1
            heapq.heappush(self._finish_heap, (finish_g, request.index, request))
        while self._finish_heap and self._finish_heap[0][0] <= self._g + _EPS:
            finish_g, _, request = heapq.heappop(self._finish_heap)
            if self._decoding.get(request) != finish_g:
                continue  # preempted since: a stale heap entry
            del self._decoding[request]
            self._sum_finish_g -= finish_g
            self._kv_decode -= request.context + 1 + (finish_g - request.start_g)
            self._finish(request, now)
        if not self._prefill:
            self._prefill_left = 0.0  # float drift never outlives the queue
        if not self._decoding:
            self._kv_decode = 0.0  # nor the batch
            self._sum_finish_g = 0.0
        cap = self.config.kv_capacity_tokens
        while self._decoding and self._kv_decode + self._kv_prefill >= cap - _EPS:
            self._preempt_newest()

    def _finish(self, request: SimRequest, now: float) -> None:
        request.finish_s = now
        self._requests_total += 1
        self.finished.append(request)

    def _preempt_newest(self) -> None:
        request = next(reversed(self._decoding))
        finish_g = self._decoding.pop(request)
        self._sum_finish_g -= finish_g
        made = self._g - request.start_g
        self._kv_decode -= request.context + 1 + made
        request.generated += math.floor(made)
        request.context = request.prompt_tokens + request.generated
        request.preemptions += 1
        self._queued_output += request.output_tokens
        self._waiting.appendleft(request)
        self._queued_prompt += request.context

    def _admit(self) -> None:
        cfg = self.config
        while self._inbox and self._inbox[0].ready_s <= self.now_s + _EPS:
            self._waiting.append(self._inbox.popleft())
        while self._waiting:
            request = self._waiting[0]
            if len(self._decoding) + len(self._prefill) >= cfg.max_num_seqs:
                return
            used = self._kv_decode + self._kv_prefill
            if used + request.context > cfg.kv_capacity_tokens - 1 and (
                self._decoding or self._prefill
            ):
                return  # head of line waits for KV, as vLLM's FCFS queue does
            self._waiting.popleft()
            self._queued_prompt -= request.context
            request.remaining = float(request.context)
            self._kv_prefill += request.context
            self._prefill_left += request.context
            self._prefill.append(request)
