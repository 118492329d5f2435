"""The placement solver (control/placement/solver.py, greedy.py, problem.py): Mélange's
golden example, then invariants on random problems checked against CBC and by hand."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from control.placement import solver as solver_module
from control.placement.errors import Infeasible, ProfileFormatError, SolverError
from control.placement.problem import LOAD_TOLERANCE
from control.placement.solver import MilpResult, single_type_costs, solve
from control.placement.types import GpuProfile, Limits, Plan, Workload

OUT = (1, 2)
IN = (1, 2)


def profile(gpu: str, cost: float, tputs: Sequence[Sequence[float]], ticks: int = 2) -> GpuProfile:
    t = tuple(range(1, ticks + 1))
    return GpuProfile(gpu, cost, tuple(tuple(map(float, r)) for r in tputs), t, t)


def workload(rate: float, histogram: Sequence[Sequence[float]], slice_factor: int = 1) -> Workload:
    t = tuple(range(1, len(histogram) + 1))
    return Workload(rate, tuple(tuple(map(float, r)) for r in histogram), t, t, slice_factor)


A10G = profile("A10G", 1.01, [[2, 1], [5, 2]])
A100 = profile("A100-80GB", 3.67, [[20, 20], [40, 20]])
MELANGE = workload(30.0, [[0.2, 0.1], [0.5, 0.2]])


def assert_serves(plan: Plan, profiles: Sequence[GpuProfile], work: Workload) -> None:
    """Every cell with traffic fully assigned, only to types that serve it, and each type's
    replicas carry its load (what the plan promises, recomputed from its assignment)."""
    total = sum(map(sum, work.histogram))
    for i, row in enumerate(work.histogram):
        for j, share in enumerate(row):
            if share > 0 and work.rate > 0:
                placed = sum(plan.assignment[p.gpu][i][j] for p in profiles)
                assert placed == pytest.approx(1.0)
    for p in profiles:
        load = 0.0
        for i, row in enumerate(work.histogram):
            for j, share in enumerate(row):
                part = plan.assignment[p.gpu][i][j] if plan.assignment else 0.0
                if part > 0:
                    assert p.tputs[i][j] > 0, f"{p.gpu} given a cell it cannot serve"
                    load += part * work.rate * share / total / p.tputs[i][j]
        assert load <= plan.gpus[p.gpu] + LOAD_TOLERANCE


# --- Mélange's example (its README and config/example.json) -----------------------------


@pytest.mark.parametrize("backend", ["highs", "cbc", "greedy"])
def test_melange_example_is_three_a10g_and_one_a100_at_6_70(backend: str) -> None:
    plan = solve([A10G, A100], MELANGE, backend=backend)
    assert dict(plan.gpus) == {"A10G": 3, "A100-80GB": 1}
    assert plan.cost == pytest.approx(6.70)
    assert plan.status == ("greedy" if backend == "greedy" else "optimal")
    assert_serves(plan, [A10G, A100], MELANGE)


def test_melange_example_single_types_cost_12_12_and_7_34() -> None:
    assert single_type_costs([A10G, A100], MELANGE) == {
        "A10G": pytest.approx(12.12),
        "A100-80GB": pytest.approx(7.34),
    }


def test_melange_example_bounds_and_assignment() -> None:
    plan = solve([A10G, A100], MELANGE)
    # LP relaxation: every cell on the A100 (cheaper per request everywhere), 1.125 replicas
    assert plan.lp_bound == pytest.approx(1.125 * 3.67)
    assert plan.greedy_cost == pytest.approx(6.70)
    # two optima at $6.70: the 3 A10Gs take cell (1, 1) (6 req/s at 2 each; the A100 keeps
    # 0.15 + 0.375 + 0.3 = 0.825 of a replica) or cell (2, 1) (15 req/s at 5 each; 0.75)
    on_a10g = {(i, j) for i in range(2) for j in range(2) if plan.assignment["A10G"][i][j] == 1.0}
    assert on_a10g in ({(0, 0)}, {(1, 0)})
    for i in range(2):
        for j in range(2):
            assert plan.assignment["A100-80GB"][i][j] == (0.0 if (i, j) in on_a10g else 1.0)
    assert plan.to_json().keys() == {"gpus", "cost", "lp_bound", "greedy_cost", "solve_s", "status"}


def test_solve_is_deterministic() -> None:
    first = solve([A10G, A100], workload(30, [[0.2, 0.1], [0.5, 0.2]], 4))
    again = solve([A10G, A100], workload(30, [[0.2, 0.1], [0.5, 0.2]], 4))
    assert (first.gpus, first.assignment, first.cost) == (again.gpus, again.assignment, again.cost)


# --- limits, infeasibility, edge cases --------------------------------------------------


def test_availability_caps_are_respected() -> None:
    plan = solve([A10G, A100], MELANGE, Limits(available={"A10G": 2}))
    assert plan.gpus["A10G"] <= 2
    assert dict(plan.gpus) == {"A10G": 0, "A100-80GB": 2}  # 2 A10Gs cannot take a cell
    assert_serves(plan, [A10G, A100], MELANGE)


def test_caps_too_tight_are_infeasible_without_buckets() -> None:
    with pytest.raises(Infeasible) as caught:
        solve([A10G, A100], MELANGE, Limits(available={"A10G": 3, "A100-80GB": 0}))
    assert caught.value.buckets == ()


def test_minimum_replicas_are_kept_and_their_room_used() -> None:
    plan = solve([A10G, A100], MELANGE, Limits(min_replicas={"A100-80GB": 2}))
    assert dict(plan.gpus) == {"A10G": 0, "A100-80GB": 2}  # two A100s carry it all
    assert plan.cost == pytest.approx(7.34)


def test_buckets_no_type_serves_are_named() -> None:
    blind = profile("L4", 0.7, [[3, 0], [3, 0]])
    a10g = profile("A10G", 1.01, [[2, 0], [5, 2]])
    with pytest.raises(Infeasible) as caught:
        solve([blind, a10g], workload(10, [[0.5, 0.5], [0.0, 0.0]]))
    assert caught.value.buckets == ((1, 2),)  # (output tick, input tick)


def test_an_unservable_bucket_without_traffic_is_fine() -> None:
    a10g = profile("A10G", 1.01, [[2, 0], [5, 2]])
    plan = solve([a10g], workload(4, [[1.0, 0.0], [0.0, 0.0]]))
    assert dict(plan.gpus) == {"A10G": 2}


def test_rate_zero_is_empty_with_the_minimums() -> None:
    plan = solve(
        [A10G, A100], workload(0, [[0.2, 0.1], [0.5, 0.2]]), Limits(min_replicas={"A10G": 1})
    )
    assert plan.status == "empty"
    assert dict(plan.gpus) == {"A10G": 1, "A100-80GB": 0}
    assert plan.cost == pytest.approx(1.01)


def test_profiles_on_other_ticks_are_refused() -> None:
    other = GpuProfile("H100", 7.5, ((1.0, 1.0), (1.0, 1.0)), (16, 32), (16, 32))
    with pytest.raises(ProfileFormatError, match="formats.rebin"):
        solve([A10G, other], MELANGE)


def test_limits_naming_unknown_types_are_refused() -> None:
    with pytest.raises(ProfileFormatError, match="H100"):
        solve([A10G, A100], MELANGE, Limits(available={"H100": 1}))


def test_a_rate_with_an_empty_histogram_is_refused() -> None:
    with pytest.raises(ProfileFormatError, match="all-zero"):
        solve([A10G], workload(5, [[0, 0], [0, 0]]))


def test_without_highspy_the_greedy_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "highspy", None)
    plan = solve([A10G, A100], MELANGE)
    assert plan.status == "greedy" and plan.cost == pytest.approx(6.70)


def test_no_integer_solution_in_time_falls_back_to_the_greedy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = solver_module.solve_milp

    def nothing_in_time(*args: object, **kwargs: object) -> MilpResult:
        if kwargs.get("relax"):
            return real(*args, **kwargs)  # type: ignore[arg-type]
        return MilpResult(None, "time_limit", "Time limit reached")

    monkeypatch.setattr(solver_module, "solve_milp", nothing_in_time)
    plan = solve([A10G, A100], MELANGE)
    assert plan.status == "greedy"
    assert plan.cost == plan.greedy_cost == pytest.approx(6.70)
    assert plan.lp_bound == pytest.approx(1.125 * 3.67)


def test_no_solution_and_no_greedy_is_a_solver_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(solver_module, "greedy_counts", lambda problem: None)
    monkeypatch.setattr(
        solver_module, "solve_milp", lambda *a, **k: MilpResult(None, "failed", "boom")
    )
    with pytest.raises(SolverError):
        solve([A10G, A100], MELANGE)


def test_lp_bound_is_left_out_when_the_relaxation_is_not_proven(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # review finding 7: a relaxation stopped by the time limit has a feasible LP point,
    # whose cost is no lower bound on the integer optimum
    real = solver_module.solve_milp

    def relaxation_in_time_limit(*args: object, **kwargs: object) -> MilpResult:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        if kwargs.get("relax"):
            return MilpResult(result.values, "time_limit", "Time limit reached")
        return result

    monkeypatch.setattr(solver_module, "solve_milp", relaxation_in_time_limit)
    plan = solve([A10G, A100], MELANGE)
    assert (plan.status, plan.lp_bound) == ("optimal", None)
    assert plan.cost == pytest.approx(6.70)


def test_slice_factor_is_bounded() -> None:
    # review finding 9: the greedy walks every slice before the time-limited solve
    with pytest.raises(ProfileFormatError, match="between 1 and 64"):
        workload(30.0, [[0.2, 0.1], [0.5, 0.2]], slice_factor=65)
    assert workload(30.0, [[1.0]], slice_factor=64).slice_factor == 64


# --- best effort (the live planner's solve) ---------------------------------------------


def test_best_effort_leaves_out_the_cells_no_type_serves() -> None:
    # review finding 1: one request in a cell nobody serves made the whole round infeasible
    blind = profile("L4", 0.7, [[3, 0], [3, 0]])
    a10g = profile("A10G", 1.01, [[2, 0], [5, 2]])
    work = workload(10, [[0.4, 0.2], [0.0, 0.4]])  # (1, 2) nobody serves: 20 % of requests
    plan = solve([blind, a10g], work, best_effort=True)
    assert plan.unserved == ((1, 2),)
    assert plan.unserved_share == pytest.approx(0.2)
    served = workload(8, [[0.5, 0.0], [0.0, 0.5]])  # the rest, at its own rate
    assert dict(plan.gpus) == dict(solve([blind, a10g], served).gpus)
    assert plan.status == "optimal"
    assert_serves(plan, [blind, a10g], served)


def test_best_effort_counts_types_capped_at_zero_as_not_serving() -> None:
    plan = solve([A10G, A100], workload(10, [[1.0, 0.0], [0.0, 0.0]]),
                 Limits(available={"A10G": 0, "A100-80GB": 0}), best_effort=True)  # fmt: skip
    assert (plan.unserved, plan.unserved_share, plan.status) == (((1, 1),), 1.0, "empty")
    assert dict(plan.gpus) == {"A10G": 0, "A100-80GB": 0}


@pytest.mark.parametrize("backend", ["highs", "greedy"])
def test_best_effort_above_the_caps_runs_the_caps(backend: str) -> None:
    # review finding 1: demand above the caps kept the old, smaller fleet
    caps = Limits(available={"A10G": 3, "A100-80GB": 0})  # Melange needs an A100 too
    with pytest.raises((Infeasible, SolverError)):
        solve([A10G, A100], MELANGE, caps, backend=backend)
    plan = solve([A10G, A100], MELANGE, caps, backend=backend, best_effort=True)
    assert plan.status == "capped"
    assert dict(plan.gpus) == {"A10G": 3, "A100-80GB": 0}
    assert plan.cost == pytest.approx(3.03)
    assert plan.unserved == ()
    for i, row in enumerate(MELANGE.histogram):  # every cell placed, on the A10Gs
        for j, _ in enumerate(row):
            assert plan.assignment["A10G"][i][j] == pytest.approx(1.0)


def test_best_effort_sizes_uncapped_types_for_the_full_rate() -> None:
    only_a = profile("S", 1.0, [[2, 0], [0, 0]])  # cell (0, 0) only, capped at 1
    only_b = profile("B", 3.0, [[0, 4], [0, 0]])  # cell (0, 1) only, unlimited
    work = workload(18.0, [[10, 8], [0, 0]])  # 10 req/s for S (needs 5), 8 for B (needs 2)
    plan = solve([only_a, only_b], work, Limits(available={"S": 1}), best_effort=True)
    assert (plan.status, dict(plan.gpus)) == ("capped", {"S": 1, "B": 2})
    assert plan.cost == pytest.approx(7.0)


# --- invariants on random problems ------------------------------------------------------

_TPUT = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 20.0])


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[GpuProfile], Workload]:
    n = draw(st.integers(1, 3))
    num_types = draw(st.integers(1, 3))
    profiles = []
    for g in range(num_types):
        tputs = [[draw(_TPUT) for _ in range(n)] for _ in range(n)]
        cost = draw(st.sampled_from([0.7, 1.01, 2.5, 3.67, 7.5]))
        profiles.append(profile(f"G{g}", cost, tputs, n))
    histogram = [[draw(st.sampled_from([0.0, 0.1, 0.3, 1.0])) for _ in range(n)] for _ in range(n)]
    # traffic only where some type serves it (infeasible buckets have their own test)
    histogram = [
        [h if any(p.tputs[i][j] > 0 for p in profiles) else 0.0 for j, h in enumerate(row)]
        for i, row in enumerate(histogram)
    ]
    if not any(map(any, histogram)):
        histogram[0][0] = 0.0
        rate = 0.0
    else:
        rate = draw(st.sampled_from([0.5, 2.0, 7.0, 15.0, 40.0]))
    return profiles, workload(rate, histogram, draw(st.integers(1, 3)))


_SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(problems())
def test_greedy_at_least_ilp_at_least_lp_bound_and_the_plan_serves(
    problem: tuple[list[GpuProfile], Workload],
) -> None:
    profiles, work = problem
    plan = solve(profiles, work)
    assert plan.greedy_cost is not None and plan.lp_bound is not None
    assert plan.greedy_cost >= plan.cost - 1e-9
    assert plan.cost >= plan.lp_bound - 1e-6
    assert_serves(plan, profiles, work)


@_SETTINGS
@given(problems())
def test_highs_finds_cbcs_optimum(problem: tuple[list[GpuProfile], Workload]) -> None:
    profiles, work = problem
    highs = solve(profiles, work)
    cbc = solve(profiles, work, backend="cbc")
    assert highs.cost == pytest.approx(cbc.cost, abs=1e-6)


@_SETTINGS
@given(problems(), st.integers(0, 2))
def test_a_dominated_gpu_type_never_raises_the_cost(
    problem: tuple[list[GpuProfile], Workload], which: int
) -> None:
    profiles, work = problem
    model = profiles[which % len(profiles)]
    dominated = GpuProfile(
        "slower",
        model.cost * 1.5 + 0.1,
        tuple(tuple(v / 2 for v in row) for row in model.tputs),
        model.out_ticks,
        model.in_ticks,
    )
    assert solve([*profiles, dominated], work).cost == pytest.approx(solve(profiles, work).cost)


@_SETTINGS
@given(problems(), st.integers(0, 4))
def test_caps_and_minimums_hold_or_infeasible_is_true(
    problem: tuple[list[GpuProfile], Workload], cap: int
) -> None:
    profiles, work = problem
    first = profiles[0].gpu
    limits = Limits(available={first: cap}, min_replicas={first: min(cap, 1)})
    try:
        plan = solve(profiles, work, limits)
    except Infeasible:
        # then even the LP cannot carry it: with only `first` capped, every other type is
        # unlimited, so some cell with traffic is served by `first` alone and needs > cap
        alone = [
            (i, j)
            for i, row in enumerate(work.histogram)
            for j, share in enumerate(row)
            if share > 0 and all(p.tputs[i][j] == 0 for p in profiles[1:])
        ]
        assert alone
        total = sum(map(sum, work.histogram))
        need = sum(
            work.rate * work.histogram[i][j] / total / profiles[0].tputs[i][j] for i, j in alone
        )
        assert need > cap - 1e-9
        return
    assert min(cap, 1) <= plan.gpus[first] <= cap
    assert_serves(plan, profiles, work)


# --- the CLI ----------------------------------------------------------------------------


def _melange_file(tmp_path: Path) -> Path:
    path = tmp_path / "example.json"
    path.write_text(
        json.dumps(
            {
                "gpu_info": {
                    "A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
                    "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]},
                },
                "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],
                "total_request_rate": 30.0,
                "slice_factor": 1,
            }
        )
    )
    return path


def test_cli_solve_json_prints_the_issue_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shoal.cli import main

    code = main(["placement", "solve", "--profile", str(_melange_file(tmp_path)), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out.keys() == {"gpus", "cost", "lp_bound", "greedy_cost", "solve_s", "status"}
    assert out["gpus"] == {"A10G": 3, "A100-80GB": 1}
    assert out["cost"] == pytest.approx(6.70) and out["status"] == "optimal"


def test_cli_solve_with_aibrix_profiles_and_a_workload_on_other_ticks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from control.placement.formats import profile_to_json
    from shoal.cli import main

    ticks = (128, 1024)
    paths = []
    for p in (A10G, A100):
        on_ticks = GpuProfile(p.gpu, p.cost, p.tputs, ticks, ticks)
        paths += ["--profile", str(tmp_path / f"{p.gpu}.json")]
        Path(paths[-1]).write_text(json.dumps(profile_to_json(on_ticks)))
    # the router's powers of two: 64 -> tick 128, 512 -> tick 1024
    workload_file = tmp_path / "w.json"
    workload_file.write_text(
        json.dumps(
            {
                "rate": 30,
                "histogram": [[0.2, 0.1], [0.5, 0.2]],
                "indexes": [[64, 512], [64, 512]],
                "slice_factor": 1,
            }
        )
    )
    plan_file = tmp_path / "plan.json"
    code = main(
        [
            "placement",
            "solve",
            *paths,
            "--workload",
            str(workload_file),
            "--json",
            "--plan-out",
            str(plan_file),
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    assert json.loads(captured.out)["gpus"] == {"A10G": 3, "A100-80GB": 1}
    assert "moved onto the profiles' ticks" in captured.err
    full = json.loads(plan_file.read_text())
    assert full["indexes"] == [[128, 1024], [128, 1024]]
    a10g, a100 = full["assignment"]["A10G"], full["assignment"]["A100-80GB"]
    assert sum(map(sum, a10g)) == 1.0  # one whole cell on the A10Gs (see the example test)
    assert [
        [x + y for x, y in zip(*rows, strict=True)] for rows in zip(a10g, a100, strict=True)
    ] == [
        [1.0, 1.0],
        [1.0, 1.0],
    ]


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from shoal.cli import main

    example = str(_melange_file(tmp_path))
    tight = ["--available", "A10G=1", "--available", "A100-80GB=0"]
    assert main(["placement", "solve", "--profile", example, *tight]) == 3
    assert "infeasible" in capsys.readouterr().err
    assert main(["placement", "solve", "--profile", str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    assert main(["placement", "solve", "--profile", example, "--available", "H100=1"]) == 2


def test_cli_table_compares_with_each_single_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from shoal.cli import main

    assert main(["placement", "solve", "--profile", str(_melange_file(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "total 6.70 per hour (optimal" in out
    assert "A10G 12.12 (+81%), A100-80GB 7.34 (+10%)" in out
