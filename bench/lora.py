"""The LoRA benchmark (issue 14): what serving many adapters on shared engines saves, and
how well the manager's placement keeps a request's adapter where the request goes.

::

    python bench/lora.py [--quick] [--json] [--seed N] [--seeds K]
                         [--parts density,placement] [--rate R] [--lora-overhead F]
                         [--max-loras N] [--max-cpu-loras N] [--adapters N]
                         [--total-rate R] [--load-s S] [--round-s S] [--rate-window-s S]
                         [--hysteresis H] [--balance B]

Everything runs in the simulator on virtual time: no sockets, no sleeps.

**density** — N low-traffic adapters on shared engines against N dedicated engines (one
per adapter, its weights merged into the base: no LoRA work at all), every engine held to
the same SLO (p99 TTFT <= 1 s and p99 TPOT <= 100 ms). Each adapter gets Poisson traffic
of ``--rate`` requests/s (default 0.2), prompts of 128-1,024 tokens and answers of
32-256 (uniform). An engine is ``sim.scheduler`` (vLLM v1's continuous batching, exactly
as ``shoal sim engine`` runs it) stepped on virtual time and priced by the default step
profile (Llama-2-7B on one A100, ``sim.profile.DEFAULT_PROFILE``), with vLLM's LoRA
limits: at most ``max_loras`` (8) distinct adapters in one step (a request whose adapter
would exceed it waits), a worker cache of ``max_cpu_loras`` (16) adapters, LRU, a miss
costing ``lora_load_s`` (the profile's 5 ms) in the step that needs it. A step that
serves any adapter costs ``--lora-overhead`` (default 15%) more: vLLM's LoRA kernels
(punica/SGMV) run beside the base model's, which the profile does not price; the
dedicated engines pay nothing (merged weights). For each seed the bench finds the most
adapters one shared engine carries within the SLO (``k_max``, by bisection over simulated
engines), then for each N the shared engines needed, ``ceil(N / k_max)``, against N
dedicated ones (each dedicated engine is checked to meet the SLO at ``--rate``). The cost
ratio is N / shared engines (AIBrix reports up to 4.7x).

**placement** — 100 adapters (``--adapters``) with Zipf popularity (s = 1.1), requests
arriving as one Poisson stream (``--total-rate``, default 40 requests/s, for 600 s of
virtual time; ``--quick`` 200 s), 4 engines that hold 8 adapters each. A request is served
by an engine; it *hits* when its adapter is already resident there, otherwise the adapter
is loaded first (a *miss*: one load, ``--load-s`` = 0.2 s of load time, the request waits
for it) and, when the engine is full, an adapter is evicted. Policies:

- ``vllm-lru``: AIBrix-like, no manager and no eviction policy of its own: every adapter
  registered on every engine, requests spread by least load (every engine lists every
  adapter, so the router cannot tell where one is resident), and each engine's worker
  LRU cache of 8 decides what stays (vLLM's ``max_cpu_loras``);
- ``random``: the router sends a request to an engine holding its adapter (the least
  loaded of them); a miss loads it on a random engine, evicting that engine's least
  recently used adapter;
- ``shoal-wake``: the same routing; a miss goes to ``control.lora.placement.choose_wake``
  (an engine with room and the least traffic, else the one whose coldest adapter is the
  coldest anywhere, evicted);
- ``shoal``: ``shoal-wake`` plus the manager's round every ``--round-s`` (5 s, its
  default ``--interval-s``):
  ``control.lora.placement.place`` (bin-packing by traffic, extra copies of the hottest
  at ``replica_rate`` = 10 requests/s or for ``--balance``, slots kept within
  ``--hysteresis`` and one request per window), whose loads and unloads are applied
  (they count as loads and evictions too). Both ``shoal`` policies see adapters' rates
  over ``--rate-window-s`` (default 60 s, the manager's default; 5 = one round, what the
  manager read before it smoothed rates), and every request's time of use.

Figures per policy, mean over ``--seeds`` seeds (5; ``--quick`` 3) with min and max:
hit ratio, misses, loads, evictions, load seconds (loads x ``--load-s``), the mean wait a
request spends on loads, and the busiest engine's share of requests x engines (1.0 = even).
The ``shoal`` policies need ``control.lora.placement``; without it their rows are null.

``--json`` prints ``{"density": {...}, "placement": {...}}``.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import os
import random
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from sim.profile import DEFAULT_PROFILE, StepProfile  # noqa: E402
from sim.scheduler import Request, Scheduler, SchedulerConfig  # noqa: E402


def progress(message: str) -> None:
    print(f"[lora] {message}", file=sys.stderr, flush=True)


# --- density: shared engines against dedicated ones ----------------------------------


@dataclass(frozen=True, slots=True)
class Slo:
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    percentile: float = 99.0


@dataclass(frozen=True, slots=True)
class DensitySpec:
    rate: float = 0.2  # requests/s per adapter
    horizon_s: float = 300.0  # arrivals over this much virtual time
    warmup_s: float = 20.0  # requests arriving before this are not judged
    prompt_tokens: tuple[int, int] = (128, 1024)
    output_tokens: tuple[int, int] = (32, 256)
    max_loras: int = 8
    max_cpu_loras: int = 16
    lora_overhead: float = 0.15
    profile: StepProfile = DEFAULT_PROFILE
    slo: Slo = field(default_factory=Slo)


@dataclass(frozen=True, slots=True)
class EngineRun:
    num_adapters: int
    feasible: bool
    ttft_p99_s: float
    tpot_p99_s: float
    num_requests: int
    adapter_loads: int
    deferred_steps: int


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[index]


def _arrivals(num_adapters: int, spec: DensitySpec, seed: int) -> list[tuple[float, int, int, int]]:
    """(time, adapter, prompt tokens, output tokens), sorted by time: one Poisson stream per
    adapter, each from its own generator so adding adapters does not move the others."""
    out: list[tuple[float, int, int, int]] = []
    for adapter in range(num_adapters):
        rng = random.Random(seed * 1_000_003 + adapter)
        t = rng.expovariate(spec.rate)
        while t < spec.horizon_s:
            out.append(
                (t, adapter, rng.randint(*spec.prompt_tokens), rng.randint(*spec.output_tokens))
            )
            t += rng.expovariate(spec.rate)
    out.sort()
    return out


def simulate_engine(num_adapters: int, spec: DensitySpec, seed: int, *, lora: bool) -> EngineRun:
    """One engine serving ``num_adapters`` adapters' traffic (``lora=False``: one merged
    model, no adapter limits or costs), stepped on virtual time. Stops early once more
    requests broke the SLO than the percentile allows (the verdict cannot change)."""
    config = SchedulerConfig(
        num_gpu_blocks=8192,
        block_size=16,
        max_num_batched_tokens=2048,
        max_num_seqs=256,
        max_model_len=4096,
        max_loras=spec.max_loras,
        max_cpu_loras=spec.max_cpu_loras,
        enable_prefix_caching=False,  # every prompt is distinct here
    )
    scheduler = Scheduler(config)
    profile = spec.profile
    arrivals = _arrivals(num_adapters, spec, seed)
    judged = sum(1 for a in arrivals if a[0] >= spec.warmup_s)
    allowed = math.floor(judged * (1.0 - spec.slo.percentile / 100.0))
    token_rng = random.Random(seed)
    ttfts: list[float] = []
    tpots: list[float] = []
    broken = loads = deferred = 0
    now = 0.0
    index = 0
    live: set[Request] = set()
    while index < len(arrivals) or scheduler.has_work:
        while index < len(arrivals) and arrivals[index][0] + profile.c_request_s <= now:
            t, adapter, num_prompt, num_out = arrivals[index]
            prompt = [token_rng.randrange(4, 32000) for _ in range(num_prompt)]
            request = Request(
                f"r{index}", prompt, num_out, t, (adapter + 1, f"a{adapter}") if lora else None
            )
            scheduler.add(request)
            live.add(request)
            index += 1
        if not scheduler.has_work:
            now = arrivals[index][0] + profile.c_request_s
            continue
        plan = scheduler.schedule()
        deferred += scheduler.num_deferred > 0
        if not plan.scheduled:
            assert index < len(arrivals), "work that can never be scheduled"
            now = arrivals[index][0] + profile.c_request_s
            continue
        step_s = profile.step_s(plan.shape)
        if any(r.lora for r, _ in plan.scheduled):
            step_s *= 1.0 + spec.lora_overhead
        loads += plan.shape.adapters_loaded
        now += step_s
        result = scheduler.update(plan, now)
        for request in result.finished:
            live.discard(request)
            if request.arrival_s < spec.warmup_s:
                continue
            assert request.first_token_s is not None
            ttft = request.first_token_s - request.arrival_s
            tpot = (now - request.first_token_s) / max(1, len(request.output_ids) - 1)
            ttfts.append(ttft)
            tpots.append(tpot)
            broken += ttft > spec.slo.ttft_s or tpot > spec.slo.tpot_s
        # a request still waiting past the TTFT SLO has broken it already
        late = sum(
            1 for r in live
            if r.first_token_s is None and r.arrival_s >= spec.warmup_s
            and now - r.arrival_s > spec.slo.ttft_s
        ) if broken + len(live) > allowed else 0  # fmt: skip
        if broken + late > allowed:
            return EngineRun(num_adapters, False, math.inf, math.inf, len(ttfts), loads, deferred)
    ttft_p = _percentile(ttfts, spec.slo.percentile)
    tpot_p = _percentile(tpots, spec.slo.percentile)
    feasible = ttft_p <= spec.slo.ttft_s and tpot_p <= spec.slo.tpot_s
    return EngineRun(num_adapters, feasible, ttft_p, tpot_p, len(ttfts), loads, deferred)


def max_adapters(
    spec: DensitySpec, seed: int, *, lora: bool, ceiling: int
) -> tuple[int, dict[int, EngineRun]]:
    """The most adapters one engine carries within the SLO (0..ceiling): doubling, then
    bisection. Assumes feasibility falls with the number of adapters (more traffic)."""
    runs: dict[int, EngineRun] = {}

    def ok(k: int) -> bool:
        if k not in runs:
            runs[k] = simulate_engine(k, spec, seed, lora=lora)
        return runs[k].feasible

    if not ok(1):
        return 0, runs
    low, high = 1, 2
    while high <= ceiling and ok(high):
        low, high = high, high * 2
    high = min(high, ceiling + 1)
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            low = mid
        else:
            high = mid
    return low, runs


def run_density(spec: DensitySpec, seeds: Sequence[int], sizes: Sequence[int]) -> dict[str, Any]:
    per_seed: list[dict[str, Any]] = []
    for seed in seeds:
        t0 = time.perf_counter()
        dedicated = simulate_engine(1, spec, seed, lora=False)
        k_max, runs = max_adapters(spec, seed, lora=True, ceiling=max(sizes))
        k_merged, _ = max_adapters(spec, seed, lora=False, ceiling=4 * max(sizes))
        best = runs.get(k_max)
        per_seed.append({
            "seed": seed,
            "dedicated_feasible": dedicated.feasible,
            "dedicated_ttft_p99_s": dedicated.ttft_p99_s,
            "k_max": k_max,
            "k_max_without_lora_limits": k_merged,
            "at_k_max": None if best is None else {
                "ttft_p99_s": round(best.ttft_p99_s, 4),
                "tpot_p99_s": round(best.tpot_p99_s, 4),
                "adapter_loads": best.adapter_loads,
                "deferred_steps": best.deferred_steps,
            },
        })  # fmt: skip
        progress(f"density seed {seed}: k_max {k_max} (merged {k_merged}), "
                 f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    k_values = [s["k_max"] for s in per_seed]
    rows = []
    for n in sizes:
        shared = [math.ceil(n / k) if k else None for k in k_values]
        ratios = [n / e for e in shared if e]
        rows.append({
            "adapters": n,
            "dedicated_engines": n,
            "shared_engines": shared,
            "cost_ratio_mean": round(statistics.mean(ratios), 2) if ratios else None,
            "cost_ratio_min": round(min(ratios), 2) if ratios else None,
            "cost_ratio_max": round(max(ratios), 2) if ratios else None,
        })  # fmt: skip
    return {
        "spec": {
            "rate_per_adapter": spec.rate,
            "horizon_s": spec.horizon_s,
            "prompt_tokens": list(spec.prompt_tokens),
            "output_tokens": list(spec.output_tokens),
            "max_loras": spec.max_loras,
            "max_cpu_loras": spec.max_cpu_loras,
            "lora_load_s": spec.profile.lora_load_s,
            "lora_overhead": spec.lora_overhead,
            "slo": {
                "ttft_s": spec.slo.ttft_s,
                "tpot_s": spec.slo.tpot_s,
                "percentile": spec.slo.percentile,
            },
            "profile": spec.profile.source,
        },
        "seeds": per_seed,
        "rows": rows,
    }


# --- placement: hit ratio under Zipf popularity ----------------------------------------


@dataclass(frozen=True, slots=True)
class PlacementSpec:
    num_adapters: int = 100
    zipf_s: float = 1.1
    num_engines: int = 4
    budget: int = 8
    total_rate: float = 40.0  # requests/s, all adapters together
    horizon_s: float = 600.0
    service_s: float = 2.0  # how long a request stays in flight (least-load routing)
    load_s: float = 0.2  # one adapter load (disk to engine)
    round_s: float = 5.0  # the manager's placement round (shoal lora serve --interval-s)
    rate_window_s: float = 60.0  # adapters' rates over this long (--rate-window-s)
    replica_rate: float = 10.0  # requests/s one copy takes before another is added
    hysteresis: float = 0.2  # the manager's --hysteresis (copies and slots)
    balance: float = 0.5  # the manager's --balance (0: copies for capacity only)


@dataclass
class _Engine:
    url: str
    resident: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    in_flight: list[float] = field(default_factory=list)  # heap of end times
    served: int = 0

    def load_now(self, now: float) -> int:
        while self.in_flight and self.in_flight[0] <= now:
            heapq.heappop(self.in_flight)
        return len(self.in_flight)


@dataclass
class _Counts:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    refused: int = 0  # no engine may load the adapter (no-evict): a 404 to the client


class _Cluster:
    """Engines, what each holds, and the counts every policy is judged by."""

    def __init__(self, spec: PlacementSpec, rng: random.Random) -> None:
        self.spec = spec
        self.rng = rng
        self.engines = [_Engine(f"http://e{i}") for i in range(spec.num_engines)]
        self.by_url = {e.url: e for e in self.engines}
        self.counts = _Counts()

    def load(self, engine: _Engine, name: str) -> None:
        while len(engine.resident) >= self.spec.budget:
            engine.resident.popitem(last=False)
            self.counts.evictions += 1
        engine.resident[name] = None
        self.counts.loads += 1

    def unload(self, engine: _Engine, name: str) -> None:
        if engine.resident.pop(name, 0) is None:
            self.counts.evictions += 1

    def least_loaded(self, engines: Sequence[_Engine], now: float) -> _Engine:
        return min(engines, key=lambda e: (e.load_now(now), e.url))

    def holders(self, name: str) -> list[_Engine]:
        return [e for e in self.engines if name in e.resident]

    def serve(self, engine: _Engine, name: str, now: float, hit: bool) -> None:
        self.counts.requests += 1
        if hit:
            self.counts.hits += 1
        else:
            self.counts.misses += 1
        engine.resident.move_to_end(name)
        engine.served += 1
        wait = 0.0 if hit else self.spec.load_s
        heapq.heappush(engine.in_flight, now + wait + self.spec.service_s)


class _Traffic:
    """What the manager observes: requests per adapter per round, rates over the last
    ``window_rounds`` rounds (``control.lora.traffic.RateWindow`` over the router's
    counters, sampled each round), when each adapter was last used."""

    def __init__(self, round_s: float, window_rounds: int = 1) -> None:
        self.round_s = round_s
        self.this_round: dict[str, int] = {}
        self.rounds: deque[dict[str, int]] = deque(maxlen=max(1, window_rounds))
        self.rates: dict[str, float] = {}
        self.last_used: dict[str, float] = {}

    def note(self, name: str, now: float) -> None:
        self.this_round[name] = self.this_round.get(name, 0) + 1
        self.last_used[name] = now

    def close_round(self) -> None:
        self.rounds.append(self.this_round)
        self.this_round = {}
        totals: dict[str, int] = {}
        for counts in self.rounds:
            for n, c in counts.items():
                totals[n] = totals.get(n, 0) + c
        span = len(self.rounds) * self.round_s
        self.rates = {n: c / span for n, c in totals.items()}


Policy = Callable[[_Cluster, _Traffic, str, float], None]


def _vllm_lru(cluster: _Cluster, traffic: _Traffic, name: str, now: float) -> None:
    engine = cluster.least_loaded(cluster.engines, now)
    hit = name in engine.resident
    if not hit:
        cluster.load(engine, name)
    cluster.serve(engine, name, now, hit)


def _random(cluster: _Cluster, traffic: _Traffic, name: str, now: float) -> None:
    holders = cluster.holders(name)
    if holders:
        cluster.serve(cluster.least_loaded(holders, now), name, now, True)
        return
    engine = cluster.rng.choice(cluster.engines)
    cluster.load(engine, name)
    cluster.serve(engine, name, now, False)


def _no_evict(cluster: _Cluster, traffic: _Traffic, name: str, now: float) -> None:
    holders = cluster.holders(name)
    if holders:
        cluster.serve(cluster.least_loaded(holders, now), name, now, True)
        return
    room = [e for e in cluster.engines if len(e.resident) < cluster.spec.budget]
    if not room:
        cluster.counts.requests += 1
        cluster.counts.refused += 1
        return
    engine = cluster.least_loaded(room, now)
    cluster.load(engine, name)
    cluster.serve(engine, name, now, False)


def _placement_input(
    cluster: _Cluster, traffic: _Traffic, adapters: Sequence[str], now: float
) -> Any:
    from control.lora.types import EngineState, PlacementInput, Usage

    names = set(traffic.rates) | set(traffic.last_used)
    usage = {n: Usage(traffic.rates.get(n, 0.0), traffic.last_used.get(n)) for n in names}
    engines = tuple(
        EngineState(e.url, "base", cluster.spec.budget, loaded=frozenset(e.resident))
        for e in cluster.engines
    )
    return PlacementInput(
        engines=engines,
        adapters=dict.fromkeys(adapters, "base"),
        usage=usage,
        now_s=now,
        replica_rate=cluster.spec.replica_rate,
        hysteresis=cluster.spec.hysteresis,
        balance=cluster.spec.balance,
        rate_resolution=1.0 / cluster.spec.rate_window_s,  # as the manager sets it
    )


def _shoal_wake(adapters: Sequence[str]) -> Policy:
    from control.lora.placement import choose_wake

    def policy(cluster: _Cluster, traffic: _Traffic, name: str, now: float) -> None:
        holders = cluster.holders(name)
        if holders:
            cluster.serve(cluster.least_loaded(holders, now), name, now, True)
            return
        choice = choose_wake(_placement_input(cluster, traffic, adapters, now), name)
        assert choice is not None, "every engine serves the base: a wake always finds one"
        url, victim = choice
        engine = cluster.by_url[url]
        if victim is not None:
            cluster.unload(engine, victim)
        cluster.load(engine, name)
        cluster.serve(engine, name, now, False)

    return policy


def _apply_round(cluster: _Cluster, traffic: _Traffic, adapters: Sequence[str], now: float) -> None:
    from control.lora.placement import place

    plan = place(_placement_input(cluster, traffic, adapters, now))
    for move in plan.unloads:
        cluster.unload(cluster.by_url[move.engine], move.adapter)
    for move in plan.loads:
        cluster.load(cluster.by_url[move.engine], move.adapter)


def _zipf_cdf(num: int, s: float) -> list[float]:
    weights = [1.0 / (rank**s) for rank in range(1, num + 1)]
    total = sum(weights)
    cdf, acc = [], 0.0
    for w in weights:
        acc += w / total
        cdf.append(acc)
    cdf[-1] = 1.0
    return cdf


def _static_top(spec: PlacementSpec) -> float:
    """The hit ratio of the best placement that never moves: the most popular adapters,
    one copy each, in every slot (popularity known in advance)."""
    cdf = _zipf_cdf(spec.num_adapters, spec.zipf_s)
    slots = min(spec.num_adapters, spec.num_engines * spec.budget)
    return cdf[slots - 1]


def simulate_placement(policy_name: str, spec: PlacementSpec, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    adapters = [f"lora-{i:03d}" for i in range(spec.num_adapters)]
    by_rank = adapters[:]
    rng.shuffle(by_rank)  # popularity rank is not name order (names break ties in place())
    cdf = _zipf_cdf(spec.num_adapters, spec.zipf_s)
    cluster = _Cluster(spec, random.Random(seed + 1))
    traffic = _Traffic(spec.round_s, round(spec.rate_window_s / spec.round_s))
    planned = policy_name == "shoal"
    policy: Policy
    if policy_name == "vllm-lru":
        policy = _vllm_lru
    elif policy_name == "random":
        policy = _random
    elif policy_name == "no-evict":
        policy = _no_evict
    else:
        policy = _shoal_wake(adapters)
    now = rng.expovariate(spec.total_rate)
    next_round = spec.round_s
    while now < spec.horizon_s:
        while now >= next_round:
            traffic.close_round()
            if planned:
                _apply_round(cluster, traffic, adapters, next_round)
            next_round += spec.round_s
        name = by_rank[min(bisect.bisect_left(cdf, rng.random()), spec.num_adapters - 1)]
        traffic.note(name, now)
        policy(cluster, traffic, name, now)
        now += rng.expovariate(spec.total_rate)
    c = cluster.counts
    busiest = max(e.served for e in cluster.engines)
    served = sum(e.served for e in cluster.engines)
    return {
        "requests": c.requests,
        "hit_ratio": c.hits / c.requests,
        "misses": c.misses,
        "loads": c.loads,
        "evictions": c.evictions,
        "refused": c.refused,
        "load_s": c.loads * spec.load_s,
        "wait_ms_per_request": 1000.0 * c.misses * spec.load_s / c.requests,
        "busiest_share": busiest * spec.num_engines / max(1, served),
    }


PLACEMENT_POLICIES = ("vllm-lru", "no-evict", "random", "shoal-wake", "shoal")


def _placement_available() -> bool:
    try:
        import control.lora.placement
        import control.lora.types  # noqa: F401
    except ImportError:
        return False
    return True


def run_placement(spec: PlacementSpec, seeds: Sequence[int]) -> dict[str, Any]:
    available = _placement_available()
    if not available:
        progress("control.lora.placement is not built yet: the shoal rows are null")
    policies: dict[str, Any] = {}
    for name in PLACEMENT_POLICIES:
        if name.startswith("shoal") and not available:
            policies[name] = None
            continue
        t0 = time.perf_counter()
        runs = [simulate_placement(name, spec, seed) for seed in seeds]
        summary: dict[str, Any] = {}
        for key in runs[0]:
            values = [r[key] for r in runs]
            summary[key] = {
                "mean": round(statistics.mean(values), 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
            }
        policies[name] = summary
        progress(f"placement {name}: {time.perf_counter() - t0:.1f} s")
    return {
        "spec": {
            "adapters": spec.num_adapters,
            "zipf_s": spec.zipf_s,
            "engines": spec.num_engines,
            "budget": spec.budget,
            "total_rate": spec.total_rate,
            "horizon_s": spec.horizon_s,
            "load_s": spec.load_s,
            "round_s": spec.round_s,
            "rate_window_s": spec.rate_window_s,
            "replica_rate": spec.replica_rate,
            "hysteresis": spec.hysteresis,
            "balance": spec.balance,
            "seeds": list(seeds),
            "static_top_hit_ratio": round(_static_top(spec), 4),
        },
        "policies": policies,
    }


# --- output ----------------------------------------------------------------------------


def print_density(result: dict[str, Any]) -> None:
    spec = result["spec"]
    print(
        f"\nDensity: {spec['rate_per_adapter']} req/s per adapter, "
        f"SLO p{spec['slo']['percentile']:g} TTFT <= {spec['slo']['ttft_s']} s, "
        f"TPOT <= {spec['slo']['tpot_s']} s; max_loras {spec['max_loras']}, "
        f"max_cpu_loras {spec['max_cpu_loras']}, lora_load_s "
        f"{spec['lora_load_s']}, LoRA step overhead {spec['lora_overhead']:.0%}"
    )
    for s in result["seeds"]:
        at = s["at_k_max"] or {}
        print(
            f"  seed {s['seed']}: one shared engine carries {s['k_max']} adapters "
            f"(merged, no LoRA limits: {s['k_max_without_lora_limits']}); at k_max p99 TTFT "
            f"{at.get('ttft_p99_s')} s, TPOT {at.get('tpot_p99_s')} s; dedicated engine "
            f"p99 TTFT {s['dedicated_ttft_p99_s']:.3f} s (meets SLO: {s['dedicated_feasible']})"
        )
    print(f"  {'N':>5} {'dedicated':>10} {'shared':>12} {'cost ratio (mean, min-max)':>28}")
    for row in result["rows"]:
        shared = "/".join(str(e) for e in row["shared_engines"])
        ratio = f"{row['cost_ratio_mean']}x ({row['cost_ratio_min']}-{row['cost_ratio_max']})"
        print(f"  {row['adapters']:>5} {row['dedicated_engines']:>10} {shared:>12} {ratio:>28}")


def print_placement(result: dict[str, Any]) -> None:
    spec = result["spec"]
    print(
        f"\nPlacement: {spec['adapters']} adapters, Zipf s={spec['zipf_s']}, {spec['engines']} "
        f"engines x {spec['budget']} slots, {spec['total_rate']} req/s for "
        f"{spec['horizon_s']:g} s, load {spec['load_s']} s; "
        f"mean (min-max) over seeds {spec['seeds']}"
    )
    keys = ("hit_ratio", "misses", "loads", "evictions", "refused", "load_s",
            "wait_ms_per_request", "busiest_share")  # fmt: skip
    print("  " + f"{'policy':<11}" + "".join(f"{k:>26}" for k in keys))
    for name, summary in result["policies"].items():
        if summary is None:
            print(f"  {name:<11} (not built)")
            continue
        cells = []
        for k in keys:
            v = summary[k]
            digits = 3 if k in {"hit_ratio", "busiest_share"} else 1
            cells.append(f"{v['mean']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})")
        print("  " + f"{name:<11}" + "".join(f"{c:>26}" for c in cells))
    print(f"  a placement that never moves (the {spec['engines'] * spec['budget']} most popular, "
          f"known in advance) hits {spec['static_top_hit_ratio']:.3f}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, shorter runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--parts", default="density,placement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, help="seeds per figure (quick 1/3, else 3/5)")
    parser.add_argument("--rate", type=float, default=0.2, help="density: req/s per adapter")
    parser.add_argument("--lora-overhead", type=float, default=0.15)
    parser.add_argument("--max-loras", type=int, default=8)
    parser.add_argument("--max-cpu-loras", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=100, help="placement: adapters")
    parser.add_argument("--total-rate", type=float, default=40.0, help="placement: req/s")
    parser.add_argument("--load-s", type=float, default=0.2, help="placement: one load")
    parser.add_argument("--round-s", type=float, default=5.0, help="placement: manager round")
    parser.add_argument(
        "--rate-window-s", type=float, default=60.0,
        help="placement: rates over this long (the manager's default 60 s)",
    )  # fmt: skip
    parser.add_argument("--hysteresis", type=float, default=0.2, help="placement: copies, slots")
    parser.add_argument("--balance", type=float, default=0.5, help="placement: 0 = off")
    args = parser.parse_args()
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"density", "placement"})
    if unknown:
        parser.error(f"unknown parts {unknown}: density, placement")
    started = time.perf_counter()
    out: dict[str, Any] = {}
    if "density" in parts:
        num = args.seeds if args.seeds is not None else (1 if args.quick else 3)
        spec = DensitySpec(
            rate=args.rate,
            horizon_s=120.0 if args.quick else 300.0,
            max_loras=args.max_loras,
            max_cpu_loras=args.max_cpu_loras,
            lora_overhead=args.lora_overhead,
        )
        sizes = (1, 2, 4, 8, 16, 32, 64) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128, 256)
        out["density"] = run_density(spec, range(args.seed, args.seed + num), sizes)
    if "placement" in parts:
        num = args.seeds if args.seeds is not None else (3 if args.quick else 5)
        pspec = PlacementSpec(
            num_adapters=args.adapters,
            total_rate=args.total_rate,
            load_s=args.load_s,
            round_s=args.round_s,
            rate_window_s=args.rate_window_s,
            hysteresis=args.hysteresis,
            balance=args.balance,
            horizon_s=200.0 if args.quick else 600.0,
        )
        out["placement"] = run_placement(pspec, range(args.seed, args.seed + num))
    out["wall_s"] = round(time.perf_counter() - started, 1)
    out["cores"] = os.cpu_count()
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    if "density" in out:
        print_density(out["density"])
    if "placement" in out:
        print_placement(out["placement"])
    print(f"\n({out['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
