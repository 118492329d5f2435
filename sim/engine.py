"""The engine core of one simulated vLLM: the step loop in simulated time.

Time: ``SimClock`` maps wall time to simulated time, ``sim = (monotonic - t0) * scale``
(``--time-scale``). A step of the profile's ``t`` simulated seconds ends at
``start + t``; the loop sleeps until the wall clock reaches that point and stamps the
step's tokens with ``start + t`` exactly. Back-to-back steps are chained on their modelled
ends (absolute deadlines), so the event loop's timer overshoot (about 1 ms: epoll and
uvloop timers have millisecond resolution) does not accumulate into simulated time; it is
absorbed up to ``_TIMER_SLACK_S`` of wall time. Simulated time therefore resolves about
2 ms x ``--time-scale``: pick a scale that keeps step times well above that. A step never
starts before the arrival of a request in it. When the host is too slow to keep up (a
step ends more than the slack after its deadline), the chain restarts from "now" and the
overshoot is counted as lag in
``shoal_sim_lag_seconds_total`` (against ``shoal_sim_step_seconds_total``) and in latencies
larger than the model's, which is how ``bench/engine_sim.py`` finds how many engines a core
sustains.

Timer lateness is also what a client sees: every timed wait (a request's admission, the
step that serves it) woke ~0.5-1 ms after its deadline, which made a 12 ms TTFT 1.5 ms
(12%) long against the real engine it was calibrated on. So the loop keeps a running mean
of how late its timers fire (``_early_s``, at most ``_EARLY_MAX_S``) and sets each one that
much early: on average a token leaves at its modelled time, while its metrics still stamp
the modelled time exactly.

Flow per step: ``Scheduler.schedule()`` -> price the ``StepShape`` with the profile
(times the slowdown fault) -> sleep -> ``Scheduler.update()`` -> hand each sampled token to
its request's queue -> metrics -> publish the step's KV events. The loop waits on an event
when there is no work (an idle engine costs nothing), and yields to the event loop after
every step, even one whose end is already past, so the HTTP server runs between steps at
any ``--time-scale``.

Requests are submitted as token ids (the server tokenizes). ``submit_group`` fans a request
with ``n`` > 1 out as vLLM v1's ``ParentRequest`` does: ``n`` child requests ``<i>_<id>``
with the same prompt, admitted together, each scheduled, cached, preempted and counted as a
request of its own (so the second child finds the first one's full prompt blocks in the
prefix cache), their tokens on one queue tagged with the choice index; the parent's
``n`` and the largest child output are observed once, when its last child finishes
(``vllm:request_params_n``, ``vllm:request_max_num_generation_tokens``). A client that goes
away aborts its requests (``abort``), freeing their blocks at once, as vLLM does. Like vLLM's output
processor, which drops a client-aborted request's state before any finished stats, such a
request counts in no ``vllm:`` series (``request_success{finished_reason="abort"}``
included: vLLM's stays 0 on client hang-ups); ``shoal_sim_client_aborts_total`` counts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from sim.events import EventPublisher, NullEventPublisher
from sim.faults import Faults
from sim.metrics import SimMetrics
from sim.profile import StepProfile
from sim.scheduler import Request, Scheduler, SchedulerConfig, StepResult

__all__ = ["Engine", "RequestHandle", "SimClock", "TokenOut"]

log = logging.getLogger("shoal." + __name__)
_IDLE_TICK_S = 0.001  # wall seconds between tries when work exists but none can be scheduled
_TIMER_SLACK_S = 0.002  # wall seconds of timer overshoot absorbed by chaining step deadlines
_EARLY_MAX_S = 0.002  # the most a timer is set early to make up for its usual lateness
_EARLY_GAIN = 0.1  # weight of the newest lateness in the running mean


class SimClock:
    """Simulated seconds since start, ``scale`` times faster than the wall clock."""

    def __init__(self, scale: float = 1.0) -> None:
        assert scale > 0, "the CLI checks --time-scale"
        self.scale = scale
        self.t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self.t0) * self.scale

    def wall_of(self, sim_s: float) -> float:
        return self.t0 + sim_s / self.scale


@dataclass(frozen=True, slots=True)
class TokenOut:
    token_id: int
    finish_reason: str | None  # set on the request's last token
    index: int = 0  # the choice of the answer it belongs to (the handle's index)


@dataclass(eq=False, slots=True)
class RequestHandle:
    request: Request
    queue: asyncio.Queue[TokenOut] = field(default_factory=asyncio.Queue)
    index: int = 0


@dataclass(eq=False, slots=True)
class _Parent:
    """vLLM's ``ParentRequest`` stats: ``n`` children, observed once the last one ends."""

    n: int
    live: int
    max_generated: int = 0


class Engine:
    def __init__(
        self,
        config: SchedulerConfig,
        profile: StepProfile,
        metrics: SimMetrics,
        *,
        clock: SimClock | None = None,
        faults: Faults | None = None,
        publisher: EventPublisher | None = None,
    ) -> None:
        self.scheduler = Scheduler(config)
        self.profile = profile
        self.metrics = metrics
        self.clock = clock or SimClock()
        self.faults = faults or Faults()
        self.publisher: EventPublisher = publisher or NullEventPublisher()
        # Keyed by the request object, not its id: clients choose ids (X-Request-Id) and
        # two live requests may share one, as vLLM allows.
        self._handles: dict[Request, RequestHandle] = {}
        self._wake = asyncio.Event()
        self._last_token_s: dict[Request, float] = {}
        self._parents: dict[Request, _Parent] = {}
        self._slack_s = _TIMER_SLACK_S * self.clock.scale
        self._early_s = 0.0  # wall seconds timers are set early (mean lateness, bounded)
        self.num_steps = 0

    # -- requests -----------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        lora: tuple[int, str] | None = None,
        arrival_s: float | None = None,
    ) -> RequestHandle:
        """``arrival_s``: when the HTTP request came in (simulated time; default now). The
        simulator's own parsing since then counts toward the profile's ``c_request``."""
        now = self.clock.now()
        arrival = now if arrival_s is None else min(arrival_s, now)
        request = Request(request_id, list(prompt_ids), max_tokens, arrival, lora)
        handle = RequestHandle(request)
        self._handles[request] = handle
        self._schedule_admission([request], now, arrival)
        return handle

    def submit_group(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        n: int,
        lora: tuple[int, str] | None = None,
        arrival_s: float | None = None,
        *,
        queue: asyncio.Queue[TokenOut] | None = None,
        first_index: int = 0,
    ) -> list[RequestHandle]:
        """One prompt sampled ``n`` times: ``n`` child requests as vLLM v1 makes them
        (``<i>_<request_id>``; the request itself when ``n`` is 1), admitted together.
        Their tokens go to ``queue`` (shared by all of them; a new one if not given)
        tagged with choice indexes ``first_index``, ``first_index + 1``, ..."""
        assert n >= 1, "the server checks n"
        shared: asyncio.Queue[TokenOut] = asyncio.Queue() if queue is None else queue
        if n == 1:
            handle = self.submit(request_id, prompt_ids, max_tokens, lora, arrival_s)
            handle.queue, handle.index = shared, first_index
            return [handle]
        now = self.clock.now()
        arrival = now if arrival_s is None else min(arrival_s, now)
        parent = _Parent(n, n)
        handles = []
        for i in range(n):
            request = Request(f"{i}_{request_id}", list(prompt_ids), max_tokens, arrival, lora)
            # each child samples its own text (vLLM gives child i the seed + i); child 0
            # answers what the prompt alone would
            request.seed = (request.seed + i) % (1 << 64)
            handle = RequestHandle(request, shared, first_index + i)
            self._handles[request] = handle
            self._parents[request] = parent
            handles.append(handle)
        self._schedule_admission([h.request for h in handles], now, arrival)
        return handles

    def _schedule_admission(self, requests: list[Request], now: float, arrival: float) -> None:
        admission_s = self.profile.c_request_s * self.faults.slowdown - (now - arrival)
        admission = admission_s / self.clock.scale
        if admission > self._early_s:  # the API server's part of the latency (profile.py)
            due = time.monotonic() + admission
            loop = asyncio.get_running_loop()
            loop.call_later(admission - self._early_s, self._admit_all, requests, due)
        else:
            self._admit_all(requests)

    def _admit_all(self, requests: list[Request], due: float | None = None) -> None:
        if due is not None:
            self._note_lateness(time.monotonic() - (due - self._early_s))
        for request in requests:
            self._admit(request)

    def _admit(self, request: Request) -> None:
        if request.finish_reason is not None:
            return  # aborted before the engine saw it
        request.ready_s = self.clock.now()
        self.scheduler.add(request)
        self._gauges()
        self._wake.set()

    def _note_lateness(self, late_s: float) -> None:
        """A timer fired ``late_s`` wall seconds after it was set to: update the mean."""
        late_s = min(max(late_s, 0.0), _EARLY_MAX_S)
        self._early_s += _EARLY_GAIN * (late_s - self._early_s)

    def abort(self, handle: RequestHandle) -> None:
        request = handle.request
        if request.finish_reason is not None:
            return
        self.scheduler.abort(request)
        self._handles.pop(request, None)
        self._last_token_s.pop(request, None)
        self._parents.pop(request, None)  # its parent is never observed, as in vLLM
        self.metrics.client_aborts.inc()
        self._gauges()

    # -- the loop -----------------------------------------------------------------

    async def run(self) -> None:
        chained: float | None = None  # the last step's modelled end, while back to back
        while True:
            if not self.scheduler.has_work:
                chained = None
                self._wake.clear()
                await self._wake.wait()
            plan = self.scheduler.schedule()
            if not plan.scheduled:
                chained = None
                await asyncio.sleep(_IDLE_TICK_S)
                continue
            start = self.clock.now() if chained is None else chained
            # A step cannot start before a request in it reached the engine (one that came
            # in during the timer's overshoot of the previous step).
            start = max([start, *(r.ready_s for r in plan.newly_scheduled)])
            caching = self.scheduler.config.enable_prefix_caching
            for request in plan.newly_scheduled:
                request.first_scheduled_s = start
                if not caching:
                    continue  # vLLM counts only requests that looked the cache up
                self.metrics.prefix_queries.inc(request.num_tokens)
                self.metrics.prefix_hits.inc(request.num_cached_tokens)
                self.metrics.prompt_tokens_cached_by_source["device"].inc(request.num_cached_tokens)
            if plan.preempted:
                self.metrics.preemptions.inc(len(plan.preempted))
            self._gauges()
            step_s = self.profile.step_s(plan.shape) * self.faults.slowdown
            end = start + step_s
            wake = self.clock.wall_of(end) - self._early_s
            delay = wake - time.monotonic()
            # Yield every step, even one already due: far faster than real time (or behind
            # it) no step waits, and without this the loop would hold the event loop, and
            # so /health, /metrics, new requests and streamed tokens, until idle.
            await asyncio.sleep(max(0.0, delay))
            if delay > 0:
                self._note_lateness(time.monotonic() - wake)
            overshoot = self.clock.now() - end
            if overshoot <= self._slack_s:
                chained = end  # timer jitter: the next step starts at this one's end
                self.metrics.lag.set(0.0)
            else:  # the host fell behind the model: restart the chain from now
                chained = None
                self.metrics.lag.set(overshoot)
                self.metrics.lag_seconds.inc(overshoot)
            self.metrics.step_seconds.inc(step_s)
            self.metrics.steps.inc()
            result = self.scheduler.update(plan, end)
            self.num_steps += 1
            self._deliver(result, end)
            self._gauges()
            await self.publisher.publish(self.scheduler.pool.take_events())

    def _deliver(self, result: StepResult, now: float) -> None:
        m = self.metrics
        # vLLM observes a step that produced output: the prompt tokens computed for the
        # requests whose first token it carries, plus the tokens it generated.
        prefilled = sum(
            len(r.prompt_ids) - max(0, r.num_cached_tokens)
            for r, _ in result.sampled
            if r not in self._last_token_s
        )
        if result.sampled:
            m.iteration_tokens.observe(prefilled + len(result.sampled))
        finished = {id(r) for r in result.finished}
        for request, token in result.sampled:
            m.generation_tokens.inc()
            last = self._last_token_s.get(request)
            if last is None:
                m.ttft.observe(now - request.arrival_s)
                cached = max(0, request.num_cached_tokens)
                m.prompt_tokens.inc(len(request.prompt_ids))
                m.prompt_tokens_cached.inc(cached)
                m.prompt_tokens_by_source["local_cache_hit"].inc(cached)
                m.prompt_tokens_by_source["local_compute"].inc(len(request.prompt_ids) - cached)
            else:
                m.itl.observe(now - last)
            self._last_token_s[request] = now
            reason = request.finish_reason if id(request) in finished else None
            handle = self._handles.get(request)
            if handle is not None:
                handle.queue.put_nowait(TokenOut(token, reason, handle.index))
            if reason is not None:
                self._finished(request, now)

    def _finished(self, request: Request, now: float) -> None:
        m = self.metrics
        self._handles.pop(request, None)
        self._last_token_s.pop(request, None)
        reason = request.finish_reason
        assert reason is not None, "only finished requests get here"
        m.success[reason].inc()
        num_out = len(request.output_ids)
        first = request.first_token_s if request.first_token_s is not None else now
        scheduled = request.first_scheduled_s if request.first_scheduled_s is not None else now
        # vLLM's finished-request stats (``IterationStats.update_from_finished_request`` and
        # the logger): queue time from the engine core's QUEUED event, not the HTTP arrival;
        # a one-token answer has a time per output token of 0; n and max_tokens are
        # observed when the request finishes.
        m.e2e.observe(now - request.arrival_s)
        m.queue_time.observe(scheduled - request.ready_s)
        m.inference_time.observe(now - scheduled)
        m.prefill_time.observe(first - scheduled)
        m.decode_time.observe(now - first)
        m.tpot.observe((now - first) / (num_out - 1) if num_out > 1 else 0.0)
        m.request_prompt_tokens.observe(len(request.prompt_ids))
        m.request_generation_tokens.observe(num_out)
        m.prefill_kv_computed.observe(len(request.prompt_ids) - max(0, request.num_cached_tokens))
        m.max_tokens_param.observe(request.max_tokens)
        m.request_preemptions.observe(request.num_preemptions)
        parent = self._parents.pop(request, None)
        if parent is None:
            m.n_param.observe(1)
            m.max_num_generation_tokens.observe(num_out)
            return
        parent.live -= 1
        parent.max_generated = max(parent.max_generated, num_out)
        if parent.live == 0:
            m.n_param.observe(parent.n)
            m.max_num_generation_tokens.observe(parent.max_generated)

    def _gauges(self) -> None:
        s = self.scheduler
        self.metrics.running.set(len(s.running))
        self.metrics.waiting.set(len(s.waiting))
        self.metrics.waiting_by_reason["deferred"].set(s.num_deferred)
        self.metrics.waiting_by_reason["capacity"].set(len(s.waiting) - s.num_deferred)
        self.metrics.kv_usage.set(s.pool.usage)
        running = sorted({r.lora[1] for r in s.running if r.lora})
        waiting = sorted({r.lora[1] for r in s.waiting if r.lora})
        self.metrics.lora_info(running, waiting, time.time())
