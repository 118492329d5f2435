"""The placement problem in numbers: cells with traffic, each slice's load on each GPU
type, and the replica bounds; shared by the ILP (solver.py) and the greedy (greedy.py).

Invariant: ``loads[g][c]`` is the share of one replica of type ``g`` that one slice of
cell ``c`` uses (``rate_c / slice_factor / tputs_g[c]``), ``None`` where ``g`` cannot serve
``c`` (its profile's rate there is 0); only cells with traffic appear; ``low[g] <= high[g]``
(``high`` None: unlimited). A slice is the unit of assignment: Mélange cuts each cell's
rate into ``slice_factor`` equal slices and sends each whole to one type.

An assignment is ``counts[c][g]``: how many of cell ``c``'s slices go to type ``g`` (they
sum to ``slice_factor``). Slices of one cell are interchangeable, so counting them loses
nothing against Mélange's one binary per (slice, type) and removes its ``k!`` symmetric
copies of every solution (see solver.py). A type needs ``replicas_for(load)`` replicas:
``ceil(load)`` with a tolerance of ``LOAD_TOLERANCE`` replica for floating point sums and the
solver's feasibility tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from control.placement.errors import Infeasible, ProfileFormatError
from control.placement.types import GpuProfile, Limits, Matrix, Workload

__all__ = ["LOAD_TOLERANCE", "Problem", "replicas_for", "unservable_cells", "without_cells"]

LOAD_TOLERANCE = 1e-6  # of one replica: what a type's load may exceed its replicas by


def replicas_for(load: float, low: int = 0) -> int:
    """Replicas a type needs to carry ``load`` (and at least ``low``)."""
    return max(low, math.ceil(load - LOAD_TOLERANCE))


def unservable_cells(
    profiles: Sequence[GpuProfile], workload: Workload, limits: Limits | None = None
) -> tuple[tuple[int, int], ...]:
    """``(i, j)`` of the cells with traffic that no GPU type can serve: none has a rate
    there, or (with ``limits``) every type that has one is capped at 0 replicas."""
    if workload.rate <= 0:
        return ()
    caps = {} if limits is None else limits.available
    able = [p for p in profiles if caps.get(p.gpu) != 0]
    return tuple(
        (i, j)
        for i, row in enumerate(workload.histogram)
        for j, share in enumerate(row)
        if share > 0 and all(p.tputs[i][j] <= 0 for p in able)
    )


def without_cells(workload: Workload, cells: Sequence[tuple[int, int]]) -> tuple[Workload, float]:
    """``workload`` without the traffic of ``cells`` (their share of the rate removed,
    the other cells' rates unchanged), and the share of requests removed."""
    if not cells:
        return workload, 0.0
    total = sum(sum(row) for row in workload.histogram)
    drop = set(cells)
    histogram = tuple(
        tuple(0.0 if (i, j) in drop else share for j, share in enumerate(row))
        for i, row in enumerate(workload.histogram)
    )
    kept = sum(sum(row) for row in histogram)
    removed = 1.0 - kept / total if total > 0 else 0.0
    rate = workload.rate * kept / total if total > 0 else 0.0
    return replace(workload, rate=rate, histogram=histogram), removed


@dataclass(frozen=True, slots=True)
class Problem:
    """One solve's numbers (build with ``Problem.build``)."""

    gpus: tuple[str, ...]
    costs: tuple[float, ...]
    cells: tuple[tuple[int, int], ...]  # (i, j) of the cells with traffic
    rates: tuple[float, ...]  # requests/s of each of those cells
    slice_factor: int
    loads: tuple[tuple[float | None, ...], ...]  # [g][c]: replica share of one slice
    low: tuple[int, ...]  # minimum replicas per type
    high: tuple[int | None, ...]  # available replicas per type (None: unlimited)
    shape: tuple[int, int]  # (len(out_ticks), len(in_ticks))

    @staticmethod
    def build(profiles: Sequence[GpuProfile], workload: Workload, limits: Limits) -> Problem:
        """Check that the inputs fit together and compute the loads.

        Raises ProfileFormatError (ticks differ, duplicate or unknown GPU names, traffic
        with an all-zero histogram) and Infeasible (cells no type can serve)."""
        if not profiles:
            raise ProfileFormatError("at least one GPU profile is needed")
        names = [p.gpu for p in profiles]
        if len(set(names)) != len(names):
            raise ProfileFormatError(f"GPU types must be unique, got {names}")
        ticks = (workload.out_ticks, workload.in_ticks)
        for p in profiles:
            if (p.out_ticks, p.in_ticks) != ticks:
                raise ProfileFormatError(
                    f"profile {p.gpu} is on ticks {[list(p.out_ticks), list(p.in_ticks)]}, "
                    f"the workload on {[list(t) for t in ticks]}: profiles must share the "
                    "workload's ticks (formats.rebin moves a histogram onto other ticks)"
                )
        tables = (("available", limits.available), ("min_replicas", limits.min_replicas))
        for table_name, table in tables:
            unknown = sorted(set(table) - set(names))
            if unknown:
                raise ProfileFormatError(
                    f"{table_name} names GPU types without a profile: {unknown} (known: {names})"
                )
        total = sum(sum(row) for row in workload.histogram)
        if workload.rate > 0 and total <= 0:
            raise ProfileFormatError("the workload has a rate but an all-zero histogram")
        cells: list[tuple[int, int]] = []
        rates: list[float] = []
        if workload.rate > 0:
            for i, row in enumerate(workload.histogram):
                for j, share in enumerate(row):
                    if share > 0:
                        cells.append((i, j))
                        rates.append(workload.rate * share / total)
        k = workload.slice_factor
        loads = tuple(
            tuple(
                rate / k / p.tputs[i][j] if p.tputs[i][j] > 0 else None
                for (i, j), rate in zip(cells, rates, strict=True)
            )
            for p in profiles
        )
        unservable = tuple(
            (workload.out_ticks[i], workload.in_ticks[j])
            for c, (i, j) in enumerate(cells)
            if all(row[c] is None for row in loads)
        )
        if unservable:
            raise Infeasible(
                f"no GPU type can serve {len(unservable)} (output, input) bucket(s) with "
                f"traffic: {list(unservable)}",
                buckets=unservable,
            )
        return Problem(
            gpus=tuple(names),
            costs=tuple(p.cost for p in profiles),
            cells=tuple(cells),
            rates=tuple(rates),
            slice_factor=k,
            loads=loads,
            low=tuple(limits.min_replicas.get(g, 0) for g in names),
            high=tuple(limits.available.get(g) for g in names),
            shape=(len(workload.out_ticks), len(workload.in_ticks)),
        )

    def type_loads(self, counts: Sequence[Sequence[int]]) -> list[float]:
        """Each type's load (replicas' worth) under ``counts[c][g]``."""
        totals = [0.0] * len(self.gpus)
        for c, row in enumerate(counts):
            for g, n in enumerate(row):
                if n:
                    load = self.loads[g][c]
                    assert load is not None, f"slices of cell {c} on type {g}, which cannot take it"
                    totals[g] += n * load
        return totals

    def replicas(self, counts: Sequence[Sequence[int]]) -> list[int]:
        """The fewest replicas per type that carry ``counts`` (and meet the minimums)."""
        return [
            replicas_for(load, low)
            for load, low in zip(self.type_loads(counts), self.low, strict=True)
        ]

    def cost(self, replicas: Sequence[int]) -> float:
        return sum(n * cost for n, cost in zip(replicas, self.costs, strict=True))

    def within_caps(self, replicas: Sequence[int]) -> bool:
        return all(h is None or n <= h for n, h in zip(replicas, self.high, strict=True))

    def assignment(self, counts: Sequence[Sequence[int]]) -> dict[str, Matrix]:
        """``counts`` as each type's share of every cell (``Plan.assignment``)."""
        rows, cols = self.shape
        shares = [[[0.0] * cols for _ in range(rows)] for _ in self.gpus]
        for c, (i, j) in enumerate(self.cells):
            for g, n in enumerate(counts[c]):
                shares[g][i][j] = n / self.slice_factor
        return {
            gpu: tuple(tuple(row) for row in matrix)
            for gpu, matrix in zip(self.gpus, shares, strict=True)
        }

    def single_type_costs(self) -> Mapping[str, float | None]:
        """Each type alone carrying every cell, unlimited and without minimums (None: it
        cannot serve some cell) — the baseline Mélange's savings are measured against."""
        out: dict[str, float | None] = {}
        for g, gpu in enumerate(self.gpus):
            loads = self.loads[g]
            if any(load is None for load in loads):
                out[gpu] = None
            else:
                total = sum(load for load in loads if load is not None) * self.slice_factor
                out[gpu] = replicas_for(total) * self.costs[g]
        return out
