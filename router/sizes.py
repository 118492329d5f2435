"""The rolling request-size histogram the placement planner reads (issue 14).

Every request the router finished with an engine's answer adds its (prompt tokens,
completion tokens) to its model's histogram, and every request it received for the model
(refused, held, failed ones too) counts as an arrival; ``GET /v1/request_sizes`` sums the
last ``window_s`` seconds (``RequestSizes.snapshot``): the finished requests' shape and
rate (``count``, ``rate``, ``counts``) and the demand (``arrivals``, ``arrival_rate``).
The planner plans for the higher rate with the finished requests' shape: under overload
(429s, held or timed-out requests) the finished rate is what was served, not what was
asked. On by default and bounded: no flag, no
tracing, no list of requests (AIBrix's optimizer produced no plan while its gateway's
tracing was off: #1014, #1713).

Layout (per model; ``E = len(EDGES) = 12``)::

    EDGES = 16, 32, 64, ..., 32768 tokens (powers of two), both axes
    ring  = num_slots slots of slot_s seconds each, slot k covering
            [started + k*slot_s, started + (k+1)*slot_s); slot k lives at k % num_slots
    slot  = (k, counts): counts[i*E + j] = requests with completion tokens in bin i and
            prompt tokens in bin j, counts[E*E] = arrivals (an unsigned 32-bit array of
            E*E + 1 = 145 counts)
    bin b = (EDGES[b-1], EDGES[b]] (bin 0 from 0; above 32768 counts in the last bin)

Assumptions: (1) the clock is monotonic (``time.monotonic`` injected; tests pass virtual
time); (2) a slot whose ``k`` is not the current one is stale and is zeroed when reused, so
a model idle for longer than the ring reads as zeros, never as old counts; (3) a window
covers whole slots only: slots starting at or after ``now - window_s``, so
``span_s = now - start of the oldest covered slot`` is at most ``window_s`` and at least
``window_s - slot_s`` (less right after start: the router has not seen more), and
``rate = count / max(span_s, slot_s)`` is the rate of what it counted: the floor of one
slot keeps the first requests after a restart from reading as a huge rate (10 requests
in 0.2 s are 1 req/s over a 10 s slot, not 50 req/s); ``arrival_rate`` likewise.

Memory is bounded: at most ``max_models`` histograms (the proxy passes the model's bounded
metrics label, ``router.metrics.ModelLabels``; beyond the bound here too, names fall in
``other``), each ``num_slots x 145`` counters (61 slots: 35 KiB).

``ResponseTokens`` reads an answer's token counts as it streams through the proxy: the
engine's ``usage`` block when it sent one (exact; vLLM puts it last), else, for a stream
without usage (``stream_options.include_usage`` unset, and the proxy never rewrites the
client's body), one token per streamed choice chunk: events carrying ``"finish_reason"``
minus chat's first role-only events (vLLM streams a token per event; an estimate when it
batches). Embeddings are not recorded (no output: they are not what placement sizes).

Rejected: a list of (time, prompt, completion) per request (memory grows with the rate);
exponential decay (the planner wants counts and a rate over a stated window, as Mélange's
input is); numpy (nothing here needs it on the hot path: one increment per request).
"""

from __future__ import annotations

import array
import bisect
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from router.errors import BadRequest

__all__ = [
    "DEFAULT_WINDOW_S",
    "EDGES",
    "MAX_WINDOW_S",
    "OTHER_MODEL",
    "RequestSizes",
    "ResponseTokens",
    "SizeSnapshot",
    "bin_of",
]

EDGES: tuple[int, ...] = tuple(2**k for k in range(4, 16))  # 16 .. 32768
SLOT_S = 10.0
DEFAULT_WINDOW_S = 300.0
MAX_WINDOW_S = 600.0
MAX_MODELS = 256
OTHER_MODEL = "other"
_CELLS = len(EDGES) * len(EDGES)
_ARRIVALS = _CELLS  # the slot's counter of arrivals, after the cells


def bin_of(tokens: int) -> int:
    """The bin of a length: the smallest edge >= tokens; above the last edge, the last."""
    return min(bisect.bisect_left(EDGES, tokens), len(EDGES) - 1)


@dataclass(frozen=True, slots=True)
class SizeSnapshot:
    """What ``GET /v1/request_sizes`` answers (``to_json``)."""

    model: str | None  # None: every model
    window_s: float
    span_s: float
    count: int
    counts: tuple[tuple[int, ...], ...]  # [out][in] on EDGES
    arrivals: int = 0  # every request received in the window, finished or not
    min_span_s: float = 0.0  # the rates' floor of span_s (one slot)

    def _per_second(self, n: int) -> float:
        span = max(self.span_s, self.min_span_s)
        return n / span if span > 0 else 0.0

    @property
    def rate(self) -> float:
        return self._per_second(self.count)

    @property
    def arrival_rate(self) -> float:
        return self._per_second(self.arrivals)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "window_s": self.window_s,
            "span_s": round(self.span_s, 3),
            "count": self.count,
            "rate": self.rate,
            "out_edges": list(EDGES),
            "in_edges": list(EDGES),
            "counts": [list(row) for row in self.counts],
            "arrivals": self.arrivals,
            "arrival_rate": self.arrival_rate,
        }


class RequestSizes:
    """Per-model rings of 2-D size counts (module docstring)."""

    def __init__(
        self,
        *,
        slot_s: float = SLOT_S,
        max_window_s: float = MAX_WINDOW_S,
        max_models: int = MAX_MODELS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert 0 < slot_s <= max_window_s, f"bad ring: slot {slot_s} s, window {max_window_s} s"
        self.slot_s = slot_s
        self.max_window_s = max_window_s
        self.max_models = max_models
        self._clock = clock
        self._started = clock()
        self._num_slots = int(max_window_s // slot_s) + 1  # + the current, partial slot
        # model -> ring of (slot number k, counts) or None where nothing was recorded yet
        self._rings: dict[str, list[tuple[int, array.array[int]] | None]] = {}
        self.num_recorded = 0

    def _slot(self, now: float) -> int:
        return int((now - self._started) // self.slot_s)

    def _counts_now(self, model: str) -> array.array[int]:
        """The current slot's counters of ``model`` (a stale slot zeroed first)."""
        if model not in self._rings and len(self._rings) >= self.max_models:
            model = OTHER_MODEL
        ring = self._rings.get(model)
        if ring is None:
            ring = self._rings[model] = [None] * self._num_slots
        k = self._slot(self._clock())
        entry = ring[k % self._num_slots]
        if entry is None or entry[0] != k:
            entry = (k, array.array("I", bytes(4 * (_CELLS + 1))))
            ring[k % self._num_slots] = entry
        return entry[1]

    def record(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Count one finished request of ``model``."""
        counts = self._counts_now(model)
        counts[bin_of(completion_tokens) * len(EDGES) + bin_of(prompt_tokens)] += 1
        self.num_recorded += 1

    def record_arrival(self, model: str) -> None:
        """Count one request received for ``model`` (before admission or routing)."""
        self._counts_now(model)[_ARRIVALS] += 1

    def check_window(self, window_s: float) -> None:
        """``BadRequest`` naming the bounds when ``window_s`` cannot be answered."""
        if not (math.isfinite(window_s) and self.slot_s <= window_s <= self.max_window_s):
            raise BadRequest(
                f"window_s must be between {self.slot_s:g} and {self.max_window_s:g} seconds "
                f"(the router keeps {self.max_window_s:g} s of request sizes), got {window_s:g}"
            )

    def snapshot(
        self, model: str | None = None, window_s: float = DEFAULT_WINDOW_S
    ) -> SizeSnapshot:
        """Counts of the whole slots in the last ``window_s`` seconds, one model or all."""
        self.check_window(window_s)
        now = self._clock()
        k_now = self._slot(now)
        k_min = max(0, math.ceil((now - window_s - self._started) / self.slot_s - 1e-9))
        span = max(0.0, now - (self._started + k_min * self.slot_s))
        totals = [0] * (_CELLS + 1)
        rings = self._rings.values() if model is None else [self._rings.get(model) or []]
        for ring in rings:
            for entry in ring:
                if entry is not None and k_min <= entry[0] <= k_now:
                    for cell, n in enumerate(entry[1]):
                        if n:
                            totals[cell] += n
        width = len(EDGES)
        counts = tuple(tuple(totals[i * width : (i + 1) * width]) for i in range(width))
        return SizeSnapshot(
            model, window_s, span, sum(totals[:_CELLS]), counts, totals[_ARRIVALS], self.slot_s
        )

    def models(self) -> list[str]:
        return sorted(self._rings)


_PROMPT = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
_COMPLETION = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_CHOICE_EVENT = b'"finish_reason"'
_ROLE_EVENT = b'"role"'
_EVENTS = (_CHOICE_EVENT, _ROLE_EVENT)
_TAIL_BYTES = 2048  # the usage block is smaller than this and comes last


class ResponseTokens:
    """Token counts of one answer, read from its bytes as they pass (module docstring)."""

    __slots__ = ("_carries", "_counts", "_stream", "_tail")

    def __init__(self, *, stream: bool) -> None:
        self._stream = stream
        self._tail = b""
        # per pattern: the bytes before the next chunk that could start a split match
        # (one fewer than the pattern), and its matches so far
        self._carries = [b"", b""]
        self._counts = [0, 0]

    def feed(self, chunk: bytes) -> None:
        self._tail = (self._tail + chunk)[-_TAIL_BYTES:]
        if self._stream:  # a pattern split across chunks is counted once
            for index, pattern in enumerate(_EVENTS):
                window = self._carries[index] + chunk
                self._counts[index] += window.count(pattern)
                self._carries[index] = window[-(len(pattern) - 1) :]

    def _usage(self, pattern: re.Pattern[bytes]) -> int | None:
        found = pattern.findall(self._tail)
        return int(found[-1]) if found else None

    def prompt_tokens(self) -> int | None:
        """The engine's count (usage), None when it sent none."""
        return self._usage(_PROMPT)

    def completion_tokens(self) -> int:
        """The engine's count (usage); for a stream without usage, its token events."""
        exact = self._usage(_COMPLETION)
        if exact is not None:
            return exact
        choices, roles = self._counts
        return max(0, choices - roles) if self._stream else 0
