"""The replay loop on virtual time, and the figures the bench compares policies by.

One run: the trace's requests arrive at the router, which sends each to the serving
replica that owes the least work (``SimReplica.outstanding_work_s``) or holds it while
none serves (scale from zero: holding with no replica ready or starting wakes the
controller at once, as the router's ``POST /v1/wake`` does); replicas advance in ticks of
``tick_s`` (0.25 s; within a tick they are exact to their own events); the policy's
pipeline (``pipeline.py``) scrapes and calls ``decide`` when due; its ``desired`` is
actuated at once: new replicas are *pending* for ``start_delay_s`` and then serve; removed
ones are pending ones first (newest first), then the serving replicas that owe the least
work, which stop receiving requests and drain (and cost) until empty.

The run starts with the replicas the load needs at t=0 (``needed_replicas``), all ready
and empty, and replays the whole trace, then lets the fleet drain its last requests (up to
``drain_limit_s``; a request still unfinished then misses its SLO). For the first
``warmup_s`` (60 s) the policy is asked every round but nothing is actuated: empty
replicas read as idle, and a policy would otherwise scale a fleet down in its first
round because the replay started (a controller joining a serving fleet sees it loaded).
Scale from zero still wakes a replica at once during warm-up.

Figures (``SimulationResult``)::

    needed(t)              ceil(work arriving in [t-30 s, t+30 s) per second / (1 - c0/TPOT_SLO)):
                           replicas that serve the load at full batches within the TPOT SLO
                           (``request_work_s`` per request; each step's fixed ``c0`` leaves
                           1 - c0/TPOT of a replica's time for that work); on a 5 s grid
    load step t0           synthetic step/ramp/spike: the declared step; real traces: the
                           first grid time after 5 min where needed(t) rises above every
                           needed of the 5 minutes before it (the policies have settled to
                           the load by then; a rise at the start would time their first
                           reaction to the replay's own start)
    target                 the most replicas needed in [t0, t0 + 120 s], at most max_replicas
    first_response_s       t0 to the first round at or after t0 whose desired count rose;
                           0 when the fleet (serving + pending) already held the target at t0
    full_scaleup_s         t0 to the first time the serving replicas reach the target
                           (``None``: never, within the run)
    oscillations_per_hour  direction changes of the desired count (up then down or down
                           then up), per hour of trace
    replica_seconds        serving + pending + draining replicas, integrated over the trace
    slo_attainment         fraction of requests with TTFT <= ttft_s and TPOT <= tpot_s
    ttft_p99_ms            over every request (one never served counts its wait so far)

Rejected: measuring "needed" by the policies' own targets (each policy would then be
judged by itself); stopping cost at the trace's end for some policies and not others (all
are integrated over the same span).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import deque
from dataclasses import dataclass, field

from control.autoscale.policies.base import Policy, make_policy
from control.autoscale.simulate.pipeline import (
    ControlPipeline,
    PipelineSpec,
    RouterCounters,
    pipeline_for,
)
from control.autoscale.simulate.replicas import (
    ReplicaConfig,
    SimReplica,
    SimRequest,
    request_work_s,
)
from control.autoscale.simulate.traces import Trace
from control.autoscale.types import PolicySpec

__all__ = [
    "ENGINE_READY_S",
    "LOADER_GB_PER_S",
    "MODEL_BYTES",
    "SimulationResult",
    "SimulationSpec",
    "Slo",
    "TimelinePoint",
    "needed_replicas",
    "simulate",
    "start_delay_s",
]

# Pod start = engine start + weight load. ``vllm serve --enforce-eager`` answered /health
# in 22-40 s on this project's machines (shared/ENGINES.md; a tiny model, so almost all of
# it is process, import and engine start): the midpoint. The weights then stream at the
# Shoal loader's measured cold local-disk rate (bench/RESULTS.md, loader section: 1.89
# GB/s; a warm page cache is faster, S3 slower). A GPU engine adds CUDA graph capture.
ENGINE_READY_S = 31.0
LOADER_GB_PER_S = 1.89
MODEL_BYTES = {  # bf16 weights
    "1b": 2.21e9,  # the loader bench's 1B Llama-shaped checkpoint
    "7b": 13.5e9,  # Llama-2-7B, 6.7e9 parameters
    "13b": 26.0e9,
    "70b": 138.0e9,
}
GRID_S = 5.0
WINDOW_S = 60.0  # needed(t) averages the work arriving in [t - 30 s, t + 30 s)
SETTLE_S = 300.0  # a real trace's load step: needed rises above its last 5 minutes
TARGET_WINDOW_S = 120.0  # the target: the most needed in the step's first 2 minutes


def start_delay_s(model_size: str) -> float:
    """Seconds from asking for a replica to its serving, for a model size in MODEL_BYTES."""
    return ENGINE_READY_S + MODEL_BYTES[model_size] / (LOADER_GB_PER_S * 1e9)


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float = 1.0
    tpot_s: float = 0.1

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError("SLO targets must be > 0")


@dataclass(frozen=True, slots=True)
class SimulationSpec:
    policy: str
    policy_spec: PolicySpec
    pipeline: PipelineSpec | None = None  # None: the policy's own (pipeline_for)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    slo: Slo = field(default_factory=Slo)
    start_delay_s: float = field(default_factory=lambda: start_delay_s("7b"))
    initial_replicas: int | None = None  # None: needed at t=0
    tick_s: float = 0.25
    warmup_s: float = 60.0  # decisions are not actuated while the fleet fills
    drain_limit_s: float = 900.0
    seed: int = 0


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    t_s: float
    desired: int
    serving: int
    pending: int
    needed: int
    arrivals_per_s: float


@dataclass(frozen=True, slots=True)
class SimulationResult:
    policy: str
    trace: str
    first_response_s: float | None
    full_scaleup_s: float | None
    oscillations_per_hour: float
    replica_seconds: float
    slo_attainment: float
    ttft_p99_ms: float
    tpot_p99_ms: float
    load_step_s: float | None
    target_replicas: int
    initial_replicas: int
    num_requests: int
    num_decisions: int
    peak_replicas: int  # the most replicas (serving + pending) at once
    timeline: tuple[TimelinePoint, ...]

    def figures(self) -> dict[str, float | None]:
        """The bench's per-policy row (the six keys of ``--json``)."""
        return {
            "first_response_s": _round(self.first_response_s),
            "full_scaleup_s": _round(self.full_scaleup_s),
            "oscillations_per_hour": round(self.oscillations_per_hour, 2),
            "replica_seconds": round(self.replica_seconds, 1),
            "slo_attainment": round(self.slo_attainment, 4),
            "ttft_p99_ms": round(self.ttft_p99_ms, 1),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def needed_replicas(trace: Trace, replica: ReplicaConfig, slo: Slo) -> list[int]:
    """needed(t) on the 5 s grid (index i is t = 5 i); see the module docstring."""
    profile = replica.profile
    usable = 1 - profile.c0_s / slo.tpot_s
    assert usable > 0, f"TPOT SLO {slo.tpot_s} s is below one step's fixed cost"
    requests = trace.requests
    work = [request_work_s(profile, r.prompt_tokens, r.output_tokens) for r in requests]
    num_points = int(trace.duration_s // GRID_S) + 1
    needed = []
    lo = hi = 0
    total = 0.0
    for i in range(num_points):
        start = max(0.0, i * GRID_S - WINDOW_S / 2)
        end = min(trace.duration_s, i * GRID_S + WINDOW_S / 2)
        while hi < len(requests) and requests[hi].arrival_s < end:
            total += work[hi]
            hi += 1
        while lo < hi and requests[lo].arrival_s < start:
            total -= work[lo]
            lo += 1
        rate = max(0.0, total) / max(end - start, GRID_S)
        needed.append(math.ceil(rate / usable - 1e-9))
    return needed


class _Fleet:
    """The replicas of one run: pending (starting), serving, draining."""

    def __init__(self, spec: SimulationSpec) -> None:
        self.spec = spec
        self.pending: list[tuple[float, str]] = []  # (ready at, id), oldest first
        self.serving: dict[str, SimReplica] = {}
        self.draining: list[SimReplica] = []
        self._next_id = 0

    def _new_id(self) -> str:
        self._next_id += 1
        return f"replica-{self._next_id}"

    @property
    def size(self) -> int:
        return len(self.serving) + len(self.pending)

    def start_ready(self, count: int, now_s: float) -> None:
        for _ in range(count):
            replica_id = self._new_id()
            self.serving[replica_id] = SimReplica(replica_id, self.spec.replica, now_s)

    def scale(self, desired: int, now_s: float) -> None:
        while self.size < desired:
            self.pending.append((now_s + self.spec.start_delay_s, self._new_id()))
        while self.size > desired and self.pending:
            self.pending.pop()
        while self.size > desired:
            replica = min(self.serving.values(), key=SimReplica.outstanding_work_s)
            del self.serving[replica.replica_id]
            replica.draining = True
            self.draining.append(replica)

    def start_due(self, now_s: float) -> bool:
        started = False
        while self.pending and self.pending[0][0] <= now_s + 1e-9:
            _, replica_id = self.pending.pop(0)
            self.serving[replica_id] = SimReplica(replica_id, self.spec.replica, now_s)
            started = True
        return started

    def least_loaded(self) -> SimReplica | None:
        if not self.serving:
            return None
        return min(self.serving.values(), key=SimReplica.outstanding_work_s)

    def advance(self, until_s: float) -> list[SimRequest]:
        finished: list[SimRequest] = []
        for replica in (*self.serving.values(), *self.draining):
            replica.advance(until_s)
            finished.extend(replica.take_finished())
        self.draining = [r for r in self.draining if r.has_work]
        return finished


def simulate(trace: Trace, spec: SimulationSpec, policy: Policy | None = None) -> SimulationResult:
    """Replay ``trace`` under ``spec.policy`` (or the given ``policy`` object)."""
    if policy is None:
        policy = make_policy(spec.policy, spec.policy_spec)
    pipeline = ControlPipeline(
        spec.pipeline or pipeline_for(spec.policy, seed=spec.seed), random.Random(spec.seed)
    )
    bounds = spec.policy_spec
    needed = needed_replicas(trace, spec.replica, spec.slo)
    initial = spec.initial_replicas if spec.initial_replicas is not None else needed[0]
    initial = max(bounds.min_replicas, min(bounds.max_replicas, initial))
    load_step, target = _load_step(trace, needed)
    target = min(target, bounds.max_replicas)

    fleet = _Fleet(spec)
    fleet.start_ready(initial, 0.0)
    c_request = spec.replica.profile.c_request_s
    requests = [
        SimRequest(i, r.arrival_s, r.prompt_tokens, r.output_tokens)
        for i, r in enumerate(trace.requests)
    ]
    held: deque[SimRequest] = deque()
    done: list[SimRequest] = []
    desired_history: list[tuple[float, int]] = [(0.0, initial)]
    desired = initial
    first_response: float | None = None
    full_scaleup: float | None = None
    step_seen = False
    replica_seconds = 0.0
    max_size = initial
    timeline: list[TimelinePoint] = []
    arrivals_in_point = 0
    next_point = 0.0
    num_decisions = 0
    tick = spec.tick_s
    end_s = trace.duration_s
    t = 0.0
    index = 0

    def dispatch(request: SimRequest, now_s: float) -> None:
        replica = fleet.least_loaded()
        if replica is None:
            held.append(request)
            return
        request.ready_s = max(request.arrival_s, now_s) + c_request
        replica.add(request)

    while True:
        if fleet.start_due(t):
            while held and fleet.serving:
                dispatch(held.popleft(), t)
        t_next = t + tick
        while index < len(requests) and requests[index].arrival_s < t_next:
            request = requests[index]
            dispatch(request, request.arrival_s)
            index += 1
            arrivals_in_point += 1
        if held and fleet.size == 0:
            # The router holds a request for a model with no replica: POST /v1/wake.
            desired = max(1, bounds.min_replicas)
            fleet.scale(desired, t)
            desired_history.append((t, desired))
        done.extend(fleet.advance(t_next))
        if t < end_s:
            replica_seconds += tick * (fleet.size + len(fleet.draining))
        t = t_next
        if load_step is not None and t >= load_step:
            if not step_seen:
                step_seen = True
                if fleet.size >= target:
                    first_response = 0.0  # already asked for what the step needs
            if full_scaleup is None and len(fleet.serving) >= target:
                full_scaleup = t - load_step
        in_flight = index - len(held) - len(done)
        observation = pipeline.step(
            t,
            {rid: r.counters() for rid, r in fleet.serving.items()},
            RouterCounters(t, index, in_flight, len(held)),
            fleet.size,
            len(fleet.pending),
        )
        if observation is not None:
            num_decisions += 1
            decision = policy.decide(observation)
            # warm-up: the policy sees the load fill the fleet; nothing is actuated
            actuate = t >= spec.warmup_s or bool(held)
            if actuate and decision.desired != desired:
                if (
                    load_step is not None
                    and first_response is None
                    and t >= load_step
                    and decision.desired > desired
                ):
                    first_response = t - load_step
                desired = decision.desired
                desired_history.append((t, desired))
            if desired != fleet.size:
                fleet.scale(desired, t)
        max_size = max(max_size, fleet.size)
        if t >= next_point - 1e-9 and t <= end_s:
            point = min(len(needed) - 1, round(t / GRID_S))
            timeline.append(
                TimelinePoint(
                    round(t, 3),
                    desired,
                    len(fleet.serving),
                    len(fleet.pending),
                    needed[point],
                    arrivals_in_point / GRID_S,
                )
            )
            arrivals_in_point = 0
            next_point += GRID_S
        if t >= end_s and (len(done) == len(requests) or t >= end_s + spec.drain_limit_s):
            break

    return _result(
        trace,
        spec,
        requests,
        t,
        first_response,
        full_scaleup,
        desired_history,
        replica_seconds,
        load_step,
        target,
        initial,
        num_decisions,
        max_size,
        tuple(timeline),
    )


def _load_step(trace: Trace, needed: list[int]) -> tuple[float | None, int]:
    if trace.load_step_s is not None:
        step = trace.load_step_s
    else:
        settle = int(SETTLE_S // GRID_S)
        rises = [i for i in range(settle, len(needed)) if needed[i] > max(needed[i - settle : i])]
        if not rises:
            return None, needed[0]
        step = rises[0] * GRID_S
    first = math.ceil(step / GRID_S - 1e-9)
    last = int((step + TARGET_WINDOW_S) // GRID_S)
    window = needed[first : last + 1] or [needed[-1]]
    return step, max(window)


def _oscillations(history: list[tuple[float, int]]) -> int:
    changes = 0
    direction = 0
    for (_, before), (_, after) in itertools.pairwise(history):
        if after == before:
            continue
        now = 1 if after > before else -1
        if direction and now != direction:
            changes += 1
        direction = now
    return changes


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def _result(
    trace: Trace,
    spec: SimulationSpec,
    requests: list[SimRequest],
    end_s: float,
    first_response: float | None,
    full_scaleup: float | None,
    history: list[tuple[float, int]],
    replica_seconds: float,
    load_step: float | None,
    target: int,
    initial: int,
    num_decisions: int,
    max_size: int,
    timeline: tuple[TimelinePoint, ...],
) -> SimulationResult:
    slo = spec.slo
    met = 0
    ttfts = []
    tpots = []
    for r in requests:
        first = r.first_token_s if r.first_token_s is not None else end_s
        ttft = first - r.arrival_s
        ttfts.append(ttft)
        tpot = r.tpot_s
        if tpot is not None:
            tpots.append(tpot)
        if tpot is not None and ttft <= slo.ttft_s and tpot <= slo.tpot_s:
            met += 1
    in_trace = [h for h in history if h[0] <= trace.duration_s]
    return SimulationResult(
        policy=spec.policy,
        trace=trace.name,
        first_response_s=first_response,
        full_scaleup_s=full_scaleup,
        oscillations_per_hour=_oscillations(in_trace) * 3600.0 / trace.duration_s,
        replica_seconds=replica_seconds,
        slo_attainment=met / len(requests),
        ttft_p99_ms=_p99(ttfts) * 1000.0,
        tpot_p99_ms=_p99(tpots) * 1000.0,
        load_step_s=load_step,
        target_replicas=target,
        initial_replicas=initial,
        num_requests=len(requests),
        num_decisions=num_decisions,
        peak_replicas=max_size,
        timeline=timeline,
    )
