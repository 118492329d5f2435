"""The greedy placement: the answer when the ILP solver fails or finds nothing in time,
and the ILP's first incumbent (so the ILP never answers worse than it).

Algorithm (deterministic; cells by descending rate, ties by position; types by their
order in the profiles)::

    1. place: each slice of each cell goes to a type where it fits in replicas already
       needed (the minimums, or the rounding-up of earlier slices), else to the type with
       the lowest cost per request for that cell (cost_g * load_g) whose availability cap
       still allows the replica it needs; no type left -> no greedy answer (None)
    2. close replicas: for each type g (most expensive first) try to drop its last
       replica by moving just enough of its slices — those cheapest to move, by load on
       h over load on g — to one other type h, opening replicas of h where needed within
       h's cap; keep the move that saves the most, repeat until no move saves anything

Step 2 is what finds Mélange's example (its step 1 puts every cell on the A100, 2 x
$3.67; moving the cell (0, 0) to 3 A10Gs closes the second A100: $6.70, the optimum). How
it fails: moves go to one type at a time and one replica at a time, so plans that need
two types to change together stay out of reach (the ILP finds them); with tight caps
step 1 can fill a capped type with cells other types could have taken and then find no
room for a cell only that type serves (None although a plan exists; the ILP finds it).

Rejected: Mélange's own fallback (none: it returns no plan when CBC does not finish);
first-fit-decreasing bin packing per type (it packs replicas but does not choose types).
"""

from __future__ import annotations

from control.placement.problem import LOAD_TOLERANCE, Problem, replicas_for

__all__ = ["greedy_counts"]

_MAX_MOVES = 10_000  # step 2 stops here; each move saves money, so this only bounds time
_SAVING = 1e-9  # a move must save more than this (floating point noise is no saving)


def greedy_counts(problem: Problem) -> list[list[int]] | None:
    """``counts[c][g]`` (slices of cell ``c`` on type ``g``), or None when step 1 finds no
    room within the caps."""
    counts = _place(problem)
    if counts is None:
        return None
    for _ in range(_MAX_MOVES):
        if not _close_one_replica(problem, counts):
            break
    return counts


def _place(problem: Problem) -> list[list[int]] | None:
    num_gpus = len(problem.gpus)
    counts = [[0] * num_gpus for _ in problem.cells]
    loads = [0.0] * num_gpus
    order = sorted(range(len(problem.cells)), key=lambda c: (-problem.rates[c], c))
    for c in order:
        for _ in range(problem.slice_factor):
            best: tuple[float, int] | None = None
            for g in range(num_gpus):
                load = problem.loads[g][c]
                if load is None:
                    continue
                low, high = problem.low[g], problem.high[g]
                now = replicas_for(loads[g], low)
                after = replicas_for(loads[g] + load, low)
                if high is not None and after > high:
                    continue
                key = (0.0 if after == now else problem.costs[g] * load, g)
                if best is None or key < best:
                    best = key
            if best is None:
                return None
            g = best[1]
            counts[c][g] += 1
            loads[g] += problem.loads[g][c] or 0.0
    return counts


def _close_one_replica(problem: Problem, counts: list[list[int]]) -> bool:
    """Apply the single move that saves the most by dropping one replica; False if none."""
    loads = problem.type_loads(counts)
    replicas = [replicas_for(load, low) for load, low in zip(loads, problem.low, strict=True)]
    best: tuple[float, list[tuple[int, int, int, int]]] | None = None
    for g in sorted(range(len(problem.gpus)), key=lambda g: (-problem.costs[g], g)):
        if replicas[g] <= problem.low[g] or replicas[g] == 0:
            continue
        excess = loads[g] - (replicas[g] - 1) - LOAD_TOLERANCE
        for h in range(len(problem.gpus)):
            if h == g:
                continue
            move = _moves_to(problem, counts, g, h, excess)
            if move is None:
                continue
            moves, added = move
            new_h = replicas_for(loads[h] + added, problem.low[h])
            high = problem.high[h]
            if high is not None and new_h > high:
                continue
            saving = problem.costs[g] - problem.costs[h] * (new_h - replicas[h])
            if saving > _SAVING and (best is None or saving > best[0]):
                best = (saving, moves)
    if best is None:
        return False
    for c, g, h, n in best[1]:
        counts[c][g] -= n
        counts[c][h] += n
    return True


def _moves_to(
    problem: Problem, counts: list[list[int]], g: int, h: int, excess: float
) -> tuple[list[tuple[int, int, int, int]], float] | None:
    """Slices moving from ``g`` to ``h`` that take at least ``excess`` of load off ``g``,
    cheapest first (by load on h per load on g), and the load they add to ``h``."""
    candidates = []
    for c, row in enumerate(counts):
        load_g, load_h = problem.loads[g][c], problem.loads[h][c]
        if row[g] and load_g is not None and load_h is not None:
            candidates.append((load_h / load_g, c, load_g, load_h))
    candidates.sort()
    moves: list[tuple[int, int, int, int]] = []
    removed = added = 0.0
    for _, c, load_g, load_h in candidates:
        if removed >= excess:
            break
        n = min(counts[c][g], max(1, _ceil_div(excess - removed, load_g)))
        moves.append((c, g, h, n))
        removed += n * load_g
        added += n * load_h
    return (moves, added) if removed >= excess else None


def _ceil_div(amount: float, unit: float) -> int:
    whole = int(amount // unit)
    return whole if whole * unit >= amount else whole + 1
