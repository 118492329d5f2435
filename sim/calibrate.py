"""Fit a step-time profile to an engine by measuring it: ``shoal sim calibrate``.

Two kinds of runs, each on fresh random prompts (no prefix-cache hits: the seed is new
each run unless given, since the engine keeps what an earlier run cached), sent as
token-id lists so no tokenizer is involved:

* prefill: one request at a time, prompt length L, ``max_tokens`` 1. Its TTFT is the
  admission latency and one step (L <= the engine's token budget):
  ``c_request + c0 + (c_prefill + c_kv) * L + c_attn * L * (L + 1) / 2``;
* decode: B requests at once, prompt length C, N tokens each. The gap before output token
  k (k >= 1) is one decode step of B sequences whose context sums to ``B * (C + k)``:
  ``c0 + c_decode * B + c_kv * B * (C + k)``; a row is the mean over k (``HttpProber``
  reads it from the server's inter-token-latency histogram). The batch's first steps may
  still mix in a late request's prefill, which makes the row a few percent long at N = 32.

Each measurement is one row of a linear system in (c0, c_prefill, c_decode, c_kv,
c_request, c_attn); rows
are divided by their measured value so the fit minimizes *relative* error (a 5 ms decode
step counts as much as a 200 ms prefill), then solved by least squares (numpy ``lstsq``).
Coefficients are kept non-negative (Lawson-Hanson NNLS: noise around a true 0 must not
come out as a negative cost), and the fit is robust: relative errors are reweighted with
Cauchy weights (IRLS), so a few rows from requests that stalled on a busy host do not drag
the coefficients.
Decode runs at two context lengths make ``c_kv`` separable from ``c_prefill``, and
prefills of five lengths (1/16 to all of ``--max-prompt``) the quadratic ``c_attn``.

Where it is measured is a ``Prober``: ``HttpProber`` streams from an OpenAI-compatible
server (a real vLLM or a simulator; ``time_scale`` converts a simulator's wall time back
to simulated time); ``VirtualProber`` runs the simulator's own scheduler in virtual time,
exactly, which is how the unit tests check that the fit recovers known coefficients.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sim.errors import CalibrationError
from sim.profile import StepProfile
from sim.scheduler import Request, Scheduler, SchedulerConfig

__all__ = [
    "CalibrationFit",
    "CalibrationPlan",
    "HttpProber",
    "Measurement",
    "Prober",
    "VirtualProber",
    "calibrate",
    "fit_profile",
    "measure",
]


@dataclass(frozen=True, slots=True)
class CalibrationPlan:
    max_prompt: int = 1024
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    decode_tokens: int = 32
    repeats: int = 2
    vocab_size: int = 1000
    seed: int | None = None  # None: fresh prompts every run (an engine keeps its cache)

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        lengths = {max(8, self.max_prompt // d) for d in (16, 8, 4, 2, 1)}
        return tuple(sorted(lengths))

    @property
    def decode_contexts(self) -> tuple[int, ...]:
        return (max(8, self.max_prompt // 8), max(16, self.max_prompt // 2))


@dataclass(frozen=True, slots=True)
class Measurement:
    """One row: the step's features and its measured duration (simulated seconds)."""

    kind: str  # "prefill" or "decode"
    # 1, prefill tokens, decode seqs, context tokens, admissions, prefill query-key pairs
    features: tuple[float, float, float, float, float, float]
    seconds: float


class Prober(Protocol):
    async def ttft(self, prompt: Sequence[int]) -> float:
        """Seconds from sending ``prompt`` (``max_tokens`` 1) to its first token."""
        ...

    async def decode_step(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> float:
        """Send every prompt at once, ``max_tokens`` each; the mean time between two
        tokens of one request over the run (seconds)."""
        ...


@dataclass(frozen=True, slots=True)
class CalibrationFit:
    profile: StepProfile
    ttft_error: float  # mean relative error of the fit on the prefill rows
    itl_error: float
    num_measurements: int
    measurements: tuple[Measurement, ...] = field(repr=False, default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_json(),
            "ttft_error": self.ttft_error,
            "itl_error": self.itl_error,
            "num_measurements": self.num_measurements,
        }


# -- measuring -----------------------------------------------------------------------


async def measure(prober: Prober, plan: CalibrationPlan) -> list[Measurement]:
    if plan.decode_tokens < 2:
        raise CalibrationError("decode runs need --decode-tokens >= 2")
    rng = np.random.default_rng(plan.seed)

    def prompt(length: int) -> list[int]:
        return [int(t) for t in rng.integers(1, plan.vocab_size, size=length)]

    rows: list[Measurement] = []
    for _ in range(plan.repeats):
        for length in plan.prompt_lengths:
            seconds = await prober.ttft(prompt(length))
            pairs = length * (length + 1) / 2
            rows.append(Measurement("prefill", (1.0, length, 0.0, length, 1.0, pairs), seconds))
        for context in plan.decode_contexts:
            for batch in plan.batch_sizes:
                prompts = [prompt(context) for _ in range(batch)]
                seconds = await prober.decode_step(prompts, plan.decode_tokens)
                # the gap before token k (1..N-1) attends over C + k: C + N/2 on average
                mean_context = context + plan.decode_tokens / 2
                features = (1.0, 0.0, batch, batch * mean_context, 0.0, 0.0)
                rows.append(Measurement("decode", features, seconds))
    return rows


# -- fitting -------------------------------------------------------------------------

_IRLS_ROUNDS = 20
_CAUCHY_C = 2.385  # Cauchy weight's tuning constant (95% efficiency for normal noise)


def fit_profile(rows: Sequence[Measurement], source: str = "") -> CalibrationFit:
    """Non-negative, outlier-robust least squares on relative errors (module docstring)."""
    if len(rows) < 5:
        raise CalibrationError(f"need at least 5 measurements, got {len(rows)}")
    x = np.array([r.features for r in rows], dtype=float)
    y = np.array([r.seconds for r in rows], dtype=float)
    if np.any(y <= 0):
        raise CalibrationError("a measured time is not positive (clock or engine error)")
    # Relative errors, then reweighted with Cauchy weights (iteratively reweighted least
    # squares) so that a few stalled requests pull little.
    coef = _nnls(x / y[:, None], np.ones_like(y))
    for _ in range(_IRLS_ROUNDS):
        relative = (x @ coef - y) / y
        scale = max(1.4826 * float(np.median(np.abs(relative))), 1e-6)
        weight = np.sqrt(1.0 / (1.0 + (relative / (_CAUCHY_C * scale)) ** 2)) / y
        coef = _nnls(x * weight[:, None], y * weight)
    relative = np.abs(x @ coef - y) / y
    kinds = np.array([r.kind for r in rows])
    profile = StepProfile(
        c0_s=float(coef[0]),
        c_prefill_s=float(coef[1]),
        c_decode_s=float(coef[2]),
        c_kv_s=float(coef[3]),
        c_request_s=float(coef[4]),
        c_attn_s=float(coef[5]),
        source=source,
    )
    return CalibrationFit(
        profile=profile,
        ttft_error=float(np.median(relative[kinds == "prefill"]))
        if any(kinds == "prefill")
        else 0.0,
        itl_error=float(np.median(relative[kinds == "decode"])) if any(kinds == "decode") else 0.0,
        num_measurements=len(rows),
        measurements=tuple(rows),
    )


def _nnls(a: Any, b: Any, max_iter: int = 100) -> Any:
    """min ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method)."""
    n = a.shape[1]
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tolerance = 1e-10 * float(np.abs(a).max()) * float(np.abs(b).max())
    for _ in range(max_iter):
        gradient = a.T @ (b - a @ x)
        if passive.all() or gradient[~passive].max() <= tolerance:
            break
        passive[int(np.argmax(np.where(passive, -np.inf, gradient)))] = True
        while True:
            z = np.zeros(n)
            z[passive], *_ = np.linalg.lstsq(a[:, passive], b, rcond=None)
            if (z[passive] > 0).all():
                x = z
                break
            shrink = passive & (z <= 0)
            alpha = float(np.min(x[shrink] / (x[shrink] - z[shrink])))
            x = x + alpha * (z - x)
            passive &= x > 0
    return x


def calibrate(prober: Prober, plan: CalibrationPlan, source: str = "") -> CalibrationFit:
    return fit_profile(asyncio.run(measure(prober, plan)), source)


# -- probers -------------------------------------------------------------------------


class VirtualProber:
    """The simulator's scheduler under ``profile``, in virtual time (exact, instant)."""

    def __init__(self, profile: StepProfile, config: SchedulerConfig) -> None:
        self.profile = profile
        self.config = config
        self._scheduler = Scheduler(config)
        self._next_id = 0

    async def ttft(self, prompt: Sequence[int]) -> float:
        (times,) = self._run([prompt], 1)
        return times[0]

    async def decode_step(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> float:
        streams = self._run(prompts, max_tokens)
        return float(np.mean([(t[-1] - t[0]) / (len(t) - 1) for t in streams]))

    def _run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[float]]:
        scheduler = self._scheduler
        requests = []
        for prompt in prompts:
            self._next_id += 1
            request = Request(f"v{self._next_id}", list(prompt), max_tokens, 0.0)
            scheduler.add(request)
            requests.append(request)
        times: dict[int, list[float]] = {id(r): [] for r in requests}
        now = self.profile.c_request_s  # sent at 0, schedulable after admission
        while scheduler.has_work:
            plan = scheduler.schedule()
            assert plan.scheduled, "a lone batch always makes progress"
            now += self.profile.step_s(plan.shape)
            for request, _ in scheduler.update(plan, now).sampled:
                times[id(request)].append(now)
        return [times[id(r)] for r in requests]


_ITL = "vllm:inter_token_latency_seconds"


class HttpProber:
    """Measures an OpenAI-compatible server over HTTP.

    TTFT is timed by this client (times ``time_scale`` for a simulator). Decode steps are
    read from the server's own ``vllm:inter_token_latency_seconds`` histogram (the
    difference of its sum over its count across the run): vLLM stamps those in the engine
    core, so they hold even when its API server, starved of CPU on a busy host, delivers a
    whole stream in one burst (seen on the project's 2-core machines); a simulator reports
    them in simulated seconds. A server without that metric is timed from the streams'
    first and last tokens.
    """

    def __init__(self, base_url: str, model: str | None = None, time_scale: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.time_scale = time_scale

    async def first_model(self) -> str:
        """The first model the server lists."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            return await self._first_model(session)

    async def ttft(self, prompt: Sequence[int]) -> float:
        (times,) = await self._streams([prompt], 1)
        if not times:
            raise CalibrationError(f"a {len(prompt)}-token prompt produced no token")
        return times[0]

    async def decode_step(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> float:
        before = await self._itl()
        streams = await self._streams(prompts, max_tokens)
        after = await self._itl()
        if before is not None and after is not None and after[1] > before[1]:
            return (after[0] - before[0]) / (after[1] - before[1])
        spans = [(t[-1] - t[0]) / (len(t) - 1) for t in streams if len(t) > 1 and t[-1] > t[0]]
        if not spans:
            raise CalibrationError("no stream had two tokens apart in time")
        return float(np.median(spans))

    async def _itl(self) -> tuple[float, float] | None:
        """(sum, count) of the server's inter-token latency histogram, or None."""
        import aiohttp

        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"{self.base_url}/metrics") as reply,
            ):
                text = await reply.text() if reply.status == 200 else ""
        except (OSError, aiohttp.ClientError):
            return None
        found: dict[str, float] = {}
        for line in text.splitlines():
            for part in ("sum", "count"):
                if line.startswith(f"{_ITL}_{part}"):
                    found[part] = found.get(part, 0.0) + float(line.rsplit(" ", 1)[1])
        return (found["sum"], found["count"]) if len(found) == 2 else None

    async def _streams(
        self, prompts: Sequence[Sequence[int]], max_tokens: int
    ) -> list[list[float]]:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            if self.model is None:
                self.model = await self._first_model(session)
            return list(
                await asyncio.gather(
                    *(self._one(session, prompt, max_tokens) for prompt in prompts)
                )
            )

    async def _first_model(self, session: Any) -> str:
        try:
            async with session.get(f"{self.base_url}/v1/models") as reply:
                body = await reply.json()
            return str(body["data"][0]["id"])
        except (OSError, KeyError, IndexError, ValueError) as exc:
            raise CalibrationError(f"cannot list models at {self.base_url}: {exc}") from None

    async def _one(self, session: Any, prompt: Sequence[int], max_tokens: int) -> list[float]:
        import aiohttp

        body = {
            "model": self.model,
            "prompt": list(prompt),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "temperature": 0.0,
            "return_token_ids": True,
        }
        times: list[float] = []
        start = time.perf_counter()
        try:
            async with session.post(f"{self.base_url}/v1/completions", json=body) as reply:
                if reply.status != 200:
                    raise CalibrationError(
                        f"engine answered {reply.status}: {(await reply.text())[:200]}"
                    )
                async for raw in reply.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        # vLLM merges the outputs of steps its client has not read yet
                        # into one chunk: count its tokens, each arriving now.
                        ids = chunk["choices"][0].get("token_ids") or [0]
                        now = (time.perf_counter() - start) * self.time_scale
                        times.extend([now] * len(ids))
        except (OSError, aiohttp.ClientError) as exc:
            raise CalibrationError(f"cannot reach {self.base_url}: {exc}") from None
        return times
