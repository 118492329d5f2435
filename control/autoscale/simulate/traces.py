"""Request traces for the simulator: what arrives when, and how many tokens it carries.

A trace is a tuple of ``TraceRequest`` sorted by ``arrival_s`` (seconds from the trace's
start), loaded from one of::

    azure2023_*.csv       Azure LLM inference trace 2023: TIMESTAMP, ContextTokens,
                          GeneratedTokens (a header row; timestamps to 100 ns)
    *.jsonl               Mooncake: {"timestamp": ms, "input_length", "output_length", ...}
    synthetic:NAME[:k=v,...]   step, ramp, spike, diurnal: seeded Poisson arrivals

Invariant: a loaded ``Trace`` is non-empty, sorted, every request has >= 1 prompt and >= 1
output token, and ``load_step_s`` (when set) lies inside the trace. A file that breaks it
raises ``TraceError`` naming the file and the line (1-based, as an editor shows it).

Two ways to make a trace need several replicas, the token mix unchanged: ``rate_scale``
compresses time (arrival times divided by it: x4 makes an Azure hour a quarter hour at
four times the rate, and its bursts four times shorter against a pod's start time);
``copies`` keeps the clock and replays each request that many times (a fraction: that
share of requests once more), every copy but the first shifted by up to +-5 s, so the
trace's minute-scale shape, which is what autoscalers react to, is kept.
``start_s``/``duration_s`` cut a window (in trace seconds, before scaling) and re-base it
to 0.

Synthetic traces (parameters after the name, ``synthetic:step:base=2,peak=16``): arrivals
are a Poisson process of the named rate shape, tokens drawn uniformly around
``prompt``/``output`` (+-50%), from ``random.Random(seed)``; the same string always gives
the same trace. ``step`` and ``spike`` declare their load step (``load_step_s``), the
figures' time zero; real traces leave it ``None`` and the run finds the first rise.

Rejected: reading the Mooncake ``hash_ids`` (prefix reuse changes prefill work, but the
capacity model prices every prompt in full; the trace README's 36.6% hit rate is an upper
bound that an autoscaled fleet of cold replicas does not reach); pandas (19k lines parse in
well under a second with ``csv``).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from control.autoscale.errors import TraceError

__all__ = ["COPY_JITTER_S", "SYNTHETIC", "Trace", "TraceRequest", "load_trace"]

COPY_JITTER_S = 5.0


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    requests: tuple[TraceRequest, ...]
    duration_s: float
    load_step_s: float | None = None  # declared load step (synthetic); None: find it

    @property
    def mean_rate(self) -> float:
        return len(self.requests) / self.duration_s if self.duration_s > 0 else 0.0


def load_trace(
    source: str,
    *,
    rate_scale: float = 1.0,
    copies: float = 1.0,
    start_s: float = 0.0,
    duration_s: float | None = None,
    seed: int = 0,
) -> Trace:
    """The trace named by ``source`` (a path or ``synthetic:NAME[:k=v,...]``)."""
    if not rate_scale > 0 or not math.isfinite(rate_scale):
        raise TraceError(f"rate scale must be a positive number, got {rate_scale}")
    if not copies > 0 or not math.isfinite(copies):
        raise TraceError(f"copies must be a positive number, got {copies}")
    if start_s < 0 or (duration_s is not None and not duration_s > 0):
        raise TraceError("start time must be >= 0 and duration > 0")
    trace = _synthetic(source) if source.startswith("synthetic:") else _load_file(Path(source))
    trace = _window(trace, rate_scale, start_s, duration_s)
    return trace if copies == 1 else _copied(trace, copies, seed)


def _copied(trace: Trace, copies: float, seed: int) -> Trace:
    """Each request ``copies`` times (the fraction: that much of the time), each copy
    shifted by up to +-``COPY_JITTER_S``: the rate times ``copies`` on the same clock."""
    rng = random.Random(seed)
    whole, fraction = int(copies), copies - int(copies)
    out = []
    for r in trace.requests:
        count = whole + (1 if rng.random() < fraction else 0)
        for k in range(count):
            shift = 0.0 if k == 0 else rng.uniform(-COPY_JITTER_S, COPY_JITTER_S)
            arrival = min(max(0.0, r.arrival_s + shift), trace.duration_s)
            out.append(TraceRequest(arrival, r.prompt_tokens, r.output_tokens))
    if not out:
        raise TraceError(f"{trace.name}: {copies} copies leave no request")
    out.sort(key=lambda r: r.arrival_s)
    return Trace(trace.name, tuple(out), trace.duration_s, trace.load_step_s)


def _window(trace: Trace, rate_scale: float, start_s: float, duration_s: float | None) -> Trace:
    end_s = trace.duration_s if duration_s is None else min(trace.duration_s, start_s + duration_s)
    if start_s >= end_s:
        raise TraceError(f"{trace.name}: start {start_s} s is past the trace's end ({end_s:.0f} s)")
    kept = tuple(
        TraceRequest((r.arrival_s - start_s) / rate_scale, r.prompt_tokens, r.output_tokens)
        for r in trace.requests
        if start_s <= r.arrival_s < end_s
    )
    if not kept:
        raise TraceError(f"{trace.name}: no requests between {start_s} s and {end_s} s")
    step = trace.load_step_s
    if step is not None:
        step = (step - start_s) / rate_scale if start_s <= step < end_s else None
    return Trace(trace.name, kept, (end_s - start_s) / rate_scale, step)


# -- files ------------------------------------------------------------------------


def _load_file(path: Path) -> Trace:
    try:
        with path.open(newline="") as handle:
            lines = list(handle)
    except OSError as exc:
        raise TraceError(f"cannot read trace {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TraceError(f"trace {path} is not text (UTF-8)") from None
    if path.suffix == ".jsonl":
        requests = list(_mooncake(path, lines))
    elif path.suffix == ".csv":
        requests = list(_azure(path, lines))
    else:
        raise TraceError(
            f"trace {path}: unknown format; use an Azure 2023 .csv, a Mooncake .jsonl or "
            "synthetic:NAME"
        )
    if not requests:
        raise TraceError(f"trace {path} holds no requests")
    requests.sort(key=lambda r: r.arrival_s)
    first = requests[0].arrival_s
    rebased = tuple(
        TraceRequest(r.arrival_s - first, r.prompt_tokens, r.output_tokens) for r in requests
    )
    # The last arrival plus one mean gap, so a rate over the whole trace is not inflated.
    duration = rebased[-1].arrival_s * (1 + 1 / max(1, len(rebased) - 1)) or 1.0
    return Trace(path.stem, rebased, duration)


def _tokens(path: Path, number: int, what: str, raw: object) -> int:
    try:
        value = int(str(raw))
    except (TypeError, ValueError):
        raise TraceError(f"{path}:{number}: {what} must be an integer, got {raw!r}") from None
    if value < 0:
        raise TraceError(f"{path}:{number}: {what} must be >= 0, got {value}")
    return max(1, value)  # a 0-token output still returns one token (its EOS)


def _azure(path: Path, lines: list[str]) -> Iterator[TraceRequest]:
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:3]] != [
        "TIMESTAMP",
        "ContextTokens",
        "GeneratedTokens",
    ]:
        raise TraceError(
            f"{path}:1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens "
            f"(Azure 2023 trace), got {header!r}"
        )
    for number, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < 3:
            raise TraceError(f"{path}:{number}: expected 3 columns, got {len(row)}")
        stamp = row[0].strip()
        try:
            # Azure writes 7 fractional digits; datetime takes at most 6.
            head, _, frac = stamp.partition(".")
            when = datetime.fromisoformat(f"{head}.{frac[:6]}" if frac else head)
        except ValueError:
            raise TraceError(f"{path}:{number}: bad TIMESTAMP {stamp!r}") from None
        yield TraceRequest(
            when.timestamp(),
            _tokens(path, number, "ContextTokens", row[1]),
            _tokens(path, number, "GeneratedTokens", row[2]),
        )


def _mooncake(path: Path, lines: list[str]) -> Iterator[TraceRequest]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceError(f"{path}:{number}: not JSON: {exc.msg}") from None
        if not isinstance(record, dict):
            raise TraceError(f"{path}:{number}: expected a JSON object")
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in record]
        if missing:
            raise TraceError(f"{path}:{number}: missing {', '.join(missing)}")
        stamp = record["timestamp"]
        if not isinstance(stamp, int | float) or isinstance(stamp, bool) or stamp < 0:
            raise TraceError(f"{path}:{number}: timestamp must be milliseconds >= 0")
        yield TraceRequest(
            stamp / 1000.0,
            _tokens(path, number, "input_length", record["input_length"]),
            _tokens(path, number, "output_length", record["output_length"]),
        )


# -- synthetic --------------------------------------------------------------------

RateShape = Callable[[float, dict[str, float]], float]


def _step(t: float, p: dict[str, float]) -> float:
    at, end = p["at"], p["at"] + p["hold"]
    return p["peak"] if at <= t < end else p["base"]


def _ramp(t: float, p: dict[str, float]) -> float:
    at, up, hold = p["at"], p["up"], p["hold"]
    if t < at:
        return p["base"]
    if t < at + up:
        return p["base"] + (p["peak"] - p["base"]) * (t - at) / up
    if t < at + up + hold:
        return p["peak"]
    if t < at + 2 * up + hold:
        return p["peak"] - (p["peak"] - p["base"]) * (t - at - up - hold) / up
    return p["base"]


def _spike(t: float, p: dict[str, float]) -> float:
    if t < p["at"]:
        return p["base"]
    return p["peak"] if (t - p["at"]) % p["every"] < p["hold"] else p["base"]


def _diurnal(t: float, p: dict[str, float]) -> float:
    phase = 2 * math.pi * t / p["period"]
    return p["base"] + (p["peak"] - p["base"]) * (1 - math.cos(phase)) / 2


_COMMON = {"prompt": 1000.0, "output": 200.0, "seed": 0.0}
SYNTHETIC: dict[str, tuple[RateShape, dict[str, float], bool]] = {
    # name: (rate shape, defaults, whether the shape declares its load step at ``at``)
    "step": (_step, {"base": 2, "peak": 20, "at": 300, "hold": 900, "duration": 1800}, True),
    "ramp": (
        _ramp,
        {"base": 2, "peak": 20, "at": 300, "up": 300, "hold": 600, "duration": 1800},
        True,
    ),
    "spike": (
        _spike,
        {"base": 4, "peak": 24, "at": 300, "every": 300, "hold": 45, "duration": 1800},
        True,
    ),
    "diurnal": (_diurnal, {"base": 2, "peak": 16, "period": 1800, "duration": 1800}, False),
}


def _synthetic(source: str) -> Trace:
    _, _, rest = source.partition(":")
    name, _, args = rest.partition(":")
    if name not in SYNTHETIC:
        raise TraceError(f"unknown synthetic trace {name!r}; known: {', '.join(sorted(SYNTHETIC))}")
    shape, defaults, declares_step = SYNTHETIC[name]
    params = {**_COMMON, **{k: float(v) for k, v in defaults.items()}}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in params:
            raise TraceError(
                f"synthetic:{name}: bad parameter {item!r}; known: {', '.join(sorted(params))}"
            )
        try:
            params[key] = float(value)
        except ValueError:
            raise TraceError(f"synthetic:{name}: {key} must be a number, got {value!r}") from None
    if params["duration"] <= 0 or params["prompt"] < 1 or params["output"] < 1:
        raise TraceError(f"synthetic:{name}: duration, prompt and output must be positive")
    if min(params["base"], params["peak"]) < 0:
        raise TraceError(f"synthetic:{name}: rates must be >= 0")
    rng = random.Random(int(params["seed"]))
    peak = max(params["base"], params["peak"])
    requests = []
    t = 0.0
    # Thinning (Lewis-Shedler): candidates at the peak rate, kept with rate(t)/peak.
    while peak > 0:
        t += rng.expovariate(peak)
        if t >= params["duration"]:
            break
        if rng.random() * peak < shape(t, params):
            requests.append(
                TraceRequest(
                    t,
                    max(1, round(params["prompt"] * rng.uniform(0.5, 1.5))),
                    max(1, round(params["output"] * rng.uniform(0.5, 1.5))),
                )
            )
    if not requests:
        raise TraceError(f"synthetic:{name}: the parameters give no requests")
    step = params.get("at") if declares_step else None
    return Trace(source, tuple(requests), params["duration"], step)
