"""How many requests per second of a token mix one replica serves within an SLO.

Invariant: ``capacity(profile, mix, slo, limits).rps`` is the largest steady arrival rate
of requests with ``mix``'s mean prompt and output lengths at which one continuous-batching
engine, priced by ``profile`` (sim/profile.py), keeps the *mean* TTFT and the *mean* TPOT
within ``slo`` and stays inside its ``max_num_seqs``, ``max_num_batched_tokens`` and KV
blocks. It is a pure function of frozen values, cached by mix bucket (``TokenMix.bucketed``
rounds lengths *up* onto a 1/16-octave grid, so a cached answer never overstates).

The steady-state batch model (arrival rate ``r``, mean prompt ``P`` and output ``O``
tokens, chunk budget ``M = max_num_batched_tokens``, ``n = ceil(P / M)`` prefill chunks)::

    a request occupies the running batch for n + O - 1 steps: n prefill chunks (the last
    samples token 1), then O - 1 decodes, at contexts P+1 .. P+O-1 (mean P + O/2)

    mean step time t, Little's law per step:  decodes/step  D = r * t * (O - 1)
                                              prompt tokens/step  = r * t * P
    t = c0 + r * t * a,   a = P * c_prefill + c_attn * P(P+1)/2 + c_kv * P(n+1)/2
                              + (O - 1) * (c_decode + c_kv * (P + O/2))
      => t(r) = c0 / (1 - r * a)                 (saturation at r = 1/a)

    a is the step-seconds one request adds beyond the fixed cost: its prefill (linear,
    causal attention pairs, and the context its chunks attend over) and its decodes.

Each SLO or limit bounds ``r`` in closed form, because ``t(r)`` is increasing:

    TPOT   t <= tpot                                  r <= (1 - c0/tpot) / a
    TTFT   c_request + (n + 1/2) t + own <= ttft      t_max = (ttft - c_request - own)/(n + 1/2)
           (half a step waiting for the step in flight, n steps holding its chunks, plus its
           own prefill cost ``own`` on top of the average step)
    seqs   r t (n + O - 1) <= max_num_seqs            r <= S / (R c0 + S a), R = n + O - 1
    tokens r t (P + O - 1) <= max_num_batched_tokens  same form with R = P + O - 1, S = M
    KV     r t R * blocks/seq <= kv_fraction * num_gpu_blocks, blocks/seq = (P + O/2)/bs + 1

``rps`` is the smallest bound (``limit`` names it), 0 when a request alone misses the TTFT
or the fixed step cost alone misses the TPOT (``limit`` "ttft-unattainable" /
"tpot-unattainable"; ``saturation_rps`` then still says what the replica can push through).

Rejected: simulating the scheduler per query (exact but ~10^4 times slower, and the
controller asks every round for every mix change); a queueing-theory TTFT tail (M/D/1
waits): the SLO targets are means, the policy keeps ``headroom`` below capacity, and
tests/unit/test_autoscale_capacity.py checks the bound against sim.scheduler itself (the
SLO holds at 0.9x the rate and fails at 1.5x). How it fails: bursty arrivals raise the
real TTFT above the mean model near capacity; prefix-cache hits make it pessimistic
(cached prompt tokens are priced as computed); percentile SLOs are not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from sim.profile import StepProfile

__all__ = ["EngineLimits", "ReplicaCapacity", "Slo", "TokenMix", "capacity", "capacity_rps"]

_GRID = 16  # buckets per octave: lengths within ~4.4% share one cached answer


@dataclass(frozen=True, slots=True)
class TokenMix:
    """Mean prompt and output tokens per request (output >= 1: the first token)."""

    prompt_tokens: float
    output_tokens: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.prompt_tokens) and self.prompt_tokens >= 1):
            raise ValueError(f"prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if not (math.isfinite(self.output_tokens) and self.output_tokens >= 1):
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")

    def bucketed(self) -> TokenMix:
        """Lengths rounded up onto a 1/16-octave grid (the cache key; never optimistic)."""
        return TokenMix(_round_up(self.prompt_tokens), _round_up(self.output_tokens))


@dataclass(frozen=True, slots=True)
class Slo:
    """Targets for the mean time to first token and mean time per output token."""

    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO targets must be > 0, got ttft {self.ttft_s}, tpot {self.tpot_s}")


@dataclass(frozen=True, slots=True)
class EngineLimits:
    """The engine's batching limits (vLLM's flags; defaults = ``shoal sim engine``'s).

    ``kv_fraction``: the share of KV blocks the steady state may hold on average; the
    rest absorbs the fluctuation around the mean (above it vLLM preempts)."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_gpu_blocks: int = 8192
    block_size: int = 16
    kv_fraction: float = 0.9

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.kv_fraction <= 1:
            raise ValueError(f"kv_fraction must be in (0, 1], got {self.kv_fraction}")


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    """One replica's capacity for one mix, and the steady state at that rate.

    ``rps``: the largest rate meeting the SLO and limits (0: unattainable); ``limit``: the
    binding bound ("tpot", "ttft", "max-num-seqs", "token-budget", "kv-blocks",
    "tpot-unattainable", "ttft-unattainable"); ``step_s``, ``ttft_s``, ``num_running``: the
    modelled mean step time, TTFT and running requests at ``rps``; ``saturation_rps``: the
    throughput bound 1/a, reached only with unbounded step times; ``base_step_s`` (c0),
    ``request_cost_s`` (a) and ``resident_steps`` (n + O - 1) give the model at any rate."""

    rps: float
    limit: str
    step_s: float
    ttft_s: float
    num_running: float
    saturation_rps: float
    base_step_s: float
    request_cost_s: float
    resident_steps: float

    def step_at(self, rps: float) -> float:
        """Mean step time at ``rps`` (inf at or past saturation)."""
        load = rps * self.request_cost_s
        return math.inf if load >= 1 else self.base_step_s / (1 - load)

    def concurrency_at(self, rps: float) -> float:
        """Running requests at ``rps`` (Little's law per step; turns a queue into replicas)."""
        return rps * self.step_at(rps) * self.resident_steps


def capacity(
    profile: StepProfile, mix: TokenMix, slo: Slo, limits: EngineLimits | None = None
) -> ReplicaCapacity:
    """The capacity of one replica for ``mix`` (bucketed, cached); see the module docstring."""
    return _capacity(profile, mix.bucketed(), slo, limits or EngineLimits())


def capacity_rps(
    profile: StepProfile, mix: TokenMix, slo: Slo, limits: EngineLimits | None = None
) -> float:
    """Requests per second of ``mix`` one replica serves within ``slo`` (0: none)."""
    return capacity(profile, mix, slo, limits).rps


@lru_cache(maxsize=4096)
def _capacity(
    profile: StepProfile, mix: TokenMix, slo: Slo, limits: EngineLimits
) -> ReplicaCapacity:
    p, o = mix.prompt_tokens, mix.output_tokens
    c0 = profile.c0_s
    chunks = math.ceil(p / limits.max_num_batched_tokens)
    own = (
        profile.c_prefill_s * p
        + profile.c_attn_s * p * (p + 1) / 2
        + profile.c_kv_s * p * (chunks + 1) / 2
    )
    decode = (o - 1) * (profile.c_decode_s + profile.c_kv_s * (p + o / 2))
    a = own + decode  # step-seconds one request adds beyond c0
    saturation = math.inf if a <= 0 else 1 / a
    resident_steps = chunks + o - 1

    bounds: dict[str, float] = {}
    unattainable = ""
    if c0 >= slo.tpot_s:
        unattainable = "tpot-unattainable"
    bounds["tpot"] = _rate_for_step(c0, slo.tpot_s, a)
    ttft_step = (slo.ttft_s - profile.c_request_s - own) / (chunks + 0.5)
    if ttft_step <= c0:
        unattainable = unattainable or "ttft-unattainable"
    bounds["ttft"] = _rate_for_step(c0, ttft_step, a)
    bounds["max-num-seqs"] = _rate_for_occupancy(c0, a, resident_steps, limits.max_num_seqs)
    bounds["token-budget"] = _rate_for_occupancy(c0, a, p + o - 1, limits.max_num_batched_tokens)
    blocks_per_seq = (p + o / 2) / limits.block_size + 1
    seqs_in_kv = limits.kv_fraction * limits.num_gpu_blocks / blocks_per_seq
    bounds["kv-blocks"] = _rate_for_occupancy(c0, a, resident_steps, seqs_in_kv)

    if unattainable:
        return ReplicaCapacity(
            0.0,
            unattainable,
            c0,
            _ttft(profile, c0, chunks, own),
            0.0,
            saturation,
            c0,
            a,
            resident_steps,
        )
    limit = min(bounds, key=lambda name: bounds[name])
    rps = bounds[limit]
    step = c0 / (1 - rps * a)
    return ReplicaCapacity(
        rps=rps,
        limit=limit,
        step_s=step,
        ttft_s=_ttft(profile, step, chunks, own),
        num_running=rps * step * resident_steps,
        saturation_rps=saturation,
        base_step_s=c0,
        request_cost_s=a,
        resident_steps=resident_steps,
    )


def _rate_for_step(c0: float, step_s: float, a: float) -> float:
    """The rate at which the mean step time reaches ``step_s``: t(r) = c0 / (1 - r a)."""
    if step_s <= c0:
        return 0.0
    return math.inf if a <= 0 else (1 - c0 / step_s) / a


def _rate_for_occupancy(c0: float, a: float, steps: float, most: float) -> float:
    """The rate at which r * t(r) * steps reaches ``most``: r = most / (steps c0 + most a)."""
    denominator = steps * c0 + most * a
    return math.inf if denominator <= 0 else most / denominator


def _ttft(profile: StepProfile, step_s: float, chunks: int, own: float) -> float:
    return profile.c_request_s + (chunks + 0.5) * step_s + own


def _round_up(value: float) -> float:
    """``value`` rounded up to the next point of the 1/16-octave grid (exact integers
    below 16 stay: short lengths matter relatively more)."""
    if value <= _GRID and value == int(value):
        return value
    return 2 ** (math.ceil(math.log2(value) * _GRID - 1e-9) / _GRID)
