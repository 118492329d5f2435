"""The profiler: one GPU type's highest request rate within the SLO, per (output, input) cell.

Invariant: for every cell the sweep reports the largest offered rate ``r`` it *measured*
passing (0 when even the lowest rate tried failed), where a trial at ``r`` passes when
every SLO given holds at the chosen percentile over the requests that arrived in its
measurement window, and the requests completed in that window are at least
``min_throughput_ratio`` (0.9, as AIBrix's ``TPUT_TOLERANCE``) of those that arrived in it.
A rate above a measured failure is never reported.

One trial (times in the endpoint's seconds; a simulator's ``time_scale`` converts them)::

    0 ............ W ======== measured ======== W+D ..... (drain) ..... deadline
    |  warm-up      |  arrivals counted and timed  |  arrivals go on until every
    |  (steady state|  completions counted         |  measured request finished or
    |   builds)     |                              |  the deadline; the rest aborted

1. Arrivals are open-loop Poisson at ``r`` (seeded per cell and rate), each request a
   prompt of exactly ``in_tick`` token ids, ``max_tokens = out_tick``, ``ignore_eos``,
   streamed: TTFT = first token - scheduled arrival, TPOT = (last - first) / (out - 1),
   E2E = last - scheduled arrival (the client's own lateness counts against it, and is
   reported as ``client_lag_s``).
2. ``W`` is at least a request's lifetime: completions in the window only match arrivals
   once a request's lifetime has passed. The SLO's end-to-end budget (``ttft + (out - 1)
   tpot``, or ``e2e``) bounds it; with a TTFT or a TPOT SLO alone nothing does (a TPOT
   SLO leaves the queueing before the first token free), so the sweep measures it
   (below: "Lifetimes"). ``D`` is at least ``min_requests / r`` so a percentile rests
   on enough requests, and at most ``4 duration_s`` (so at 0.05/s a trial is 80 s,
   not 800: below ``min_requests / (4 duration_s)`` requests/s, 0.5/s by default, a
   percentile rests on fewer requests).
3. Arrivals continue after the window (not measured) so the last measured requests see
   the same load as the first; a measured request unfinished at the deadline, or one that
   errored or came back short of ``out_tick`` tokens, counts as missing every SLO (an
   infinite latency) within the percentile: at p99 one failure in 200 requests is
   tolerated as one slow request would be, at p50 one in 40. A trial also fails when its
   errors alone exceed ``100 - percentile`` % of its requests (whatever SLO is set), so a
   transient connection error does not cap a cell forever while failing requests do.

The search per cell (``RateSearch``, sans-IO: it proposes rates, the caller measures)::

    start -> pass: double until a failure (or max_rate)   lo = best pass, hi = first fail
          -> fail: halve until a pass (below min_rate: the cell is 0)
    then bisect geometrically (sqrt(lo hi)) until hi / lo <= 1 + precision
    start: the answer of the previous cell in the row (neighbours are close), else
           ``start_rate``; a trial whose every request the endpoint refused (HTTP 4xx,
           a prompt beyond max_model_len) ends the cell at 0 at once
    idle:  a latency SLO missed while the endpoint was nearly idle (rate x mean e2e <=
           0.25 requests in flight on average, by Little's law: most requests met no
           other in their lifetime) ends the halving: the cell is 0. A lower rate only
           makes requests meet each other less often; it cannot make a lone request
           faster, and halving on down to ``min_rate`` took ~30 minutes per such cell.
           The cost: a cell whose capacity is below 0.25 / lifetime requests/s reads 0
           (such a GPU type meets the SLO only by never overlapping two requests: not a
           rate to plan with).

Lifetimes (``run_sweep``'s ``probe``): with no E2E SLO and not both TTFT and TPOT SLOs a
request's lifetime is unbounded by the SLO, and a warm-up of the TTFT alone left long
outputs' completions lagging the window's arrivals (every rate failed the 90% rule: the
cell read 0). Before a cell's first trial one request is sent alone and timed; trials
then warm up (and drain) for twice its e2e (a request under load decodes in a batch:
slower than alone). A trial that still fails the 90% rule while its requests' mean e2e
exceeded its warm-up is measured once more with a warm-up of twice that mean (once per
cell) before the search is told: the first verdict judged the warm-up, not the endpoint.
The probe is one request: its e2e moves with the engine's state, hence the factor 2 and
the re-measure; a probe that fails leaves only the re-measure.

Latency grows steeply near saturation, so one trial per rate is a sharp test there. Each
trial is trusted: a fluke failure below the capacity caps the answer under it (a fluke
pass lifts it), which is why a trial is made long enough for its percentile
(``min_requests``) rather than repeated. The search only proposes rates between its best
pass and its first failure, so its own trials never contradict each other.

Chosen and rejected:
* AIBrix's profiler (``gpu_benchmark.py`` over a fixed grid of rates, ``gen_profile.py``
  keeping the smallest/largest passing grid rate): a grid wastes trials far from the
  capacity and resolves it only to the grid's step; the search finds it to 5% in ~10
  trials. Its output format is kept so profiles move both ways (``aibrix_profile`` says
  where our numbers differ from its).
* vLLM's ``benchmark_serving``: it sends a fixed number of requests and divides by the
  time to drain them all, which counts the ramp-up and the drain; with outputs of
  hundreds of tokens the drain alone keeps throughput under 90% of a rate the engine
  sustains. Counting completions inside a window after a warm-up measures the steady state.
* Closed-loop load (N concurrent clients): its rate adapts to the server, so it never
  shows the queueing an open arrival process meets; Mélange and AIBrix profile open-loop.

How it fails: a high percentile over one trial's requests rests on a few of them (the
99th of 200 is the second slowest), and near saturation a queue's busy periods make a
short window's latencies swing, so a TTFT-bound cell can come out +-30% on 20-second
windows (measured on the simulator's scheduler in virtual time); raise ``duration_s`` /
``min_requests`` for tighter answers. The load generator's own lateness (a CPU-starved
client) counts against the endpoint: ``client_lag_s`` in each trial says how late it was.

Resumable (``SweepState``): each finished cell is written to the state file atomically
(temporary file + ``os.replace``); a rerun with the same settings skips them, a state
from other settings is refused (``ProfileFormatError`` naming the settings that differ).
Cells are keyed by (out_tick, in_tick), so a rerun on a larger grid keeps what matches.

This module is pure apart from the state file: the load generator is injected
(``Measure``; ``loadgen.HttpLoad`` over HTTP, virtual-time fakes in the unit tests).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from control.placement.errors import ProfileFormatError
from control.placement.formats import profile_to_json
from control.placement.types import GpuProfile, Slos

__all__ = [
    "CellResult",
    "Measure",
    "Probe",
    "RateSearch",
    "RequestRecord",
    "SweepSpec",
    "SweepState",
    "TrialPlan",
    "TrialResult",
    "aibrix_profile",
    "evaluate_trial",
    "percentile",
    "run_sweep",
    "to_gpu_profile",
    "write_json",
]

_STATE_VERSION = 1
_MAX_WINDOW_FACTOR = 4  # a trial's window is at most this many duration_s
_IDLE_IN_FLIGHT = 0.25  # a failure at rate x mean e2e at or below it ends the halving
_LOAD_FACTOR = 2.0  # lifetime under load, over a lone request's (or a trial's mean)


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """What a sweep measures and how; all of it but the grid and the cost is in the state
    file's fingerprint (``fingerprint``; the URL is not part of it either)."""

    gpu: str
    cost: float
    model: str
    in_ticks: tuple[int, ...]
    out_ticks: tuple[int, ...]
    slos: Slos
    duration_s: float = 20.0  # measurement window (endpoint seconds), at least
    warmup_s: float = 5.0  # before the window, at least (see TrialPlan)
    min_requests: int = 40  # the window is stretched to expect this many arrivals
    precision: float = 0.05  # the search stops when hi / lo <= 1 + precision
    start_rate: float = 1.0  # requests/s of the first trial of each cell
    min_rate: float = 0.05  # below it a cell is 0
    max_rate: float = 1000.0  # the search never offers more (a cell at it is "capped")
    min_throughput_ratio: float = 0.9  # AIBrix's TPUT_TOLERANCE
    seed: int = 0
    time_scale: float = 1.0  # endpoint seconds per wall second (a simulator's --time-scale)

    def __post_init__(self) -> None:
        if self.slos.ttft_s is None and self.slos.tpot_s is None and self.slos.e2e_s is None:
            raise ProfileFormatError(
                "give at least one SLO: --ttft-slo-s, --tpot-slo-s, --e2e-slo-s"
            )
        for name in ("ttft_s", "tpot_s", "e2e_s"):
            value = getattr(self.slos, name)
            if value is not None and not value > 0:
                raise ProfileFormatError(f"the {name} SLO must be > 0, got {value}")
        if not 0 < self.slos.percentile <= 100:
            raise ProfileFormatError(f"percentile must be in (0, 100], got {self.slos.percentile}")
        positive = ("duration_s", "precision", "start_rate", "min_rate", "max_rate", "time_scale")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ProfileFormatError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_s < 0 or self.min_requests < 1:
            raise ProfileFormatError("warmup_s must be >= 0 and min_requests >= 1")
        if not self.min_rate <= self.start_rate <= self.max_rate:
            raise ProfileFormatError(
                f"need min_rate <= start_rate <= max_rate, got {self.min_rate}, "
                f"{self.start_rate}, {self.max_rate}"
            )
        if not 0 < self.min_throughput_ratio <= 1:
            raise ProfileFormatError("min_throughput_ratio must be in (0, 1]")
        # A GpuProfile checks the ticks and the name (strictly increasing, positive).
        to_gpu_profile(self, ())

    @property
    def cells(self) -> tuple[tuple[int, int], ...]:
        """(out_tick, in_tick) in the order they are measured: row by row."""
        return tuple((o, i) for o in self.out_ticks for i in self.in_ticks)

    def fingerprint(self) -> dict[str, Any]:
        """What makes two sweeps' cells comparable (the state file refuses others)."""
        keep = asdict(self)
        for name in ("cost", "in_ticks", "out_ticks"):
            del keep[name]
        loaded: dict[str, Any] = json.loads(json.dumps(keep))  # tuples -> lists, as in JSON
        return loaded


@dataclass(frozen=True, slots=True)
class TrialPlan:
    """The timeline of one trial at ``rate`` (endpoint seconds; see the module docstring)."""

    rate: float
    warmup_s: float
    duration_s: float
    deadline_s: float  # from the trial's start: measured requests still out are misses

    @classmethod
    def make(
        cls, spec: SweepSpec, out_tick: int, rate: float, lifetime_s: float = 0.0
    ) -> TrialPlan:
        """The plan at ``rate``; ``lifetime_s``: how long a request lives under load, when
        the SLO does not bound it (module docstring, "Lifetimes")."""
        budget = max(_e2e_budget(spec.slos, out_tick), lifetime_s)
        warmup = max(spec.warmup_s, budget)
        longest = _MAX_WINDOW_FACTOR * spec.duration_s
        duration = max(spec.duration_s, min(spec.min_requests / rate, longest))
        return cls(rate, warmup, duration, warmup + duration + 2 * budget)

    @property
    def window(self) -> tuple[float, float]:
        return (self.warmup_s, self.warmup_s + self.duration_s)


def _e2e_budget(slos: Slos, out_tick: int) -> float:
    """How long a request meeting every SLO lives at most: the E2E SLO, or TTFT + (out -
    1) TPOT, whichever is shorter. Without an E2E SLO and one of TTFT or TPOT the SLO does
    not bound it (``_lifetime_bounded``): what is known is returned, and ``run_sweep``
    measures the lifetime (``lifetime_s``)."""
    bounds = [] if slos.e2e_s is None else [slos.e2e_s]
    if slos.tpot_s is not None:
        bounds.append((slos.ttft_s or 0.0) + (out_tick - 1) * slos.tpot_s)
    return min(bounds) if bounds else (slos.ttft_s or 0.0)


def _lifetime_bounded(slos: Slos) -> bool:
    return slos.e2e_s is not None or (slos.ttft_s is not None and slos.tpot_s is not None)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request of a trial, in endpoint seconds from the trial's start.

    ``first_token_s``/``finish_s`` are None while unfinished; ``error`` says why a request
    failed (HTTP status, connection, short answer)."""

    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    num_output: int = 0
    error: str | None = None
    refused: bool = False  # the endpoint refused the request itself (HTTP 4xx, wrong
    # token counts): no rate would do better, so the cell ends at once

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_s is not None


@dataclass(frozen=True, slots=True)
class TrialResult:
    """What one trial at ``rate`` measured; ``reason`` says why it failed ("" = passed)."""

    rate: float
    passed: bool
    reason: str
    num_measured: int
    num_errors: int = 0
    ttft_s: float | None = None  # at the percentile (inf: misses beyond the percentile)
    tpot_s: float | None = None
    e2e_s: float | None = None
    mean_e2e_s: float | None = None  # over the measured requests that finished
    throughput_ratio: float = 0.0
    first_error: str = ""
    client_lag_s: float = 0.0  # how late the load generator sent its latest request
    num_refused: int = 0  # of num_errors, refused for what they asked (RequestRecord)
    mean_ttft_s: float | None = None  # over the measured requests that had a first token

    def to_json(self) -> dict[str, Any]:
        return {
            k: (None if isinstance(v, float) and math.isinf(v) else v)
            for k, v in asdict(self).items()
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialResult:
        return cls(**data)  # a miss (inf) was written as null: not measurable


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (the smallest value with at least p% of the
    values at or below it); ``inf`` values are misses. ``values`` must not be empty."""
    assert values, "percentile of nothing"
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def evaluate_trial(
    records: Sequence[RequestRecord],
    plan: TrialPlan,
    slos: Slos,
    out_tick: int,
    min_throughput_ratio: float = 0.9,
    client_lag_s: float = 0.0,
) -> TrialResult:
    """Pass or fail one trial from its requests (the module docstring's rules)."""
    start, end = plan.window
    measured = [r for r in records if start <= r.arrival_s < end]
    completed = sum(
        1 for r in records if r.ok and r.finish_s is not None and start <= r.finish_s < end
    )
    errors = [r for r in measured if r.error is not None]
    if not measured:
        return TrialResult(
            plan.rate, False, "no request arrived in the window", 0, client_lag_s=client_lag_s
        )
    ratio = completed / len(measured)
    inf = math.inf
    ttfts, tpots, e2es = [], [], []
    for r in measured:
        if not r.ok or r.first_token_s is None or r.finish_s is None:
            # errored: a miss of every SLO; unfinished: its first token may have come
            late = r.error is not None or r.first_token_s is None
            ttfts.append(inf if late or r.first_token_s is None else r.first_token_s - r.arrival_s)
            tpots.append(inf)
            e2es.append(inf)
            continue
        ttfts.append(r.first_token_s - r.arrival_s)
        decode = r.finish_s - r.first_token_s
        tpots.append(decode / (r.num_output - 1) if r.num_output > 1 else 0.0)
        e2es.append(r.finish_s - r.arrival_s)
    p = slos.percentile
    finite_e2e = [e for e in e2es if math.isfinite(e)]
    finite_ttft = [t for t in ttfts if math.isfinite(t)]
    latencies = {
        "ttft": percentile(ttfts, p),
        "tpot": percentile(tpots, p) if out_tick > 1 else 0.0,
        "e2e": percentile(e2es, p),
    }
    first_error = (errors[0].error or "") if errors else ""
    reasons = []
    for name, target in (("ttft", slos.ttft_s), ("tpot", slos.tpot_s), ("e2e", slos.e2e_s)):
        if target is not None and latencies[name] > target:
            reasons.append(f"p{p:g} {name} {_seconds(latencies[name])} > {target:g}s")
    if ratio < min_throughput_ratio:
        reasons.append(f"throughput {ratio:.0%} of offered < {min_throughput_ratio:.0%}")
    allowed = (100 - p) / 100 * len(measured)  # misses the percentile tolerates
    if len(errors) > allowed * (1 + 1e-9):
        reasons.append(f"{len(errors)} of {len(measured)} requests failed ({first_error})")
    return TrialResult(
        rate=plan.rate,
        passed=not reasons,
        reason="; ".join(reasons),
        num_measured=len(measured),
        num_errors=len(errors),
        ttft_s=latencies["ttft"],
        tpot_s=latencies["tpot"],
        e2e_s=latencies["e2e"],
        mean_e2e_s=sum(finite_e2e) / len(finite_e2e) if finite_e2e else None,
        throughput_ratio=ratio,
        first_error=first_error,
        client_lag_s=client_lag_s,
        num_refused=sum(1 for r in errors if r.refused),
        mean_ttft_s=sum(finite_ttft) / len(finite_ttft) if finite_ttft else None,
    )


def _seconds(value: float) -> str:
    return "unfinished" if math.isinf(value) else f"{value:.3g}s"


class RateSearch:
    """Exponential growth, then geometric bisection, over one cell's rates (sans-IO).

    ``next_rate()`` proposes the next rate to measure (None: done), ``record(rate,
    passed)`` tells what it did; ``rate`` is then the answer: the highest passing rate
    measured, 0 when none passed down to ``min_rate`` (or to an idle failure). Fails
    when the endpoint's pass/fail is not monotone in the rate: it trusts each trial, so
    a fluke failure below the capacity caps the answer under it, and a fluke pass above
    lifts it."""

    def __init__(
        self,
        start: float,
        *,
        min_rate: float,
        max_rate: float,
        precision: float = 0.05,
        growth: float = 2.0,
    ) -> None:
        assert 0 < min_rate <= start <= max_rate, "SweepSpec checks the rates"
        assert precision > 0 and growth > 1, "a search that ends"
        self._start = start
        self._min = min_rate
        self._max = max_rate
        self._precision = precision
        self._growth = growth
        self.lo: float | None = None  # highest pass
        self.hi: float | None = None  # lowest fail
        self.num_trials = 0
        self.floor = False  # a failure while idle: no lower rate will pass

    def next_rate(self) -> float | None:
        lo, hi = self.lo, self.hi
        if lo is None and hi is None:
            return self._start
        if hi is None:
            assert lo is not None
            return None if lo >= self._max else min(lo * self._growth, self._max)
        if lo is None:
            if self.floor or hi <= self._min:
                return None
            return max(hi / self._growth, self._min)
        if hi / lo <= 1 + self._precision * (1 + 1e-9):  # closed (rounding aside)
            return None
        return math.sqrt(lo * hi)

    def record(self, rate: float, passed: bool, *, idle: bool = False) -> None:
        """``idle``: the trial failed while the endpoint was nearly idle (module
        docstring): with no pass yet, the search ends at 0."""
        self.num_trials += 1
        if not passed and idle and self.lo is None:
            self.floor = True
        if passed:
            self.lo = rate if self.lo is None else max(self.lo, rate)
        else:
            self.hi = rate if self.hi is None else min(self.hi, rate)
        if self.lo is not None and self.hi is not None and self.hi <= self.lo:
            # not monotone (a fail at or below a pass, from a caller's own rates): keep
            # the pass and close the bracket just above it
            self.hi = self.lo * (1 + self._precision)

    @property
    def rate(self) -> float:
        return self.lo or 0.0

    @property
    def capped(self) -> bool:
        return self.lo is not None and self.lo >= self._max


@dataclass(frozen=True, slots=True)
class CellResult:
    """One cell's answer and the trials behind it."""

    out_tick: int
    in_tick: int
    rate: float  # requests/s within the SLO; 0 = cannot serve
    trials: tuple[TrialResult, ...] = ()
    capped: bool = False  # the rate is max_rate: the endpoint may do more

    @property
    def note(self) -> str:
        """Why the cell is what it is, for the summary."""
        if self.capped:
            return "capped at --max-rate"
        failed = [t for t in self.trials if not t.passed]
        if failed and failed[-1].num_refused == failed[-1].num_measured > 0:
            return "the endpoint refused these requests: " + failed[-1].first_error
        if self.rate == 0 and failed:
            return "no rate met the SLO: " + failed[-1].reason
        errors = sum(t.num_errors for t in self.trials)
        return f"{errors} failed requests over its trials" if errors else ""

    def at_rate(self) -> TrialResult | None:
        """The passing trial at ``rate``."""
        return next((t for t in self.trials if t.passed and t.rate == self.rate), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "out_tick": self.out_tick,
            "in_tick": self.in_tick,
            "rate": self.rate,
            "capped": self.capped,
            "trials": [t.to_json() for t in self.trials],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellResult:
        trials = tuple(TrialResult.from_json(t) for t in data.get("trials", ()))
        return cls(
            int(data["out_tick"]),
            int(data["in_tick"]),
            float(data["rate"]),
            trials,
            bool(data.get("capped")),
        )


class SweepState:
    """The finished cells of a sweep, kept in a JSON file that survives interruption.

    ``{"version": 1, "settings": SweepSpec.fingerprint(), "cells": [CellResult...]}``,
    rewritten whole (temporary file in the same directory, then ``os.replace``) after each
    cell, so a crash or Ctrl-C leaves either the old or the new file, never half of one."""

    def __init__(self, spec: SweepSpec, path: str | Path | None = None) -> None:
        self.spec = spec
        self.path = Path(path) if path is not None else None
        self.cells: dict[tuple[int, int], CellResult] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise ProfileFormatError(f"cannot read state {path}: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise ProfileFormatError(
                f"state {path} is not JSON ({exc}); delete it to start over"
            ) from None
        if not isinstance(data, dict) or data.get("version") != _STATE_VERSION:
            raise ProfileFormatError(
                f"state {path} is not a version-{_STATE_VERSION} profiler state"
            )
        theirs, ours = data.get("settings") or {}, self.spec.fingerprint()
        if theirs != ours:
            differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
            detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" for k in differ)
            raise ProfileFormatError(
                f"state {path} was written by a sweep with other settings ({detail}); "
                "rerun with those settings, or use another --state to start over"
            )
        try:
            for raw in data.get("cells", ()):
                cell = CellResult.from_json(raw)
                self.cells[(cell.out_tick, cell.in_tick)] = cell
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileFormatError(f"state {path} has a malformed cell: {exc}") from None

    def done(self, out_tick: int, in_tick: int) -> CellResult | None:
        return self.cells.get((out_tick, in_tick))

    def add(self, cell: CellResult) -> None:
        self.cells[(cell.out_tick, cell.in_tick)] = cell
        if self.path is not None:
            self._save(self.path)

    def _save(self, path: Path) -> None:
        data = {
            "version": _STATE_VERSION,
            "settings": self.spec.fingerprint(),
            "cells": [c.to_json() for c in self.cells.values()],
        }
        write_json(path, data)


def write_json(path: Path, data: Any) -> None:
    """``data`` as JSON in ``path``, atomically (a reader sees the old or the new file)."""
    text = json.dumps(data, indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


Measure = Callable[[int, int, "TrialPlan"], Awaitable["TrialResult"]]
"""Runs one trial of cell (out_tick, in_tick) by its plan (``loadgen.HttpLoad.trial``)."""

Probe = Callable[[int, int], Awaitable["float | None"]]
"""One request of cell (out_tick, in_tick) sent alone: its e2e in endpoint seconds, None
when it failed (``loadgen.HttpLoad.probe``)."""


async def run_sweep(
    spec: SweepSpec,
    measure: Measure,
    state: SweepState,
    on_trial: Callable[[int, int, TrialResult], None] | None = None,
    on_cell: Callable[[CellResult, bool], None] | None = None,
    probe: Probe | None = None,
) -> tuple[CellResult, ...]:
    """Every cell of ``spec``, measured unless ``state`` has it (``on_cell(cell, resumed)``
    after each); each finished cell is saved before the next starts. ``probe`` times a
    lone request before each cell when the SLO bounds no lifetime (module docstring)."""
    unbounded = not _lifetime_bounded(spec.slos)
    cells: list[CellResult] = []
    for out_tick, in_tick in spec.cells:
        done = state.done(out_tick, in_tick)
        if done is not None:
            cells.append(done)
            if on_cell is not None:
                on_cell(done, True)
            continue
        search = RateSearch(
            _start_rate(spec, cells, out_tick),
            min_rate=spec.min_rate,
            max_rate=spec.max_rate,
            precision=spec.precision,
        )
        trials: list[TrialResult] = []
        lifetime = 0.0
        if unbounded and probe is not None:
            alone = await probe(out_tick, in_tick)
            lifetime = _LOAD_FACTOR * alone if alone is not None else 0.0
        remeasured = not unbounded
        rate = search.next_rate()
        while rate is not None:
            plan = TrialPlan.make(spec, out_tick, rate, lifetime)
            trial = await measure(out_tick, in_tick, plan)
            trials.append(trial)
            if on_trial is not None:
                on_trial(out_tick, in_tick, trial)
            if not remeasured and _warmup_too_short(trial, plan, spec):
                assert trial.mean_e2e_s is not None  # _warmup_too_short checked it
                lifetime = _LOAD_FACTOR * trial.mean_e2e_s
                remeasured = True
                continue  # the same rate again, warmed up for the requests' lifetime
            search.record(rate, trial.passed, idle=_failed_idle(trial, spec.slos))
            if trial.num_measured and trial.num_refused == trial.num_measured:
                break  # every request refused for what it asks: no rate will do
            rate = search.next_rate()
        cell = CellResult(out_tick, in_tick, search.rate, tuple(trials), search.capped)
        state.add(cell)
        cells.append(cell)
        if on_cell is not None:
            on_cell(cell, False)
    return tuple(cells)


def _warmup_too_short(trial: TrialResult, plan: TrialPlan, spec: SweepSpec) -> bool:
    """The trial failed the completion rule while its requests outlived its warm-up: its
    window's completions lagged its arrivals for want of warm-up, whatever the load."""
    return (
        not trial.passed
        and trial.throughput_ratio < spec.min_throughput_ratio
        and trial.mean_e2e_s is not None
        and trial.mean_e2e_s > plan.warmup_s
    )


def _failed_idle(trial: TrialResult, slos: Slos) -> bool:
    """The trial missed a latency SLO at its percentile while the endpoint was nearly idle
    (rate x mean e2e <= ``_IDLE_IN_FLIGHT``). A failure of the completion rule alone does
    not count: at low rates a window holds few requests, and its count is noise."""
    if trial.passed or trial.mean_e2e_s is None:
        return False
    if trial.rate * trial.mean_e2e_s > _IDLE_IN_FLIGHT:
        return False
    measured = (
        (slos.ttft_s, trial.ttft_s),
        (slos.tpot_s, trial.tpot_s),
        (slos.e2e_s, trial.e2e_s),
    )
    return any(t is not None and v is not None and v > t for t, v in measured)


def _start_rate(spec: SweepSpec, cells: Sequence[CellResult], out_tick: int) -> float:
    """The first rate for the next cell: the answer of the cell before it in the same row
    (a neighbour's capacity is the best guess: two or three trials instead of a climb
    from ``start_rate``), else ``start_rate``."""
    before = cells[-1] if cells else None
    if before is None or before.out_tick != out_tick or before.rate <= 0:
        return spec.start_rate
    return min(max(before.rate, spec.min_rate), spec.max_rate)


def to_gpu_profile(
    spec: SweepSpec, cells: Sequence[CellResult], created: float | None = None
) -> GpuProfile:
    """The sweep's answer as a ``GpuProfile`` (cells not given are 0)."""
    rates = {(c.out_tick, c.in_tick): c.rate for c in cells}
    return GpuProfile(
        gpu=spec.gpu,
        cost=spec.cost,
        tputs=tuple(tuple(rates.get((o, i), 0.0) for i in spec.in_ticks) for o in spec.out_ticks),
        out_ticks=spec.out_ticks,
        in_ticks=spec.in_ticks,
        slos=spec.slos,
        created=created,
        model=spec.model,
    )


def aibrix_profile(profile: GpuProfile, cells: Sequence[CellResult] = ()) -> dict[str, Any]:
    """AIBrix's GPU-optimizer profile JSON (``formats.profile_to_json``: ``gpu``, ``cost``,
    ``tputs[out][in]``, ``indexes [out_ticks, in_ticks]``, ``slos``, ``created``; no
    ``model``, which AIBrix's schema has no place for) plus what AIBrix's
    ``gen_profile.py`` also writes: the mean ``e2e`` (and the mean ``ttft``, when a TTFT
    SLO is set) at each cell's rate, 0 where the cell has none. ``formats.load_profile``
    reads it back as ``profile`` (less its ``model``).

    How it differs from ``gen_profile.py``'s (same keys, same meaning where it matters):

    * ``tputs`` is the highest *offered* rate that passed (its completions in the window
      were at least 90% of its arrivals); gen_profile writes the *measured* mean throughput
      at its highest passing grid rate, which its 90% rule keeps within 10% under it. The
      solver plans with the rate a replica is offered, so the offered rate is kept.
    * ``e2e`` and ``ttft`` are means over the measured requests of the passing trial at
      that rate, as gen_profile's (and AIBrix's SLO queue, which takes them as expected
      latencies); the SLO itself was checked at ``slos.percentile``.
    * ``slos.percentile`` is ours (any value in (0, 100]); gen_profile offers 0 (the
      mean), 50, 90, 99. It is written as an integer when it is one."""
    at = {(c.out_tick, c.in_tick): c.at_rate() for c in cells}

    def matrix(attr: str) -> list[list[float]]:
        rows = []
        for o in profile.out_ticks:
            row = []
            for i in profile.in_ticks:
                trial = at.get((o, i))
                value = getattr(trial, attr) if trial is not None else None
                row.append(float(value) if value is not None and math.isfinite(value) else 0.0)
            rows.append(row)
        return rows

    data = profile_to_json(profile)
    data["e2e"] = matrix("mean_e2e_s")
    if profile.slos.ttft_s is not None:
        data["ttft"] = matrix("mean_ttft_s")
    return data
