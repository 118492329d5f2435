"""Fit a step-time profile to an engine by measuring it: ``shoal sim calibrate``.

Two kinds of runs, each on fresh random prompts (no prefix-cache hits), sent as token-id
lists so no tokenizer is involved:

* prefill: one request at a time, prompt length L, ``max_tokens`` 1. Its TTFT is one step
  (L <= the engine's token budget) of ``c0 + (c_prefill + c_kv) * L``;
* decode: B requests at once, prompt length C, N tokens each. The gap before output token
  k (k >= 1) is one decode step of B sequences whose context sums to ``B * (C + k)``:
  ``c0 + c_decode * B + c_kv * B * (C + k)``. Only the second half of each stream is used
  (the first steps may still mix in a late request's prefill).

Each measurement is one row of a linear system in (c0, c_prefill, c_decode, c_kv); rows
are divided by their measured value so the fit minimizes *relative* error (a 5 ms decode
step counts as much as a 200 ms prefill), then solved by least squares (numpy ``lstsq``).
A negative coefficient (noise around a true 0) is clamped to 0 and the rest refitted.
Decode runs at two context lengths make ``c_kv`` separable from ``c_prefill``.

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
    seed: int = 0

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
    features: tuple[float, float, float, float]  # 1, prefill tokens, decode seqs, context
    seconds: float


class Prober(Protocol):
    async def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[float]]:
        """Send every prompt at once; per request, each token's arrival time (seconds
        after the send)."""
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
            "profile": self.profile.to_json(), "ttft_error": self.ttft_error,
            "itl_error": self.itl_error, "num_measurements": self.num_measurements,
        }  # fmt: skip


# -- measuring -----------------------------------------------------------------------


async def measure(prober: Prober, plan: CalibrationPlan) -> list[Measurement]:
    rng = np.random.default_rng(plan.seed)

    def prompt(length: int) -> list[int]:
        return [int(t) for t in rng.integers(1, plan.vocab_size, size=length)]

    rows: list[Measurement] = []
    for _ in range(plan.repeats):
        for length in plan.prompt_lengths:
            (times,) = await prober.run([prompt(length)], 1)
            if not times:
                raise CalibrationError(f"a {length}-token prompt produced no token")
            rows.append(Measurement("prefill", (1.0, length, 0.0, length), times[0]))
        for context in plan.decode_contexts:
            for batch in plan.batch_sizes:
                streams = await prober.run([prompt(context) for _ in range(batch)],
                                           plan.decode_tokens)  # fmt: skip
                rows.extend(_decode_rows(streams, batch, context, plan.decode_tokens))
    return rows


def _decode_rows(
    streams: Sequence[Sequence[float]], batch: int, context: int, num_tokens: int
) -> list[Measurement]:
    start = max(1, num_tokens // 2)
    gaps: list[float] = []
    contexts: list[float] = []
    for times in streams:
        if len(times) != num_tokens:
            raise CalibrationError(f"asked for {num_tokens} tokens, got {len(times)}")
        for k in range(start, num_tokens):
            gaps.append(times[k] - times[k - 1])
            contexts.append(context + k)
    if not gaps:
        raise CalibrationError("decode runs need --decode-tokens >= 2")
    mean_context = float(np.mean(contexts))
    return [Measurement("decode", (1.0, 0.0, batch, batch * mean_context), float(np.mean(gaps)))]


# -- fitting -------------------------------------------------------------------------


def fit_profile(rows: Sequence[Measurement], source: str = "") -> CalibrationFit:
    if len(rows) < 4:
        raise CalibrationError(f"need at least 4 measurements, got {len(rows)}")
    x = np.array([r.features for r in rows], dtype=float)
    y = np.array([r.seconds for r in rows], dtype=float)
    if np.any(y <= 0):
        raise CalibrationError("a measured time is not positive (clock or engine error)")
    active = [0, 1, 2, 3]
    while True:
        weighted = x[:, active] / y[:, None]
        solution, *_ = np.linalg.lstsq(weighted, np.ones_like(y), rcond=None)
        if np.all(solution >= 0) or len(active) == 1:
            break
        active.pop(int(np.argmin(solution)))  # clamp the most negative to 0 and refit
    coef = np.zeros(4)
    coef[active] = np.maximum(solution, 0.0)
    predicted = x @ coef
    relative = np.abs(predicted - y) / y
    kinds = np.array([r.kind for r in rows])
    profile = StepProfile(
        c0_s=float(coef[0]), c_prefill_s=float(coef[1]), c_decode_s=float(coef[2]),
        c_kv_s=float(coef[3]), source=source,
    )  # fmt: skip
    return CalibrationFit(
        profile=profile,
        ttft_error=float(relative[kinds == "prefill"].mean()) if any(kinds == "prefill") else 0.0,
        itl_error=float(relative[kinds == "decode"].mean()) if any(kinds == "decode") else 0.0,
        num_measurements=len(rows),
        measurements=tuple(rows),
    )


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

    async def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[float]]:
        scheduler = self._scheduler
        requests = []
        for prompt in prompts:
            self._next_id += 1
            request = Request(f"v{self._next_id}", list(prompt), max_tokens, 0.0)
            scheduler.add(request)
            requests.append(request)
        times: dict[int, list[float]] = {id(r): [] for r in requests}
        now = 0.0
        while scheduler.has_work:
            plan = scheduler.schedule()
            assert plan.scheduled, "a lone batch always makes progress"
            now += self.profile.step_s(plan.shape)
            for request, _ in scheduler.update(plan, now).sampled:
                times[id(request)].append(now)
        return [times[id(r)] for r in requests]


class HttpProber:
    """Streams ``/v1/completions`` from an OpenAI-compatible server."""

    def __init__(self, base_url: str, model: str | None = None, time_scale: float = 1.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.time_scale = time_scale

    async def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> list[list[float]]:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
            if self.model is None:
                self.model = await self._first_model(session)
            return list(await asyncio.gather(*(
                self._one(session, prompt, max_tokens) for prompt in prompts)))  # fmt: skip

    async def first_model(self) -> str:
        """The first model the server lists (its own session)."""
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            return await self._first_model(session)

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
            "model": self.model, "prompt": list(prompt), "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "temperature": 0.0,
        }  # fmt: skip
        times: list[float] = []
        start = time.perf_counter()
        try:
            async with session.post(f"{self.base_url}/v1/completions", json=body) as reply:
                if reply.status != 200:
                    raise CalibrationError(f"engine answered {reply.status}: "
                                           f"{(await reply.text())[:200]}")  # fmt: skip
                async for raw in reply.content:
                    line = raw.strip()
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices"):
                        times.append((time.perf_counter() - start) * self.time_scale)
        except (OSError, aiohttp.ClientError) as exc:
            raise CalibrationError(f"cannot reach {self.base_url}: {exc}") from None
        return times
