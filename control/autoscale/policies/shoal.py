"""``shoal``: SLO-driven scaling from a capacity model, proactive on the arrival trend,
with a fast queue/KV panic path.

Algorithm, once per round (``decide``):

1. **Arrival rate** ``r``: the router's ``ROUTER_ARRIVALS_PER_S``, or, when the router is
   not scraped, the engines' finished-request rate (``REQUESTS_PER_S``: mean over the
   reporting replicas times the ready count, so a failed scrape is extrapolated, not 0).
   The rate provisioned for is its mean over ``rate_window_s`` (one scrape interval's
   count is Poisson-noisy), or the latest when it jumped more than three Poisson
   deviations above that mean (a step is believed at once).
2. **Mix**: mean prompt and output tokens per request, as ratios of sums over
   ``mix_window_s``: ``PROMPT_TOKENS_PER_S`` to the router's arrivals (or to
   ``REQUESTS_PER_S`` without the router), ``GENERATION_TOKENS_PER_S`` to
   ``REQUESTS_PER_S`` (pairs that move together), only from rounds in a steady state:
   no panic, no queue, arrivals within what the ready replicas serve (an overloaded
   engine's counters measure recomputed prompts and a backlog, not the offered mix: a
   step once read as 3,000-token prompts and sized 16 replicas for 4), shrunk toward
   the ``prompt_tokens`` / ``output_tokens`` options by 50 pseudo-requests (the first
   rounds' ratios are all tokens and few finished requests).
3. **Capacity** ``c``: requests/s of that mix one replica serves within ``ttft_slo_s`` and
   ``tpot_slo_s`` (``control.autoscale.capacity``, from the ``profile`` and the engine
   limits), times ``headroom``. A mix the SLO cannot be met for at all uses the replica's
   saturation rate instead (more replicas cannot fix a prompt that alone misses the TTFT).
4. **Trend**: least-squares slope of ``r`` over ``trend_window_s``; when it rises by more
   than three standard errors (noise on a flat rate is no ramp) and each half of the
   window rises too (a step is not a ramp: projecting its jump overshoots), the rate is
   projected ``start_time_s`` ahead (a replica asked for now serves then), never below
   the rate of step 1. SLO recommendation: ``ceil(predicted r / c)``, or the current
   count while the load is within ``tolerance`` of what it serves (HPA's tolerance).
5. **Panic** (fast path): mean waiting requests per replica above ``panic_waiting``, mean
   KV usage above ``panic_kv_usage``, or mean TTFT above ``ttft_slo_s`` while requests
   wait (TTFT lags: without a queue it is the tail of one already drained). It asks at
   once for what the queue needs, ``ceil((demand + waiting / panic_drain_s) / c)``, where
   ``demand`` is the predicted rate (without the router, at least the served rate plus
   the queue's growth: the served rate flattens at capacity), and for at least one
   replica more than are ready unless some are already pending (a queue that grows while
   replicas start does not pile up more of them: AIBrix RFC #2670) or the queue drains
   within ``panic_drain_s`` already. While in panic the desired count never drops.
   **Pinned queues**: a request waiting in an engine stays there (vLLM does not move it),
   so replicas added for a queue can only take new arrivals; the queue-driven asks (the
   drain above, a ``requests_waiting`` target) are capped at the demand's replicas plus
   the replicas holding a queue (``_useful_for_queues``). Without the cap the step trace
   went to 16 replicas where 5 serve it, at the same SLO (29% more replica-seconds).
6. **Targets**: each configured ``MetricTarget`` recommends ``ceil(total / target)`` (the
   ``--metrics`` flag works as for every policy; ``requests_waiting`` capped as above);
   with the SLO, panic and held-request recommendations, the largest known one wins.
   All unknown: hold at ``spec_replicas``.
7. **Scale down** only to the maximum recommendation over ``scale_down_delay_s``; up at
   once. **Zero** (the rule every policy shares, ``windows.ZeroGate``): with
   ``min_replicas == 0``, after ``idle_s`` of rounds in which every known signal (the
   router's arrivals, held and in-flight counts, the engines' running and waiting
   requests, the targets) was 0, at once (the idle period is its own delay; before it one
   replica stays); unknown is not idle. **From zero**: ``ROUTER_HELD > 0`` or any arrival
   recommends one replica or more ("activation"). Pending replicas count: every
   recommendation is a total replica count compared with ``spec_replicas``, which
   includes them, so nothing is asked twice. ``windows.finish_decision`` applies the
   bounds last and writes the decision-log line.

Defaults (``PolicyOptions``): ttft_slo_s 1, tpot_slo_s 0.1, profile "" (sim's 7B/A100
roofline), max_num_seqs 256, max_num_batched_tokens 2048, num_gpu_blocks 8192,
block_size 16, prompt_tokens 512, output_tokens 128, headroom 0.8, tolerance 0.1,
start_time_s 30, rate_window_s 10, trend_window_s 120, mix_window_s 120,
scale_down_delay_s 300 (as HPA's: with ~40 s starts, a replica dropped and needed again
within five minutes costs more SLO than it saves; 90 s flapped on the spike trace,
18 direction changes/h against 2), panic_waiting 4, panic_kv_usage 0.9, panic_drain_s 30,
idle_s 120.

Rejected: utilisation targets alone (KV usage, running requests: they saturate under
overload and say nothing about latency; kept only as ``--metrics``); a Holt-Winters or
ML forecaster (more state and tuning for ramps a linear trend over one start time covers);
Knative's doubled panic window (the queue, KV and TTFT say directly that replicas are
short); sizing the panic by the backlog as concurrency (a queue that grows while replicas
start then asks for more every round: 16 replicas for a step that needed 5).

How it fails: the capacity model assumes Poisson arrivals and its latencies are within
-20%/+30% of the engine simulator's scheduler (capacity.py); burstier traffic is absorbed
by ``headroom`` and, past it, by the panic path; a profile that does not match the engine
mis-sizes every decision (calibrate it with ``shoal sim calibrate``); without the router
the arrival rate is the served rate, which flattens at capacity under overload (only the
panic path then scales up); a trend projected over the top of a ramp, or a panic sized
for a backlog, leaves extra replicas for ``scale_down_delay_s``; a ``--metrics`` queue
target (``requests_waiting:4``) piles up replicas while others start, as it does for
every policy: the SLO path needs none.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import ClassVar

from control.autoscale.capacity import EngineLimits, ReplicaCapacity, Slo, TokenMix, capacity
from control.autoscale.errors import PolicyConfigError
from control.autoscale.policies.base import PolicyOptions, largest_known, register
from control.autoscale.policies.windows import (
    RecommendationWindow,
    ZeroGate,
    finish_decision,
    observed_total,
)
from control.autoscale.types import (
    GENERATION_TOKENS_PER_S,
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_PER_S,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    TTFT_MEAN_S,
    Decision,
    MetricTarget,
    PolicySpec,
    ScaleInput,
)
from sim.errors import ProfileError
from sim.profile import DEFAULT_PROFILE, StepProfile, load_profile

__all__ = ["ShoalPolicy"]

logger = logging.getLogger("shoal." + __name__)

# besides the targets and the router's counts, the engines' own load keeps it from idling
_IDLE_SIGNALS = (MetricTarget(REQUESTS_RUNNING, 1.0), MetricTarget(REQUESTS_WAITING, 1.0))
_EPS = 1e-9  # ceil(x - _EPS): a float a hair above an integer is that integer
_PRIOR_REQUESTS = 50.0  # the prior mix weighs as much as this many measured requests
_TREND_T = 3.0  # a slope counts when it is this many standard errors above zero
_JUMP_SIGMAS = 3.0  # a latest rate this many Poisson deviations above the mean is a step


class _Window:
    """(time, value) points no older than ``horizon_s`` before the newest (pure)."""

    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self.points: deque[tuple[float, float]] = deque()

    def add(self, now_s: float, value: float) -> None:
        self.points.append((now_s, value))
        while self.points and self.points[0][0] < now_s - self.horizon_s:
            self.points.popleft()

    def rising_projection(self, when_s: float) -> float | None:
        """Where a rising trend puts the rate at ``when_s``, or ``None`` when there is none.

        A trend is a slope the whole window agrees on: the least-squares slope over all
        points must exceed ``_TREND_T`` standard errors (noise on a flat rate is no ramp),
        and each half of the window must rise on its own (a step is flat on both sides of
        its jump, so it is left to the panic path instead of being projected into an
        overshoot). The projection uses the smallest of the three slopes from the recent
        half's line."""
        points = list(self.points)
        half = len(points) // 2
        whole, first, recent = _fit(points), _fit(points[:half]), _fit(points[-half:])
        if whole is None or first is None or recent is None:
            return None
        if whole[0] <= _TREND_T * whole[1]:
            return None
        slope = min(whole[0], first[0], recent[0])
        if slope <= 0:
            return None
        _, _, intercept = recent
        return intercept + recent[0] * points[-1][0] + slope * (when_s - points[-1][0])


def _fit(points: list[tuple[float, float]]) -> tuple[float, float, float] | None:
    """Least-squares line: (slope per second, its standard error, intercept at time 0);
    ``None`` with fewer than three points or all at one time."""
    n = len(points)
    if n < 3:
        return None
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    if spread <= 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / spread
    residual = sum((v - mean_v - slope * (t - mean_t)) ** 2 for t, v in points)
    return slope, math.sqrt(residual / (n - 2) / spread), mean_v - slope * mean_t


@register("shoal")
class ShoalPolicy:
    """Shoal's SLO-driven policy (module docstring)."""

    name: ClassVar[str] = "shoal"

    def __init__(self, spec: PolicySpec) -> None:
        options = PolicyOptions(self.name, spec.options)
        self.spec = spec
        ttft = options.number("ttft_slo_s", 1.0, minimum=0.0)
        tpot = options.number("tpot_slo_s", 0.1, minimum=0.0)
        profile_path = options.text("profile", "")
        self.limits = EngineLimits(
            max_num_seqs=int(options.number("max_num_seqs", 256, minimum=1)),
            max_num_batched_tokens=int(options.number("max_num_batched_tokens", 2048, minimum=1)),
            num_gpu_blocks=int(options.number("num_gpu_blocks", 8192, minimum=1)),
            block_size=int(options.number("block_size", 16, minimum=1)),
        )
        prior_prompt = options.number("prompt_tokens", 512, minimum=1)
        prior_output = options.number("output_tokens", 128, minimum=1)
        self.headroom = options.number("headroom", 0.8, minimum=0.0)
        self.start_time_s = options.number("start_time_s", 30.0, minimum=0.0)
        trend_window_s = options.number("trend_window_s", 120.0, minimum=0.0)
        mix_window_s = options.number("mix_window_s", 120.0, minimum=0.0)
        self.rate_window_s = options.number("rate_window_s", 10.0, minimum=0.0)
        self.tolerance = options.number("tolerance", 0.1, minimum=0.0)
        delay_s = options.number("scale_down_delay_s", 300.0, minimum=0.0)
        self.panic_waiting = options.number("panic_waiting", 4.0, minimum=0.0)
        self.panic_kv_usage = options.number("panic_kv_usage", 0.9, minimum=0.0)
        self.panic_drain_s = options.number("panic_drain_s", 30.0, minimum=1.0)
        self.idle_s = options.number("idle_s", 120.0, minimum=0.0)
        options.check()
        if not (ttft > 0 and tpot > 0):
            raise PolicyConfigError("policy shoal: ttft_slo_s and tpot_slo_s must be > 0")
        if not 0 < self.headroom <= 1:
            raise PolicyConfigError(
                f"policy shoal: headroom must be in (0, 1], got {self.headroom}"
            )
        self.slo = Slo(ttft, tpot)
        self.prior_mix = TokenMix(prior_prompt, prior_output)
        self.profile = _profile(profile_path)
        self._arrivals = _Window(trend_window_s)
        # t, prompt tokens, arrivals, generated tokens, finished requests (counts)
        self._mix: deque[tuple[float, float, float, float, float]] = deque()
        self._mix_window_s = mix_window_s
        self._recommended = RecommendationWindow(delay_s)
        self._gate = ZeroGate(self.idle_s)
        self._last_now_s = -math.inf
        self._backlog = _Window(self.rate_window_s)
        self._last_mix_s: float | None = None

    # -- the hook -----------------------------------------------------------------

    def decide(self, observation: ScaleInput) -> Decision:
        obs = observation
        now = obs.now_s
        assert now >= self._last_now_s, (
            f"shoal: time went backwards ({now} after {self._last_now_s})"
        )
        self._last_now_s = now
        arrivals = self._arrival_rate(obs)
        if arrivals is not None:
            self._arrivals.add(now, arrivals)
        mix = self._mix_now()
        cap = capacity(self.profile, mix, self.slo, self.limits)
        triggers = self._panic_triggers(obs, cap)
        waiting = obs.mean(REQUESTS_WAITING)
        keeps_up = arrivals is None or arrivals <= obs.ready_replicas * cap.rps
        if not triggers and keeps_up and (waiting is None or waiting < 1):
            # only in a steady state: a queue or a fleet behind its arrivals holds prompts
            # not computed yet, and overloaded engines recompute some
            self._record_mix(obs, arrivals)
            mix = self._mix_now()
            cap = capacity(self.profile, mix, self.slo, self.limits)
        per_replica = (cap.rps if cap.rps > 0 else cap.saturation_rps) * self.headroom
        running_per_replica = max(1.0, cap.concurrency_at(per_replica))

        per_metric: dict[str, int | None] = {}
        predicted = self._predict(now) if arrivals is not None else None
        per_metric["slo"] = self._slo_replicas(predicted, per_replica, obs.spec_replicas)

        panic = bool(triggers)
        backlog = None if waiting is None else waiting * obs.ready_replicas
        trend = self._backlog_trend(now, backlog)
        demand = self._demand(obs, predicted, trend)
        useful = self._useful_for_queues(obs, demand, per_replica)
        if panic:
            per_metric["panic"] = self._panic_replicas(
                obs, demand, per_replica, backlog or 0.0, trend, useful
            )

        held = obs.router.get(ROUTER_HELD)
        if held is not None and held > 0:
            per_metric["held"] = max(1, _ceil(held / running_per_replica))

        for target in self.spec.targets:
            value = observed_total(obs, target.metric)
            wanted = None if value is None else _ceil(value / target.target)
            if wanted is not None and useful is not None and target.metric == REQUESTS_WAITING:
                wanted = min(wanted, max(useful, 1))  # queues are pinned: see _useful_for_queues
            per_metric[target.metric] = wanted

        recommendation = largest_known(per_metric.values())
        self._gate.observe(obs, _IDLE_SIGNALS + self.spec.targets)
        inputs = (
            f"arrivals {_fmt(arrivals)}/s predicted {_fmt(predicted)}/s; capacity "
            f"{per_replica:.3g}/s per replica ({cap.limit}, mix {mix.prompt_tokens:.0f}/"
            f"{mix.output_tokens:.0f} tokens, headroom {self.headroom:g})"
        )
        if triggers:
            inputs += "; panic: " + ", ".join(triggers)
        bounds: list[str] = []
        if recommendation is None:
            desired = obs.spec_replicas  # every signal unknown: hold
            bounds.append("unknown-hold")
        elif self.spec.min_replicas == 0 and self._gate.idle_for(now) >= self.idle_s:
            # idle for idle_s: zero at once (the idle period is its own delay), and a wake
            # starts from its own demand, not from the window before the idle period
            desired = 0
            self._recommended = RecommendationWindow(self._recommended.window_s)
        else:
            self._recommended.record(now, recommendation)
            desired = self._recommended.max()
            if desired > recommendation:
                bounds.append("scale-down-delay")
            if panic and desired < obs.spec_replicas:
                desired = obs.spec_replicas
                bounds.append("panic-no-scale-down")
        if obs.ready_replicas + obs.pending_replicas == 0 and desired >= 1:
            bounds.append("activation")
        return finish_decision(
            self.name,
            self._gate,
            self.spec,
            obs,
            desired,
            recommendation,
            inputs,
            per_metric,
            bounds,
            panic=panic,
        )

    # -- signals ------------------------------------------------------------------

    def _arrival_rate(self, obs: ScaleInput) -> float | None:
        routed = obs.router.get(ROUTER_ARRIVALS_PER_S)
        if routed is not None:
            return max(0.0, routed)
        served = obs.mean(REQUESTS_PER_S)
        return None if served is None else max(0.0, served) * obs.ready_replicas

    def _record_mix(self, obs: ScaleInput, arrivals: float | None) -> None:
        """Add this round's token and request counts (rates times the round's length).

        Each token count is paired with the request count that moves with it: prompt
        tokens are computed seconds after a request arrives, generated tokens until it
        finishes. So prompts per *arrival* (the router's, when every replica reported)
        and generated tokens per *finished* request: under a rising rate neither pair
        lags the other (prompts per finished request read 3x too long after a step, and
        output tokens per arrival 4x too short)."""
        last, self._last_mix_s = self._last_mix_s, obs.now_s
        if last is None or obs.now_s <= last:
            return
        complete = [
            s.values
            for s in obs.samples
            if s.ok
            and PROMPT_TOKENS_PER_S in s.values
            and GENERATION_TOKENS_PER_S in s.values
            and REQUESTS_PER_S in s.values
        ]
        if not complete:
            return
        prompt = sum(v[PROMPT_TOKENS_PER_S] for v in complete)
        generated = sum(v[GENERATION_TOKENS_PER_S] for v in complete)
        finished = sum(v[REQUESTS_PER_S] for v in complete)
        routed = ROUTER_ARRIVALS_PER_S in obs.router and len(complete) == obs.ready_replicas
        started = arrivals if routed and arrivals is not None else finished
        if min(prompt, generated, finished, started) < 0:
            return
        dt = obs.now_s - last
        self._mix.append((obs.now_s, prompt * dt, started * dt, generated * dt, finished * dt))

    def _mix_now(self) -> TokenMix:
        """Tokens per request over the window, shrunk toward the prior by
        ``_PRIOR_REQUESTS`` pseudo-requests: the first rounds (tokens counted, few
        requests finished yet) cannot read as enormous requests."""
        # the window ends at the newest steady round, not now: a long panic keeps the
        # mix learned before it instead of falling back to the prior
        while self._mix and self._mix[0][0] < self._mix[-1][0] - self._mix_window_s:
            self._mix.popleft()
        k = _PRIOR_REQUESTS
        prompt = k * self.prior_mix.prompt_tokens + sum(m[1] for m in self._mix)
        started = k + sum(m[2] for m in self._mix)
        generated = k * self.prior_mix.output_tokens + sum(m[3] for m in self._mix)
        finished = k + sum(m[4] for m in self._mix)
        return TokenMix(max(1.0, prompt / started), max(1.0, generated / finished))

    def _backlog_trend(self, now_s: float, backlog: float | None) -> float:
        """Requests/s the engines' queue changed by over ``rate_window_s`` (signed; one
        round's change is as noisy as the admissions that make it)."""
        if backlog is None:
            return 0.0
        self._backlog.add(now_s, backlog)
        (first_s, first), (last_s, last) = self._backlog.points[0], self._backlog.points[-1]
        return 0.0 if last_s <= first_s else (last - first) / (last_s - first_s)

    @staticmethod
    def _demand(obs: ScaleInput, predicted: float | None, trend: float) -> float | None:
        """The arrival rate to serve: the prediction; without the router the served rate
        flattens at capacity, so at least the served rate plus the queue's growth."""
        served = obs.mean(REQUESTS_PER_S)
        if ROUTER_ARRIVALS_PER_S not in obs.router and served is not None:
            return max(predicted or 0.0, served * obs.ready_replicas + max(0.0, trend))
        return predicted

    @staticmethod
    def _useful_for_queues(obs: ScaleInput, demand: float | None, per_replica: float) -> int | None:
        """The most replicas a queue can use: the predicted demand's, plus every replica
        that holds a queue. A request waiting in an engine stays there (vLLM does not
        move it, the router sent it at arrival), so a new replica drains no existing
        queue; what it can do is take the new arrivals, so the replicas holding queues get
        none and drain at full speed. Beyond that, replicas asked for a queue are idle
        (measured in the simulator: 16 replicas on the step trace where 5 serve it, at the
        same SLO). ``None`` when the demand is unknown (no cap)."""
        if demand is None:
            return None
        queued = sum(1 for s in obs.samples if s.ok and s.values.get(REQUESTS_WAITING, 0) > 0)
        return _ceil(demand / per_replica) + queued

    def _panic_replicas(
        self,
        obs: ScaleInput,
        demand: float | None,
        per_replica: float,
        backlog: float,
        trend: float,
        useful: int | None,
    ) -> int:
        """What the queue needs: the demand's replicas plus draining the backlog in
        ``panic_drain_s``, but no more than a queue can use (``_useful_for_queues``); and
        one replica more than are ready, unless some are on their way or the queue already
        drains within ``panic_drain_s``."""
        need = _ceil(((demand or 0.0) + backlog / self.panic_drain_s) / per_replica)
        if useful is not None:
            need = min(need, useful)
        draining = trend < 0 and backlog <= -trend * self.panic_drain_s
        floor = obs.ready_replicas + (0 if draining else max(obs.pending_replicas, 1))
        return max(need, floor)

    def _slo_replicas(
        self, predicted: float | None, per_replica: float, current: int
    ) -> int | None:
        """``ceil(predicted / per_replica)``, but ``current`` while the load is within
        ``tolerance`` of what ``current`` replicas serve at the target utilisation (as
        HPA's tolerance: Poisson noise around a boundary must not flap the count)."""
        if predicted is None:
            return None
        if current > 0 and abs(predicted / (current * per_replica) - 1) <= self.tolerance:
            return current
        return _ceil(predicted / per_replica)

    def _predict(self, now_s: float) -> float:
        """The arrival rate to provision for: the mean over ``rate_window_s`` (one scrape
        interval's count is Poisson-noisy), or the latest rate when it jumped beyond that
        noise (``_JUMP_SIGMAS`` standard deviations: a step is believed at once), or the
        rising trend projected ``start_time_s`` ahead, whichever is largest."""
        points = self._arrivals.points
        recent = [v for t, v in points if t >= now_s - self.rate_window_s]
        level = sum(recent) / len(recent)
        latest = points[-1][1]
        if len(points) >= 2 and points[-1][0] > points[-2][0]:
            interval = points[-1][0] - points[-2][0]
            if latest > level + _JUMP_SIGMAS * math.sqrt(latest / interval):
                level = latest
        projected = self._arrivals.rising_projection(now_s + self.start_time_s)
        return level if projected is None else max(level, projected)

    def _panic_triggers(self, obs: ScaleInput, cap: ReplicaCapacity) -> list[str]:
        triggers = []
        waiting = obs.mean(REQUESTS_WAITING)
        if waiting is not None and waiting > self.panic_waiting:
            triggers.append(f"{waiting:.3g} waiting per replica > {self.panic_waiting:g}")
        kv = obs.mean(KV_CACHE_USAGE)
        if kv is not None and kv > self.panic_kv_usage:
            triggers.append(f"KV usage {kv:.3g} > {self.panic_kv_usage:g}")
        ttft = obs.mean(TTFT_MEAN_S)
        # TTFT lags (it is measured on requests that got their first token): with nothing
        # waiting it is the tail of a queue already drained, or a mix the SLO path sizes
        queued = waiting is not None and waiting >= 1
        if ttft is not None and cap.rps > 0 and ttft > self.slo.ttft_s and queued:
            triggers.append(f"TTFT {ttft:.3g}s > {self.slo.ttft_s:g}s")
        return triggers


def _profile(path: str) -> StepProfile:
    if not path:
        return DEFAULT_PROFILE
    try:
        return load_profile(path)
    except ProfileError as exc:
        raise PolicyConfigError(f"policy shoal: option profile: {exc}") from None


def _ceil(value: float) -> int:
    return max(0, math.ceil(value - _EPS))


def _fmt(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3g}"
