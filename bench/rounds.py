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

This module imports nothing but the standard library so that every bench, and the
anchors' own interpreters, can load it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Spread", "fmt_spread", "paired_ratios"]


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
