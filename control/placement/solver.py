"""The Mélange ILP: the cheapest mix of GPU types that serves a request-size histogram.

The model (Mélange, arXiv 2404.14527 §5; cells ``c`` with traffic, GPU types ``g``,
``k`` = slice factor, ``load[g][c]`` = rate_c / k / tputs_g[c], problem.py)::

    minimise   sum_g cost_g n_g
    subject to sum_g y[c,g] = k                      every slice of every cell placed
               sum_c load[g][c] y[c,g] <= n_g        each type carries its slices
               y[c,g] in {0..k}, y[c,g] = 0 where g cannot serve c (tputs 0)
               n_g integer, min_replicas_g <= n_g <= available_g

``y[c,g]`` counts the slices of cell ``c`` on type ``g``. Mélange (and AIBrix) write one
binary per (slice, type) instead; the slices of a cell are identical, so both have the
same optimum, but the binaries have ``k!`` copies of every solution per cell for the
branch and bound to wade through. ``build_milp(..., per_slice=True)`` builds Mélange's
form for the bench, which solves both.

Through HiGHS (``highspy``, no modelling layer) with a time limit. Each solve also:

* solves the LP relaxation (integrality dropped: slices split, fractional replicas), whose
  cost is ``Plan.lp_bound`` — no integer plan is cheaper. Chosen over HiGHS's MIP dual
  bound because it means the same whether or not the MIP finished.
* runs the greedy (greedy.py): its cost is ``Plan.greedy_cost``, and its plan is handed to
  HiGHS as the first incumbent, so a time-limited answer is never worse than it. If HiGHS
  fails or finds nothing in time, the greedy plan is the answer (status "greedy").

The plan's replicas are recomputed from the assignment (``ceil`` of each type's load, at
least its minimum), so a solver's slack never costs money; its ``assignment`` is each
type's share of each cell. Invariant: every returned plan serves the workload (each
type's load <= its replicas + ``LOAD_TOLERANCE``) within the caps and minimums.

Best effort (``solve(..., best_effort=True)``, what the live planner asks): cells no type
can serve are left out (``Plan.unserved``) instead of failing the whole workload, and
when only the availability caps are short the answer is a ``"capped"`` plan instead of
``Infeasible``: every capped type at its cap, uncapped types sized for their part at the
full rate, and the assignment of the largest fraction ``s`` of the rate the caps carry
(bisection on ``s`` over the LP relaxation's feasibility, or the greedy's for the greedy
backend, then the integer solve at ``s``, backing off 10% while the slices do not fit).
Rejected: a max-served objective in the ILP itself (a second model to keep in step with
the first for a case that means "buy more GPUs"); keeping the last plan (the reviewer's
finding: a surge above the caps then never scales up to them).

Deterministic: HiGHS with its fixed seed, cells and types in input order. ``mip_rel_gap``
is 0: "optimal" means proven (the default 1e-4 could leave a cheaper plan unfound). The
"cbc" backend solves the same model through PuLP's CBC; it exists for tests and the
bench (CBC is what Mélange and AIBrix use), PuLP is imported only there.

Rejected: PuLP or another modelling layer for HiGHS (it rebuilds the model in Python
objects: slower than the solve at slice factor 8, and one more dependency); OR-Tools
(a large dependency for one model).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from control.placement.errors import Infeasible, SolverError
from control.placement.greedy import greedy_counts
from control.placement.problem import Problem, replicas_for, unservable_cells, without_cells
from control.placement.types import GpuProfile, Limits, Plan, Workload

__all__ = [
    "BACKENDS",
    "Milp",
    "MilpResult",
    "build_milp",
    "single_type_costs",
    "solve",
    "solve_milp",
]

logger = logging.getLogger("shoal." + __name__)

BACKENDS = ("highs", "greedy", "cbc")
_NO_LIMITS = Limits()  # frozen: safe as a shared default


@dataclass(frozen=True, slots=True)
class Milp:
    """A minimisation MILP column by column (what HiGHS's ``passModel`` takes)."""

    costs: tuple[float, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]  # math.inf: unbounded
    integer: tuple[bool, ...]
    columns: tuple[tuple[tuple[int, float], ...], ...]  # per column: (row, coefficient)
    row_lower: tuple[float, ...]
    row_upper: tuple[float, ...]
    # how to read a solution back: column -> (cell, type) for slice columns
    slice_columns: tuple[tuple[int, int], ...]
    replica_columns: tuple[int, ...]  # column of n_g per type

    def counts(self, values: Sequence[float], problem: Problem) -> list[list[int]]:
        """``counts[c][g]`` from a solution's column values."""
        counts = [[0] * len(problem.gpus) for _ in problem.cells]
        for column, (c, g) in enumerate(self.slice_columns):
            counts[c][g] += round(values[column])
        return counts

    def start(self, counts: Sequence[Sequence[int]], problem: Problem) -> list[float]:
        """Column values of the plan ``counts`` (a MIP start)."""
        values = [0.0] * len(self.costs)
        left = [list(row) for row in counts]
        room = {row: hi for row, hi in enumerate(self.row_upper)}  # slice rows: slices left
        for column, (c, g) in enumerate(self.slice_columns):
            row = self.columns[column][0][0]
            take = min(left[c][g], int(self.upper[column]), int(room[row]))
            values[column] = float(take)
            left[c][g] -= take
            room[row] -= take
        for g, n in enumerate(problem.replicas(counts)):
            values[self.replica_columns[g]] = float(n)
        return values


def build_milp(problem: Problem, *, per_slice: bool = False) -> Milp:
    """The model of the module docstring; ``per_slice``: Mélange's binary per (slice, type)."""
    k = problem.slice_factor
    num_cells = len(problem.cells)
    copies = k if per_slice else 1
    columns: list[tuple[tuple[int, float], ...]] = []
    costs: list[float] = []
    upper: list[float] = []
    integer: list[bool] = []
    lower: list[float] = []
    slice_columns: list[tuple[int, int]] = []
    capacity_row = num_cells * copies  # the first of the per-type rows
    for c in range(num_cells):
        for s in range(copies):
            for g in range(len(problem.gpus)):
                load = problem.loads[g][c]
                if load is None:
                    continue
                row = c * copies + s
                columns.append(((row, 1.0), (capacity_row + g, load)))
                costs.append(0.0)
                lower.append(0.0)
                upper.append(1.0 if per_slice else float(k))
                integer.append(True)
                slice_columns.append((c, g))
    replica_columns = []
    for g in range(len(problem.gpus)):
        replica_columns.append(len(columns))
        columns.append(((capacity_row + g, -1.0),))
        costs.append(problem.costs[g])
        lower.append(float(problem.low[g]))
        high = problem.high[g]
        upper.append(math.inf if high is None else float(high))
        integer.append(True)
    demand = 1.0 if per_slice else float(k)
    num_slice_rows = num_cells * copies
    return Milp(
        costs=tuple(costs),
        lower=tuple(lower),
        upper=tuple(upper),
        integer=tuple(integer),
        columns=tuple(columns),
        row_lower=(demand,) * num_slice_rows + (-math.inf,) * len(problem.gpus),
        row_upper=(demand,) * num_slice_rows + (0.0,) * len(problem.gpus),
        slice_columns=tuple(slice_columns),
        replica_columns=tuple(replica_columns),
    )


@dataclass(frozen=True, slots=True)
class MilpResult:
    """What a backend found: ``values`` None when it has no integer solution."""

    values: tuple[float, ...] | None
    status: str  # "optimal", "time_limit", "infeasible", "failed"
    detail: str = ""


def solve(
    profiles: Sequence[GpuProfile],
    workload: Workload,
    limits: Limits = _NO_LIMITS,
    *,
    time_limit_s: float = 10.0,
    backend: str = "highs",
    best_effort: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> Plan:
    """The cheapest mix of ``profiles``' GPU types serving ``workload`` within ``limits``.

    Raises ProfileFormatError (inputs that do not fit together), Infeasible (``buckets``:
    cells no type serves; empty when the caps are too tight), SolverError (the solver
    failed and the greedy found no plan either). With ``best_effort`` no Infeasible:
    unservable cells go to ``Plan.unserved`` and short caps give a ``"capped"`` plan
    (module docstring). ``clock`` times ``Plan.solve_s``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if best_effort:
        return _best_effort(profiles, workload, limits, time_limit_s, backend, clock)
    started = clock()
    problem = Problem.build(profiles, workload, limits)
    if not problem.cells:
        replicas = list(problem.low)
        cost = problem.cost(replicas)
        return Plan(
            gpus=dict(zip(problem.gpus, replicas, strict=True)),
            cost=cost,
            status="empty",
            solve_s=clock() - started,
            lp_bound=cost,
            greedy_cost=cost,
            assignment=problem.assignment([]),
            solver=backend,
        )
    greedy = greedy_counts(problem)
    greedy_cost = None if greedy is None else problem.cost(problem.replicas(greedy))
    if backend == "greedy":
        if greedy is None:
            raise SolverError("the greedy placement found no plan within the availability caps")
        return _plan(problem, greedy, "greedy", started, clock, None, greedy_cost, backend)
    milp = build_milp(problem)
    remaining = max(0.1, time_limit_s - (clock() - started))
    try:
        relaxed = solve_milp(milp, backend, remaining, relax=True)
        if relaxed.status == "infeasible":
            raise Infeasible(_caps_message(problem), buckets=())
        # only a proven optimum of the relaxation bounds the ILP from below (a feasible
        # LP point found before a time limit is an upper bound on the relaxation only)
        lp_bound = None
        if relaxed.status == "optimal" and relaxed.values is not None:
            lp_bound = _objective(milp, relaxed.values)
        remaining = max(0.1, time_limit_s - (clock() - started))
        start = None if greedy is None else milp.start(greedy, problem)
        result = solve_milp(milp, backend, remaining, start=start)
    except ModuleNotFoundError as exc:
        if greedy is None:
            raise SolverError(f"{exc.name} is not installed and the greedy found no plan") from exc
        logger.warning("%s is not installed: answering with the greedy plan", exc.name)
        return _plan(problem, greedy, "greedy", started, clock, None, greedy_cost, backend)
    if result.status == "infeasible":
        raise Infeasible(_caps_message(problem), buckets=())
    if result.values is None:
        if greedy is None:
            raise SolverError(
                f"{backend} found no plan ({result.status}: {result.detail}) and the greedy "
                "found none within the availability caps"
            )
        logger.warning("%s found no plan (%s): the greedy's", backend, result.detail)
        return _plan(problem, greedy, "greedy", started, clock, lp_bound, greedy_cost, backend)
    counts = milp.counts(result.values, problem)
    return _plan(problem, counts, result.status, started, clock, lp_bound, greedy_cost, backend)


def _best_effort(
    profiles: Sequence[GpuProfile],
    workload: Workload,
    limits: Limits,
    time_limit_s: float,
    backend: str,
    clock: Callable[[], float],
) -> Plan:
    started = clock()
    cells = unservable_cells(profiles, workload, limits)
    served, share = without_cells(workload, cells)
    unserved = tuple((workload.out_ticks[i], workload.in_ticks[j]) for i, j in cells)
    try:
        plan = solve(
            profiles, served, limits, time_limit_s=time_limit_s, backend=backend, clock=clock
        )
    except Infeasible:  # every cell left has a type: only the caps are short
        plan = _capped(profiles, served, limits, time_limit_s, backend, clock, started)
    except SolverError:
        if backend != "greedy":  # HiGHS failed as well as the greedy: not the caps' doing
            raise
        plan = _capped(profiles, served, limits, time_limit_s, backend, clock, started)
    return replace(plan, unserved=unserved, unserved_share=share)


def _capped(
    profiles: Sequence[GpuProfile],
    workload: Workload,
    limits: Limits,
    time_limit_s: float,
    backend: str,
    clock: Callable[[], float],
    started: float,
) -> Plan:
    """The ``"capped"`` plan of the module docstring."""
    full = Problem.build(profiles, workload, limits)

    def at(scale: float) -> Problem:
        return Problem.build(profiles, replace(workload, rate=workload.rate * scale), limits)

    def carried(scale: float) -> bool:
        problem = at(scale)
        if backend == "greedy":
            return greedy_counts(problem) is not None
        remaining = max(0.1, time_limit_s - (clock() - started))
        try:
            relaxed = solve_milp(build_milp(problem), backend, remaining, relax=True)
        except ModuleNotFoundError:
            return greedy_counts(problem) is not None
        return relaxed.status != "infeasible"

    low, high = 0.0, 1.0
    for _ in range(20):  # to within 1e-6 of the largest fraction
        middle = (low + high) / 2
        low, high = (middle, high) if carried(middle) else (low, middle)
    counts: list[list[int]] | None = None
    scale = low
    for _ in range(10):
        if scale <= 0:
            break
        counts = _counts_at(at(scale), backend, max(0.1, time_limit_s - (clock() - started)))
        if counts is not None:
            break
        scale *= 0.9
    loads = full.type_loads(counts) if counts is not None else [0.0] * len(full.gpus)
    replicas = [
        high_g if high_g is not None else replicas_for(load, low_g)
        for load, low_g, high_g in zip(loads, full.low, full.high, strict=True)
    ]
    logger.warning(
        "the availability caps carry %.0f%% of the workload: running the caps", 100 * scale
    )
    return Plan(
        gpus=dict(zip(full.gpus, replicas, strict=True)),
        cost=full.cost(replicas),
        status="capped",
        solve_s=clock() - started,
        assignment=full.assignment(counts) if counts is not None else {},
        solver=backend,
    )


def _counts_at(problem: Problem, backend: str, time_limit_s: float) -> list[list[int]] | None:
    """An integer assignment within the caps (None: none found)."""
    greedy = greedy_counts(problem)
    if backend == "greedy":
        return greedy
    milp = build_milp(problem)
    start = None if greedy is None else milp.start(greedy, problem)
    try:
        result = solve_milp(milp, backend, time_limit_s, start=start)
    except ModuleNotFoundError:
        return greedy
    if result.values is None:
        return greedy
    return milp.counts(result.values, problem)


def solve_milp(
    milp: Milp,
    backend: str,
    time_limit_s: float,
    *,
    start: Sequence[float] | None = None,
    relax: bool = False,
) -> MilpResult:
    """Solve ``milp`` (or its LP relaxation) with ``backend`` ("highs" or "cbc"), from
    ``start`` if given. ModuleNotFoundError when the backend's library is missing."""
    if backend == "highs":
        return _run_highs(milp, start, time_limit_s, relax=relax)
    if backend == "cbc":
        return _run_cbc(milp, start, time_limit_s, relax=relax)
    raise ValueError(f"solve_milp backends are 'highs' and 'cbc', got {backend!r}")


def single_type_costs(
    profiles: Sequence[GpuProfile], workload: Workload
) -> dict[str, float | None]:
    """Each GPU type alone serving all of ``workload`` (unlimited, no minimums; None: it
    cannot serve some cell with traffic) — what Mélange's savings are measured against."""
    try:
        problem = Problem.build(profiles, workload, Limits())
    except Infeasible:
        # some cell nobody serves: every single type fails it too
        return {p.gpu: None for p in profiles}
    return dict(problem.single_type_costs())


def _plan(
    problem: Problem,
    counts: list[list[int]],
    status: str,
    started: float,
    clock: Callable[[], float],
    lp_bound: float | None,
    greedy_cost: float | None,
    backend: str,
) -> Plan:
    replicas = problem.replicas(counts)
    assert problem.within_caps(replicas), f"{status} plan {replicas} breaks the caps {problem.high}"
    assert all(sum(row) == problem.slice_factor for row in counts), "a slice left unplaced"
    return Plan(
        gpus=dict(zip(problem.gpus, replicas, strict=True)),
        cost=problem.cost(replicas),
        status=status,
        solve_s=clock() - started,
        lp_bound=lp_bound,
        greedy_cost=greedy_cost,
        assignment=problem.assignment(counts),
        solver=backend,
    )


def _objective(milp: Milp, values: Sequence[float]) -> float:
    return sum(c * v for c, v in zip(milp.costs, values, strict=True))


def _caps_message(problem: Problem) -> str:
    caps = {g: h for g, h in zip(problem.gpus, problem.high, strict=True) if h is not None}
    return f"the availability caps {caps} cannot carry the workload, even with split slices"


def _run_highs(
    milp: Milp, start: Sequence[float] | None, time_limit_s: float, *, relax: bool
) -> MilpResult:
    import highspy
    import numpy as np

    # highspy.Highs prints a banner on stdout when built, before any option can be set
    # (it would corrupt `--json`); _Highs is the same solver without the wrapper's
    # callbacks, exported by highspy.
    highs = getattr(highspy, "_Highs", highspy.Highs)()
    options: tuple[tuple[str, bool | float | int], ...] = (
        ("output_flag", False),
        ("time_limit", float(time_limit_s)),
        ("mip_rel_gap", 0.0),
        ("random_seed", 0),
    )
    for option, setting in options:
        highs.setOptionValue(option, setting)
    lp = highspy.HighsLp()
    lp.num_col_ = len(milp.costs)
    lp.num_row_ = len(milp.row_lower)
    lp.col_cost_ = np.array(milp.costs, dtype=np.float64)
    lp.col_lower_ = np.array(milp.lower, dtype=np.float64)
    lp.col_upper_ = np.array(milp.upper, dtype=np.float64)
    lp.row_lower_ = np.array(milp.row_lower, dtype=np.float64)
    lp.row_upper_ = np.array(milp.row_upper, dtype=np.float64)
    starts: list[int] = [0]
    index: list[int] = []
    value: list[float] = []
    for column in milp.columns:
        for row, coefficient in column:
            index.append(row)
            value.append(coefficient)
        starts.append(len(index))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(index, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(value, dtype=np.float64)
    if not relax:
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if flag else highspy.HighsVarType.kContinuous
            for flag in milp.integer
        ]
    _check(highs.passModel(lp), "passModel")
    if start is not None:
        solution = highspy.HighsSolution()
        solution.col_value = list(start)
        solution.value_valid = True
        _check(highs.setSolution(solution), "setSolution")
    status = highs.run()
    model_status = highs.getModelStatus()
    statuses = highspy.HighsModelStatus
    if model_status == statuses.kInfeasible:
        return MilpResult(None, "infeasible")
    has_solution = highs.getInfo().primal_solution_status == 2  # kSolutionStatusFeasible
    values = tuple(highs.getSolution().col_value) if has_solution else None
    detail = highs.modelStatusToString(model_status)
    if model_status == statuses.kOptimal and values is not None:
        return MilpResult(values, "optimal", detail)
    if status == highspy.HighsStatus.kError:
        return MilpResult(None, "failed", detail)
    return MilpResult(values, "time_limit", detail)


def _check(status: Any, call: str) -> None:
    import highspy

    if status == highspy.HighsStatus.kError:
        raise SolverError(f"HiGHS {call} failed")


def _run_cbc(
    milp: Milp, start: Sequence[float] | None, time_limit_s: float, *, relax: bool
) -> MilpResult:
    import warnings

    import pulp

    problem = pulp.LpProblem("placement", pulp.LpMinimize)
    variables = [
        problem.add_variable(
            f"x{i}",
            lowBound=milp.lower[i],
            upBound=None if math.isinf(milp.upper[i]) else milp.upper[i],
            cat=pulp.LpInteger if milp.integer[i] and not relax else pulp.LpContinuous,
        )
        for i in range(len(milp.costs))
    ]
    problem += pulp.lpSum(c * v for c, v in zip(milp.costs, variables, strict=True) if c)
    rows: list[list[tuple[float, Any]]] = [[] for _ in milp.row_lower]
    for column, entries in enumerate(milp.columns):
        for row, coefficient in entries:
            rows[row].append((coefficient, variables[column]))
    for r, terms in enumerate(rows):
        expression = pulp.lpSum(coefficient * v for coefficient, v in terms)
        low, high = milp.row_lower[r], milp.row_upper[r]
        if low == high:
            problem += expression == low
        else:
            problem += expression <= high
    if start is not None:
        for variable, value in zip(variables, start, strict=True):
            variable.setInitialValue(value)
    with warnings.catch_warnings():
        # PuLP 3.3 deprecates its bundled CBC for PuLP 4; it is the only CBC installed
        warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)
        command = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=time_limit_s, gapRel=0.0, warmStart=start is not None
        )
        problem.solve(command)
    status = pulp.LpStatus[problem.status]
    if status == "Infeasible":
        return MilpResult(None, "infeasible")
    values = [v.varValue for v in variables]
    if status != "Optimal" or any(v is None for v in values):
        return MilpResult(None, "failed", status)
    found = tuple(float(v) for v in values if v is not None)
    # PuLP reports "Optimal" also for CBC's best integer solution at a time limit
    solution_status = getattr(problem, "sol_status", pulp.LpSolutionOptimal)
    kind = "optimal" if solution_status == pulp.LpSolutionOptimal else "time_limit"
    return MilpResult(found, kind, status)
