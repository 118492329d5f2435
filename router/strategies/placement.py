"""Reading the placement plan for one request: its cell, then its GPU type (issue 14).

The planner (``shoal placement run``, after Mélange) decides which share of each
(output length, prompt length) cell goes to each GPU type; the ``slo`` strategy places a
request consistently with it (``slo.py``). Here, pure and per request::

    cell     i = the smallest out_tick >= max_tokens, j = the smallest in_tick >= prompt
             tokens (above the last tick: the last), as formats.rebin bins the histogram
             the planner solved over; max_tokens stands for the output length, which is
             not known before the answer (a client's cap; it overestimates requests that
             stop early)
    row      = i when the plan has traffic in cell (i, j), else the nearest output row with
             traffic in column j, the lower one first at equal distance (i-1, i+1, i-2,
             ...); no row with traffic in the column: the plan says nothing
    u        = xxh3_64(request_id) / 2**64, uniform in [0, 1) over request ids
    type     = the first GPU type, in name order, whose cumulative share of the cell
               (shares normalised by their sum) exceeds u; none when the cell's shares
               sum to 0 (the plan has no traffic there)

Why the walk: the planner's histogram counts requests by their *actual* completion
tokens, the router can only read ``max_tokens`` (a cap; chat without one defaults to 256),
so a request's row is usually above the rows the plan has traffic in, and without the walk
most requests would find an empty cell and the plan would silently not be followed. The
lower row first because ``max_tokens`` overestimates. Rejected: the plan's conditional
output distribution over the column (a pick weighted over rows): it sends a short request
to the rows of long ones as often as their traffic, where the nearest lower row is the
likelier true row of a request that asked for at most ``max_tokens``. Each decision's
outcome (``plan``, ``nearest_row``, ``no_share``; the strategy adds ``fallback`` and
``no_plan``) is counted: ``shoal_router_placement_decisions_total{outcome}``.

Invariant: the pick is a function of the plan and the request id only, so every router
replica (and a retry of the same request) agrees on it without shared state, and over
many request ids each type receives its share of a cell's requests: the number of n
requests picking a type of share p is Binomial(n, p) (standard deviation
``sqrt(p (1 - p) / n)`` of the fraction; the unit tests check that bound).

Rejected: a weighted random pick from the strategies' rng (replicas and retries would
disagree, and tests could not state which type a request gets); smooth weighted
round-robin per cell (exact shares on one replica, but it is state per cell and per
replica, and replicas would then each send their first request of a cell to the same
type).

``plan_from_json`` reads the planner's ``GET /v1/plan`` document
(``control.placement.formats.plan_to_json`` plus ``model`` and ``created``): only the
``assignment`` and ``indexes`` routing needs; a malformed one is ``BadPlan`` naming the
field (the poller then keeps no plan).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import xxhash

from router.errors import BadPlan
from router.types import PlacementPlan, RouteRequest

__all__ = [
    "MAX_GPU_TYPES",
    "MAX_TICKS",
    "cell_of",
    "pick_gpu_type",
    "place",
    "placed_gpu_type",
    "plan_from_json",
    "traffic_row",
    "unit_hash",
]

_SCALE = float(2**64)
MAX_TICKS = 64  # per axis of a plan (the planner's profiles have ~12)
MAX_GPU_TYPES = 64  # in a plan's assignment


def _tick(ticks: Sequence[int], length: int) -> int:
    return min(bisect.bisect_left(ticks, length), len(ticks) - 1)


def cell_of(plan: PlacementPlan, prompt_tokens: int, max_tokens: int) -> tuple[int, int]:
    """``(i, j)``: the output row of ``max_tokens`` and the input column of the prompt."""
    return _tick(plan.out_ticks, max_tokens), _tick(plan.in_ticks, prompt_tokens)


def unit_hash(request_id: str) -> float:
    """The request id as a number uniform in [0, 1)."""
    return xxhash.xxh3_64_intdigest(request_id.encode()) / _SCALE


def pick_gpu_type(plan: PlacementPlan, cell: tuple[int, int], u: float) -> str | None:
    """The type whose slice of [0, 1) holds ``u`` (module docstring); None without
    traffic in the cell."""
    i, j = cell
    shares = [(gpu, plan.shares[gpu][i][j]) for gpu in sorted(plan.shares)]
    total = math.fsum(share for _, share in shares)
    if total <= 0:
        return None
    cumulative = 0.0
    last = None
    for gpu, share in shares:
        if share <= 0:
            continue
        cumulative += share / total
        last = gpu
        if u < cumulative:
            return gpu
    return last  # u within rounding of 1


def _has_traffic(plan: PlacementPlan, i: int, j: int) -> bool:
    return any(shares[i][j] > 0 for shares in plan.shares.values())


def traffic_row(plan: PlacementPlan, cell: tuple[int, int]) -> int | None:
    """The row the request's shares are read from (module docstring); None when the
    plan has no traffic in the cell's column."""
    i, j = cell
    for distance in range(len(plan.out_ticks)):
        for row in (i - distance, i + distance) if distance else (i,):
            if 0 <= row < len(plan.out_ticks) and _has_traffic(plan, row, j):
                return row
    return None


def place(plan: PlacementPlan, request: RouteRequest, prompt_tokens: int) -> tuple[str | None, str]:
    """(the GPU type the plan gives ``request`` or None, the outcome: ``"plan"`` from its
    own cell, ``"nearest_row"`` from a row near it, ``"no_share"`` when the plan says
    nothing: made for another model, or no traffic in the prompt's column)."""
    if plan.model and request.model and request.model != plan.model:
        return None, "no_share"
    i, j = cell_of(plan, prompt_tokens, request.max_tokens)
    row = traffic_row(plan, (i, j))
    if row is None:
        return None, "no_share"
    gpu = pick_gpu_type(plan, (row, j), unit_hash(request.request_id))
    return gpu, "plan" if row == i else "nearest_row"


def placed_gpu_type(plan: PlacementPlan, request: RouteRequest, prompt_tokens: int) -> str | None:
    """The GPU type the plan gives ``request`` (``place`` without the outcome)."""
    return place(plan, request, prompt_tokens)[0]


def _ticks(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or len(value) > MAX_TICKS:
        raise BadPlan(f"plan: {name} must be a list of 1 to {MAX_TICKS} token counts")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in value):
        raise BadPlan(f"plan: {name} must hold positive integers, got {value}")
    ticks = tuple(value)
    if any(b <= a for a, b in itertools.pairwise(ticks)):
        raise BadPlan(f"plan: {name} must be strictly increasing, got {value}")
    return ticks


def _matrix(value: Any, gpu: str, rows: int, columns: int) -> tuple[tuple[float, ...], ...]:
    where = f"plan: assignment[{gpu!r}]"
    if not isinstance(value, list) or len(value) != rows:
        raise BadPlan(f"{where} must be {rows} rows (output ticks)")
    matrix = []
    for row in value:
        if not isinstance(row, list) or len(row) != columns:
            raise BadPlan(f"{where} rows must have {columns} shares (input ticks)")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row):
            raise BadPlan(f"{where} must hold numbers")
        shares = tuple(float(v) for v in row)
        if any(not math.isfinite(v) or v < 0 for v in shares):
            raise BadPlan(f"{where} has a negative or non-finite share")
        matrix.append(shares)
    return tuple(matrix)


def plan_from_json(document: Any) -> PlacementPlan:
    """The routing part of a ``GET /v1/plan`` answer (module docstring)."""
    if not isinstance(document, Mapping):
        raise BadPlan("plan: expected a JSON object")
    indexes = document.get("indexes")
    if not isinstance(indexes, list) or len(indexes) != 2:
        raise BadPlan("plan: 'indexes' must be [out_ticks, in_ticks]")
    out_ticks = _ticks(indexes[0], "indexes[0] (output ticks)")
    in_ticks = _ticks(indexes[1], "indexes[1] (input ticks)")
    assignment = document.get("assignment")
    if not isinstance(assignment, Mapping):
        raise BadPlan("plan: 'assignment' must map GPU types to [out][in] shares")
    if len(assignment) > MAX_GPU_TYPES:
        raise BadPlan(f"plan: more than {MAX_GPU_TYPES} GPU types in 'assignment'")
    shares = {
        str(gpu): _matrix(matrix, str(gpu), len(out_ticks), len(in_ticks))
        for gpu, matrix in assignment.items()
    }
    model = document.get("model") or ""
    created = document.get("created")
    if not isinstance(model, str):
        raise BadPlan("plan: 'model' must be a string or null")
    if created is not None and not isinstance(created, (int, float)):
        raise BadPlan("plan: 'created' must be a unix time or null")
    return PlacementPlan(
        out_ticks=out_ticks,
        in_ticks=in_ticks,
        shares=shares,
        model=model,
        created=None if created is None else float(created),
    )
