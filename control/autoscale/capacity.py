"""How many requests per second of a token mix one replica serves within an SLO.

Invariant: ``capacity(profile, mix, slo, limits).rps`` is the largest steady (Poisson)
arrival rate of requests with ``mix``'s mean prompt and output lengths at which one
continuous-batching engine, priced by ``profile`` (sim/profile.py), keeps the *mean* TTFT
and the *mean* TPOT within ``slo`` and stays inside its ``max_num_seqs``,
``max_num_batched_tokens`` and KV blocks. It is a pure function of frozen values, cached
by mix bucket (``TokenMix.bucketed`` rounds lengths *up* onto a 1/16-octave grid, so a
cached answer never overstates).

The steady-state batch model (arrival rate ``r``, mean prompt ``P`` and output ``O``
tokens, chunk budget ``M = max_num_batched_tokens``, ``n = ceil(P / M)`` prefill chunks)::

    a request occupies the running batch for R = n + O - 1 steps: n prefill chunks (the
    last samples token 1), then O - 1 decodes at contexts P+1 .. P+O-1 (mean P + O/2)

    own = P c_prefill + c_attn P(P+1)/2 + c_kv P(n+1)/2      its prefill's step-seconds
    a   = own + (O - 1) (c_decode + c_kv (P + O/2))          all it adds beyond c0

    mean step t = c0 + r t a  (Little's law per step: r t requests arrive per step)
      => t(r) = c0 / (1 - rho),  rho = r a                   (saturation at r = 1/a)

    TTFT(r) = c_request + (n' + 1/2) t + own + Wq             half a step in flight, n'
              n' = ceil(P / (M - r t (O - 1)))                steps of chunks (decodes
              Wq = r own^2 / (2 (1 - rho))                    take budget first), its own
                                                              prefill, and the M/G/1 wait
                                                              behind others' prefills
    TPOT(r) = t + r own (own + Wq) / ((1 - rho) (O - 1))      the prefills that arrived
                                                              while it queued and
                                                              prefilled run in its decodes

    running L(r) = r t R ;  L + sqrt(L) <= max_num_seqs       (square-root staffing: the
    KV      L + sqrt(L) <= kv_fraction (blocks - 1) / blocks_per_seq,  number in service
            blocks_per_seq = (P + O/2) / block_size + 1            is ~Poisson(L))
    tokens  r t (P + O - 1) <= max_num_batched_tokens

TTFT and TPOT increase with ``r`` and are solved by bisection on [0, 1/a); the occupancy
bounds are closed form (``r = L / (R c0 + L a)``). ``rps`` is the smallest bound
(``limit`` names it); 0 when a request alone misses the TTFT or the fixed step cost alone
misses the TPOT (``limit`` "ttft-unattainable" / "tpot-unattainable";
``saturation_rps`` then still says what the replica can push through).

Why the two queueing terms: a plain mean-field model (``t(r)`` against the TPOT, half a
step of waiting) matched sim.scheduler for decode-heavy mixes but was 40-50% optimistic
for prefill-heavy ones (3,000-token prompts, 32 output tokens at 0.9x its bound: TPOT 58
ms against 33 modelled, TTFT 0.75 s against 0.37): prefill arrives in lumps, so a request
waits behind whole prompts, and the prompts that arrive while it prefills land in its
decode steps. With them, from 0.5x to 0.9x of capacity on mixes from 128/512 to
4,000/200 tokens, the modelled mean TTFT and TPOT are at most ~20% below the scheduler's
(2,048/16: TTFT 0.50 s modelled, 0.60 s measured at 0.9x) and at most ~30% above it
(4,000/200, two chunks per prompt: TTFT 0.78 s against 0.59 s).

Rejected: simulating the scheduler per query (exact but ~10^4 times slower; the controller
and the trace simulator ask for every mix bucket); percentile targets (the TTFT the
controller sees is a mean, ``TTFT_MEAN_S``). How it fails: burstier than Poisson arrivals
(a trace's seconds-scale spikes) queue more than modelled; prefix-cache hits make it
pessimistic (cached prompt tokens are priced as computed); a profile that does not match
the engine mis-sizes everything. tests/unit/test_autoscale_capacity.py checks the bounds
by hand and against sim.scheduler itself (the SLO holds at 0.9x the rate, fails at 1.5x).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from sim.profile import StepProfile

__all__ = ["EngineLimits", "ReplicaCapacity", "Slo", "TokenMix", "capacity", "capacity_rps"]

_GRID = 16  # buckets per octave: lengths within ~4.4% share one cached answer
_BISECTIONS = 60  # halvings of [0, 1/a): far below any rate that matters


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

    ``kv_fraction``: the share of KV blocks the model lets the running batch fill."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    num_gpu_blocks: int = 8192
    block_size: int = 16
    kv_fraction: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_gpu_blocks", "block_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 < self.kv_fraction <= 1:
            raise ValueError(f"kv_fraction must be in (0, 1], got {self.kv_fraction}")


@dataclass(frozen=True, slots=True)
class ReplicaCapacity:
    """One replica's capacity for one mix, and the model's steady state at that rate.

    ``rps``: the largest rate meeting the SLO and limits (0: unattainable); ``limit``: the
    binding bound ("tpot", "ttft", "max-num-seqs", "token-budget", "kv-blocks",
    "tpot-unattainable", "ttft-unattainable"); ``step_s``, ``ttft_s``, ``tpot_s``,
    ``num_running``: the modelled mean step time, TTFT, TPOT and running requests at
    ``rps``; ``saturation_rps``: the throughput bound 1/a (unbounded step times there);
    ``base_step_s`` (c0), ``request_cost_s`` (a) and ``resident_steps`` (R) give the
    model at any other rate."""

    rps: float
    limit: str
    step_s: float
    ttft_s: float
    tpot_s: float
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


class _Model:
    """The module docstring's equations for one mix (internal; rates in requests/s)."""

    def __init__(self, profile: StepProfile, mix: TokenMix, limits: EngineLimits) -> None:
        p, o = mix.prompt_tokens, mix.output_tokens
        self.profile = profile
        self.decodes = o - 1
        self.chunks = math.ceil(p / limits.max_num_batched_tokens)
        self.own = (
            profile.c_prefill_s * p
            + profile.c_attn_s * p * (p + 1) / 2
            + profile.c_kv_s * p * (self.chunks + 1) / 2
        )
        self.a = self.own + self.decodes * (profile.c_decode_s + profile.c_kv_s * (p + o / 2))
        self.saturation = math.inf if self.a <= 0 else 1 / self.a
        self.resident_steps = self.chunks + self.decodes
        self.tokens_per_request = p + self.decodes
        self.prompt = p
        self.budget = limits.max_num_batched_tokens

    def step(self, rps: float) -> float:
        load = rps * self.a
        return math.inf if load >= 1 else self.profile.c0_s / (1 - load)

    def wait(self, rps: float) -> float:
        """Mean wait behind others' prefills (M/G/1 with the prefill as the lumpy part)."""
        load = rps * self.a
        return math.inf if load >= 1 else rps * self.own**2 / (2 * (1 - load))

    def ttft(self, rps: float) -> float:
        step = self.step(rps)
        if math.isinf(step):
            return step
        # running decodes take their token of each step's budget first: fewer for prompts
        room = max(1.0, self.budget - rps * step * self.decodes)
        chunks = max(self.chunks, math.ceil(self.prompt / room))
        return self.profile.c_request_s + (chunks + 0.5) * step + self.own + self.wait(rps)

    def tpot(self, rps: float) -> float:
        step = self.step(rps)
        if self.decodes <= 0 or math.isinf(step):
            return step
        spill = rps * self.own * (self.own + self.wait(rps)) / (1 - rps * self.a)
        return step + spill / self.decodes

    def rate_for(self, metric: Callable[[float], float], most: float) -> float:
        """The largest rate with ``metric(rate) <= most`` (``metric`` increasing)."""
        if metric(0.0) > most:
            return 0.0
        if math.isinf(self.saturation):
            return math.inf
        low, high = 0.0, self.saturation
        for _ in range(_BISECTIONS):
            middle = (low + high) / 2
            if metric(middle) <= most:
                low = middle
            else:
                high = middle
        return low

    def rate_for_running(self, most: float) -> float:
        """The rate at which r t(r) steps reaches ``most``: r = most / (steps c0 + most a)."""
        denominator = self.resident_steps * self.profile.c0_s + most * self.a
        return math.inf if denominator <= 0 else most / denominator


@lru_cache(maxsize=4096)
def _capacity(
    profile: StepProfile, mix: TokenMix, slo: Slo, limits: EngineLimits
) -> ReplicaCapacity:
    model = _Model(profile, mix, limits)
    unattainable = ""
    if model.tpot(0.0) > slo.tpot_s:
        unattainable = "tpot-unattainable"
    elif model.ttft(0.0) > slo.ttft_s:
        unattainable = "ttft-unattainable"
    bounds = {
        "tpot": model.rate_for(model.tpot, slo.tpot_s),
        "ttft": model.rate_for(model.ttft, slo.ttft_s),
        "max-num-seqs": model.rate_for_running(_staffed(limits.max_num_seqs)),
        "kv-blocks": model.rate_for_running(
            _staffed(
                limits.kv_fraction
                * (limits.num_gpu_blocks - 1)
                / ((mix.prompt_tokens + mix.output_tokens / 2) / limits.block_size + 1)
            )
        ),
        # tokens computed per step r t (P + O - 1) <= M: the same form, per token
        "token-budget": limits.max_num_batched_tokens
        / (model.tokens_per_request * profile.c0_s + limits.max_num_batched_tokens * model.a),
    }
    limit = unattainable or min(bounds, key=lambda name: bounds[name])
    rps = 0.0 if unattainable else bounds[limit]
    return ReplicaCapacity(
        rps=rps,
        limit=limit,
        step_s=model.step(rps),
        ttft_s=model.ttft(rps),
        tpot_s=model.tpot(rps),
        num_running=rps * model.step(rps) * model.resident_steps,
        saturation_rps=model.saturation,
        base_step_s=profile.c0_s,
        request_cost_s=model.a,
        resident_steps=model.resident_steps,
    )


def _staffed(servers: float) -> float:
    """The mean number in service ``L`` with ``L + sqrt(L) = servers`` (one Poisson
    standard deviation of headroom: square-root staffing); 0 below one server."""
    if servers <= 0:
        return 0.0
    return ((math.sqrt(1 + 4 * servers) - 1) / 2) ** 2


def _round_up(value: float) -> float:
    """``value`` rounded up to the next point of the 1/16-octave grid (exact integers
    below 16 stay: short lengths matter relatively more)."""
    if value <= _GRID and value == int(value):
        return value
    return 2 ** (math.ceil(math.log2(value) * _GRID - 1e-9) / _GRID)
