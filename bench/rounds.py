"""Rounds, spreads and paired ratios: how the data-path benches report a figure honestly.

The benches run on a small shared machine whose background load drifts over seconds. One
measurement of Shoal next to one measurement of its limit can be off by tens of percent
in either direction, and a best-of-N figure reports the luckiest round. So every data-path
bench (``bench/kvcache.py``, ``bench/connector.py``, the peer fetch of ``bench/cluster.py``)
measures in *rounds* and interleaves the contenders inside each round::

    round 1: limit, Shoal, (anchors)    round 2: limit, Shoal, (anchors)    ...

and reports, for every figure, the median of its rounds with the smallest and largest
(``Spread``), and for every ratio the *per-round* ratio (Shoal in round i / limit in round
i) summarised the same way. A drift that slows round i slows both sides of its ratio, so
the ratio's spread is much narrower than either figure's, and a target ("put >= 0.85 of
memcpy") is met when the *median* ratio meets it, not one lucky round.

Rejected: the ratio of two medians (taken from different rounds, it does not cancel the
drift) and the mean (one descheduled round on 2 vCPUs moves it far).

JSON shape of a spread (``Spread.to_json``): ``{"median": x, "min": x, "max": x,
"rounds": [x, ...]}``; the rounds are kept so a reader can recompute anything.

How busy the machine was: ``ForeignCpu`` measures the share of all CPUs that processes
other than the bench's own (itself, its daemons, clients and anchors) used while it ran.
On a loaded machine ratios are biased, not only noisy: Shoal's clients sleep on every
round trip and the scheduler favours sleepers over the limit's pure copy loops, so a
ratio measured while foreign processes took a large share flatters Shoal. The benches
print the share next to their figures; a run worth recording shows a few percent.

This module imports nothing but the standard library so that every bench, and the
anchors' own interpreters, can load it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ForeignCpu", "Spread", "fmt_spread", "paired_ratios"]


@dataclass(frozen=True, slots=True)
class Spread:
    """The median, smallest and largest of one figure over its rounds."""

    median: float
    min: float
    max: float
    rounds: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float], digits: int = 3) -> Spread:
        if not values:
            raise ValueError("a spread needs at least one round")
        return cls(
            median=round(statistics.median(values), digits),
            min=round(min(values), digits),
            max=round(max(values), digits),
            rounds=tuple(round(v, digits) for v in values),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "rounds": list(self.rounds),
        }


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``numerators[i] / denominators[i]`` (both measured in round i)."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} rounds against {len(denominators)}: not paired")
    return [n / d for n, d in zip(numerators, denominators, strict=True) if d > 0]


def fmt_spread(spread: dict[str, Any] | Spread | None, percent: bool = False) -> str:
    """``12.3 [11.0-12.9]`` (or ``66% [60-70%]``); ``n/a`` when there is no figure."""
    if spread is None:
        return "n/a"
    data = spread.to_json() if isinstance(spread, Spread) else spread
    if "median" not in data:
        return "n/a"
    if percent:
        return f"{data['median']:.0%} [{data['min'] * 100:.0f}-{data['max']:.0%}]"
    return f"{data['median']:.2f} [{data['min']:.2f}-{data['max']:.2f}]"


def _machine_busy_s() -> float | None:
    """CPU-seconds all CPUs spent busy since boot (steal included: another VM's time)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _process_cpu_s(pid: int) -> float:
    """CPU-seconds (user + system, all threads) of a live process; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """Share (0..1) of all CPUs used by other processes between ``start`` and ``stop``.

    ``own_pids`` is asked at both ends for the bench's processes (this one is always
    counted as its own). Without /proc (not Linux) the share reads 0.
    """

    def __init__(self, own_pids: Callable[[], Iterable[int]] = tuple) -> None:
        self._own_pids = own_pids
        self._start: tuple[float, float | None, dict[int, float]] | None = None

    def _sample(self) -> tuple[float, float | None, dict[int, float]]:
        pids = {os.getpid(), *self._own_pids()}
        return time.monotonic(), _machine_busy_s(), {p: _process_cpu_s(p) for p in pids}

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> float:
        assert self._start is not None, "ForeignCpu.stop() before start()"
        t0, busy0, own0 = self._start
        t1, busy1, own1 = self._sample()
        if busy0 is None or busy1 is None or t1 <= t0:
            return 0.0
        own = sum(own1.get(p, 0.0) - own0.get(p, 0.0) for p in own1 if p in own0)
        other = (busy1 - busy0) - own
        return round(max(0.0, other / ((t1 - t0) * (os.cpu_count() or 1))), 3)
