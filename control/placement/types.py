"""Values of placement: what a GPU type can do, what the fleet is asked, what to run.

Matrices are indexed ``[out][in]`` as AIBrix's profiles are: row ``i`` is output length
``out_ticks[i]``, column ``j`` input length ``in_ticks[j]``. A request belongs to the cell
of the smallest tick at or above its length (a profile measured at a tick covers shorter
requests; lengths above the last tick count in the last cell), see ``formats.rebin``.

Invariants (checked in ``__post_init__``): matrices are rectangular and match their
ticks; ticks are strictly increasing positive integers; throughputs, shares, rate and
costs are finite and >= 0; ``tputs[i][j] == 0`` means the GPU type cannot serve that cell
within the SLO at any rate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from control.placement.errors import ProfileFormatError

__all__ = ["MAX_SLICE_FACTOR", "GpuProfile", "Limits", "Matrix", "Plan", "Slos", "Workload"]

MAX_SLICE_FACTOR = 64
"""Slices per cell at most: the greedy walks every slice in Python before the
time-limited solve, so an unbounded factor hangs a round (Mélange uses 1-8)."""

Matrix = tuple[tuple[float, ...], ...]
"""``[out][in]`` on the ticks."""


def _check_ticks(name: str, ticks: tuple[int, ...]) -> None:
    if not ticks or any(t <= 0 for t in ticks) or any(b <= a for a, b in itertools.pairwise(ticks)):
        raise ProfileFormatError(f"{name} must be strictly increasing positive integers: {ticks}")


def _check_matrix(
    name: str, m: Matrix, out_ticks: tuple[int, ...], in_ticks: tuple[int, ...]
) -> None:
    if len(m) != len(out_ticks) or any(len(row) != len(in_ticks) for row in m):
        raise ProfileFormatError(
            f"{name} must be {len(out_ticks)} rows (output ticks) of {len(in_ticks)} (input ticks)"
        )
    if any(not math.isfinite(v) or v < 0 for row in m for v in row):
        raise ProfileFormatError(f"{name} has a negative or non-finite value")


@dataclass(frozen=True, slots=True)
class Slos:
    """The targets a profile was measured against (``None``: not checked)."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    percentile: float = 99.0  # of each latency, 0 < p <= 100; 0 = the mean (AIBrix's 0)


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """One GPU type's highest request rate meeting the SLO per (output, input) cell."""

    gpu: str
    cost: float  # per replica and hour (the unit is the operator's: $, credits)
    tputs: Matrix  # requests/s one replica sustains within the SLO; 0 = cannot serve
    out_ticks: tuple[int, ...]
    in_ticks: tuple[int, ...]
    slos: Slos = field(default_factory=Slos)
    created: float | None = None  # unix time the profile was measured
    model: str = ""  # the served model it was measured with ("" = not recorded)

    def __post_init__(self) -> None:
        if not self.gpu:
            raise ProfileFormatError("a profile needs a 'gpu' name")
        if not math.isfinite(self.cost) or self.cost < 0:
            raise ProfileFormatError(f"profile {self.gpu}: cost must be finite and >= 0")
        _check_ticks(f"profile {self.gpu}: output ticks", self.out_ticks)
        _check_ticks(f"profile {self.gpu}: input ticks", self.in_ticks)
        _check_matrix(f"profile {self.gpu}: tputs", self.tputs, self.out_ticks, self.in_ticks)


@dataclass(frozen=True, slots=True)
class Workload:
    """The request mix to serve: a total rate and the share of each (output, input) cell."""

    rate: float  # requests/s, all cells together
    histogram: Matrix  # shares (normalised by the solver if they do not sum to 1)
    out_ticks: tuple[int, ...]
    in_ticks: tuple[int, ...]
    slice_factor: int = 4  # each cell's rate is split into this many assignable slices

    def __post_init__(self) -> None:
        if not math.isfinite(self.rate) or self.rate < 0:
            raise ProfileFormatError(f"workload rate must be finite and >= 0, got {self.rate}")
        if not 1 <= self.slice_factor <= MAX_SLICE_FACTOR:
            raise ProfileFormatError(
                f"slice_factor must be between 1 and {MAX_SLICE_FACTOR}, got {self.slice_factor}"
            )
        _check_ticks("workload output ticks", self.out_ticks)
        _check_ticks("workload input ticks", self.in_ticks)
        _check_matrix("workload histogram", self.histogram, self.out_ticks, self.in_ticks)


@dataclass(frozen=True, slots=True)
class Limits:
    """What the cloud and the operator allow: per GPU type at most ``available``
    replicas (absent = unlimited) and at least ``min_replicas`` (absent = 0)."""

    available: Mapping[str, int] = field(default_factory=dict)
    min_replicas: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, table in (("available", self.available), ("min_replicas", self.min_replicas)):
            for gpu, n in table.items():
                if n < 0:
                    raise ProfileFormatError(f"{name}[{gpu}] must be >= 0, got {n}")
        for gpu, low in self.min_replicas.items():
            high = self.available.get(gpu)
            if high is not None and low > high:
                raise ProfileFormatError(
                    f"min_replicas[{gpu}]={low} exceeds available[{gpu}]={high}"
                )


@dataclass(frozen=True, slots=True)
class Plan:
    """What to run: replicas per GPU type, and which share of each cell goes where.

    ``status``: ``"optimal"`` (the solver proved it), ``"time_limit"`` (the solver's best
    integer answer when time ran out; ``lp_bound`` bounds how far from optimal),
    ``"greedy"`` (the solver failed or found nothing in time: the greedy answer),
    ``"empty"`` (rate 0: nothing to run beyond the minimums), ``"capped"`` (best effort,
    ``solve(..., best_effort=True)`` only: the availability caps cannot carry the
    workload, so every capped type runs at its cap and the assignment is the plan for the
    largest share of the rate the caps carry; the rest goes unserved).

    ``unserved``: the (out_tick, in_tick) cells with traffic that no GPU type can serve
    (no profile has a rate there, or only types capped at 0), left out of the plan
    (best effort only; ``Infeasible`` otherwise); ``unserved_share``: their share of the
    workload's requests.
    """

    gpus: Mapping[str, int]
    cost: float
    status: str
    solve_s: float
    lp_bound: float | None = None  # the LP relaxation's cost: no integer plan is cheaper
    greedy_cost: float | None = None  # the greedy fallback's cost on the same problem
    assignment: Mapping[str, Matrix] = field(default_factory=dict)  # gpu -> share of each cell
    solver: str = "highs"
    unserved: tuple[tuple[int, int], ...] = ()  # (out_tick, in_tick) cells left out
    unserved_share: float = 0.0  # of the workload's requests, in those cells

    def to_json(self) -> dict[str, Any]:
        """The ``shoal placement solve --json`` object (assignment left out; see
        ``formats.plan_to_json`` for the full form the planner serves)."""
        return {
            "gpus": dict(sorted(self.gpus.items())),
            "cost": self.cost,
            "lp_bound": self.lp_bound,
            "greedy_cost": self.greedy_cost,
            "solve_s": self.solve_s,
            "status": self.status,
        }
