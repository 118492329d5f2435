"""The placement planner's rounds (control/placement/planner.py) on virtual time.

A stand-in solver (the real one is tested in test_placement_solver.py) and memory pools:
what is specified here is the loop — what a round does with the router's sizes, the
solver's answer or failure, smoothing and the pools — not the ILP.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from control.autoscale.actuators.memory import MemoryActuator
from control.placement.errors import Infeasible, SolverError
from control.placement.planner import (
    DiscoveryWriter,
    Planner,
    RequestSizes,
    SizesUnavailable,
    parse_request_sizes,
    workload_from,
)
from control.placement.smoothing import Smoother
from control.placement.types import GpuProfile, Limits, Matrix, Plan, Workload

OUT_TICKS = (16, 256)  # short and long completions
IN_TICKS = (64,)
SMALL = GpuProfile("A10G", 1.0, ((2.0,), (0.0,)), OUT_TICKS, IN_TICKS)  # short only, 2 req/s
BIG = GpuProfile("A100", 3.0, ((4.0,), (1.0,)), OUT_TICKS, IN_TICKS)  # both; 1 req/s long


def stand_in_solve(
    profiles: Sequence[GpuProfile],
    workload: Workload,
    limits: Limits | None = None,
    *,
    time_limit_s: float = 10.0,
    backend: str = "highs",
    best_effort: bool = False,
) -> Plan:
    """Each cell to the type with the lowest cost per request/s that its cap allows;
    replicas per type = ceil(load); Infeasible when a cell has no type left (no best
    effort: the real solver's is tested in test_placement_solver.py)."""
    limits = limits or Limits()
    load = {p.gpu: 0.0 for p in profiles}
    assignment: dict[str, list[list[float]]] = {
        p.gpu: [[0.0] * len(workload.in_ticks) for _ in workload.out_ticks] for p in profiles
    }
    for i, row in enumerate(workload.histogram):
        for j, share in enumerate(row):
            rate = workload.rate * share
            if rate == 0:
                continue
            able = sorted(
                (p.cost / p.tputs[i][j], p.gpu, p.tputs[i][j]) for p in profiles if p.tputs[i][j]
            )
            for _, gpu, tput in able:
                cap = limits.available.get(gpu)
                if cap is None or math.ceil(load[gpu] + rate / tput - 1e-9) <= cap:
                    load[gpu] += rate / tput
                    assignment[gpu][i][j] = 1.0
                    break
            else:
                raise Infeasible("no type left", ((workload.out_ticks[i], workload.in_ticks[j]),))
    gpus = {g: max(math.ceil(x - 1e-9), limits.min_replicas.get(g, 0)) for g, x in load.items()}
    cost = sum(n * p.cost for p in profiles for g, n in gpus.items() if g == p.gpu)
    matrices: dict[str, Matrix] = {g: tuple(map(tuple, m)) for g, m in assignment.items()}
    return Plan(gpus, cost, "optimal", 0.001, lp_bound=cost, greedy_cost=cost, assignment=matrices)


def identity_rebin(
    counts: Matrix,
    out_edges: Sequence[int],
    in_edges: Sequence[int],
    out_ticks: Sequence[int],
    in_ticks: Sequence[int],
) -> Matrix:
    assert (tuple(out_edges), tuple(in_edges)) == (tuple(out_ticks), tuple(in_ticks))
    return counts


def sizes(short: int = 0, long: int = 0, span_s: float = 10.0) -> RequestSizes:
    count = short + long
    return RequestSizes(
        count=count,
        rate=count / span_s,
        span_s=span_s,
        out_edges=OUT_TICKS,
        in_edges=IN_TICKS,
        counts=((float(short),), (float(long),)),
        window_s=60.0,
    )


class Source:
    """The router as the test scripts it: the next answer, or the next failure."""

    def __init__(self) -> None:
        self.answer: RequestSizes | Exception = sizes()
        self.closed = False

    async def fetch(self) -> RequestSizes:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Fleet:
    def __init__(
        self,
        *,
        delay_s: float = 60.0,
        min_saving: float = 0.05,
        limits: Limits | None = None,
        dry_run: bool = False,
        solve: Any = stand_in_solve,
    ) -> None:
        self.clock = Clock()
        self.source = Source()
        self.pools = {
            "A10G": MemoryActuator(clock=self.clock),
            "A100": MemoryActuator(clock=self.clock),
        }
        self.planner = Planner(
            [SMALL, BIG],
            self.pools,
            self.source,
            solve=solve,
            rebin=identity_rebin,
            limits=limits,
            smoother=Smoother(
                ("A10G", "A100"),
                {"A10G": 1.0, "A100": 3.0},
                scale_down_delay_s=delay_s,
                min_saving=min_saving,
            ),
            headroom=1.0,
            interval_s=30.0,
            dry_run=dry_run,
            model="m",
            clock=self.clock,
            wall_clock=lambda: 1_700_000_000.0 + self.clock.now,
        )

    def round_at(self, t: float, answer: RequestSizes | Exception | None = None) -> Any:
        self.clock.now = t
        if answer is not None:
            self.source.answer = answer
        return asyncio.run(self.planner.run_round())

    def specs(self) -> dict[str, int]:
        return {gpu: pool.state_nowait().spec for gpu, pool in self.pools.items()}

    def metric(self, name: str, **labels: str) -> float | None:
        return self.planner.metrics.registry.get_sample_value(name, labels or None)


def test_parse_request_sizes_reads_the_agreed_shape_and_rejects_others() -> None:
    data = {
        "model": "m", "window_s": 300, "span_s": 120.0, "count": 6, "rate": 0.05,
        "out_edges": [16, 32], "in_edges": [16], "counts": [[4], [2]],
    }  # fmt: skip
    parsed = parse_request_sizes(data)
    assert parsed == RequestSizes(6, 0.05, 120.0, (16, 32), (16,), ((4.0,), (2.0,)), 300.0, "m")
    with pytest.raises(SizesUnavailable, match="agreed shape"):
        parse_request_sizes({k: v for k, v in data.items() if k != "counts"})
    with pytest.raises(SizesUnavailable, match="do not match"):
        parse_request_sizes({**data, "counts": [[4, 1], [2, 0]]})


def test_workload_is_the_window_rate_times_headroom_with_shares() -> None:
    w = workload_from(
        sizes(short=30, long=10), OUT_TICKS, IN_TICKS, headroom=1.1, slice_factor=2,
        rebin=identity_rebin,
    )  # fmt: skip
    assert w == Workload(4.0 * 1.1, ((0.75,), (0.25,)), OUT_TICKS, IN_TICKS, 2)
    empty = workload_from(sizes(), OUT_TICKS, IN_TICKS, headroom=1.1, slice_factor=2,
                          rebin=identity_rebin)  # fmt: skip
    assert empty == Workload(0.0, ((0.0,), (0.0,)), OUT_TICKS, IN_TICKS, 2)


def test_the_plan_follows_the_mix_between_pools() -> None:
    fleet = Fleet(delay_s=60.0)
    first = fleet.round_at(0.0, sizes(short=60))  # 6 req/s short: 3 A10G at $1 beat A100s
    assert (first.status, first.reason, dict(first.targets)) == (
        "optimal",
        "scale-up",  # from the empty pools it found
        {"A10G": 3, "A100": 0},
    )
    assert fleet.specs() == {"A10G": 3, "A100": 0}
    moved = fleet.round_at(30.0, sizes(long=20))  # 2 req/s long: only A100 serves them
    assert (moved.reason, dict(moved.optimum), dict(moved.targets)) == (
        "no-longer-serves",
        {"A10G": 0, "A100": 2},
        {"A10G": 3, "A100": 2},
    )
    assert fleet.specs() == {"A10G": 3, "A100": 2}  # A100 at once, A10G for the delay
    fleet.round_at(60.0)
    assert fleet.specs() == {"A10G": 3, "A100": 2}
    fleet.round_at(91.0)  # the 3 A10G were last asked for at t=0: past the 60 s delay
    assert fleet.specs() == {"A10G": 0, "A100": 2}
    assert fleet.pools["A10G"].scale_calls == [3, 0]
    assert fleet.pools["A100"].scale_calls == [2]
    assert fleet.metric("shoal_placement_target_replicas", gpu_type="A100") == 2.0
    assert fleet.metric("shoal_placement_plan_cost") == 6.0
    assert fleet.metric("shoal_placement_solves_total", status="optimal") == 4.0
    assert fleet.planner.plan is not None and dict(fleet.planner.plan.gpus) == {
        "A10G": 0, "A100": 2
    }  # fmt: skip


def test_the_served_plan_is_the_held_mix_not_the_optimum() -> None:
    # 2 A100 (6.0) serve 8 req/s of short requests; the optimum 4 A10G (4.0) saves 33 %,
    # under a 40 % threshold: the A100s stay, and the plan sends the cell to them.
    fleet = Fleet(delay_s=0.0, min_saving=0.4)
    fleet.round_at(0.0, sizes(long=20))
    held = fleet.round_at(30.0, sizes(short=80))
    assert (held.reason, dict(held.optimum), dict(held.targets)) == (
        "held",
        {"A10G": 4, "A100": 0},
        {"A10G": 0, "A100": 2},
    )
    plan = fleet.planner.plan
    assert plan is not None
    assert (dict(plan.gpus), plan.cost) == ({"A10G": 0, "A100": 2}, 6.0)
    assert plan.assignment["A100"] == ((1.0,), (0.0,))


@pytest.mark.parametrize(
    ("failure", "status", "stage"),
    [
        (Infeasible("caps too small", ((256, 64),)), "infeasible", "solve"),
        (SolverError("highspy is not installed"), "error", "solve"),
        (ZeroDivisionError("a solver bug"), "error", "solve"),
    ],
)
def test_a_failing_solver_keeps_the_last_plan(failure: Exception, status: str, stage: str) -> None:
    fails = False

    def solve(*args: Any, **kwargs: Any) -> Plan:
        if fails:
            raise failure
        return stand_in_solve(*args, **kwargs)

    fleet = Fleet(delay_s=0.0, solve=solve)
    fleet.round_at(0.0, sizes(short=60))
    before = fleet.planner.plan
    fails = True
    held = fleet.round_at(30.0, sizes(long=5))
    assert (held.status, held.targets) == (status, {})
    assert held.error
    assert fleet.planner.plan is before
    assert fleet.specs() == {"A10G": 3, "A100": 0}
    assert fleet.metric("shoal_placement_solves_total", status=status) == 1.0
    assert fleet.metric("shoal_placement_errors_total", stage=stage) == 1.0
    assert fleet.planner.status()["errors"][-1]["stage"] == stage


def test_an_unreadable_router_keeps_the_last_plan() -> None:
    fleet = Fleet(delay_s=0.0)
    fleet.round_at(0.0, sizes(short=20))
    held = fleet.round_at(30.0, SizesUnavailable("router: connection refused"))
    assert (held.status, held.error) == ("no-sizes", "router: connection refused")
    assert fleet.specs() == {"A10G": 1, "A100": 0}
    assert fleet.metric("shoal_placement_errors_total", stage="fetch") == 1.0


def test_before_any_plan_the_pools_are_left_alone_and_there_is_no_plan() -> None:
    fleet = Fleet()
    fleet.pools["A10G"] = MemoryActuator(2, clock=fleet.clock)
    fleet.planner.pools["A10G"] = fleet.pools["A10G"]
    fleet.round_at(0.0, SizesUnavailable("down"))
    assert fleet.specs() == {"A10G": 2, "A100": 0}
    assert fleet.planner.plan is None
    assert fleet.planner.plan_json() is None


@pytest.mark.parametrize(("floor", "after"), [({}, 0), ({"A10G": 1}, 1)])
def test_an_empty_window_scales_to_the_minimum_after_the_delay(
    floor: Mapping[str, int], after: int
) -> None:
    fleet = Fleet(delay_s=60.0, limits=Limits(min_replicas=floor))
    fleet.round_at(0.0, sizes(short=60))
    empty = fleet.round_at(30.0, sizes())
    assert (empty.status, dict(empty.optimum)) == ("empty", {"A10G": after, "A100": 0})
    assert fleet.specs() == {"A10G": 3, "A100": 0}
    fleet.round_at(61.0)
    assert fleet.specs() == {"A10G": after, "A100": 0}
    assert fleet.metric("shoal_placement_solves_total", status="empty") == 2.0


def test_a_dry_run_plans_and_scales_nothing() -> None:
    fleet = Fleet(dry_run=True)
    record = fleet.round_at(0.0, sizes(short=60))
    assert dict(record.targets) == {"A10G": 3, "A100": 0}
    assert fleet.specs() == {"A10G": 0, "A100": 0}
    assert fleet.pools["A10G"].scale_calls == []
    pools = fleet.planner.status()["pools"]
    assert pools["A10G"] == {"target": 3, "spec": 0, "ready": 0, "pending": 0}


def test_a_failing_pool_is_counted_and_the_others_still_scale() -> None:
    fleet = Fleet()
    fleet.round_at(0.0, sizes())  # every pool read: seeded
    fleet.pools["A10G"].fail_next = 1  # the next round's read of the pool
    record = fleet.round_at(30.0, sizes(short=20, long=10))
    assert (record.reason, dict(record.targets)) == ("scale-up", {"A10G": 1, "A100": 1})
    assert fleet.specs() == {"A10G": 0, "A100": 1}
    assert fleet.metric("shoal_placement_errors_total", stage="state") == 1.0
    asyncio.run(fleet.planner.sync_pools())  # the next pool check catches up
    assert fleet.specs() == {"A10G": 1, "A100": 1}


def test_no_targets_until_every_pool_was_read_once() -> None:
    # review finding 3: a restart whose first read of one pool fails must not take that
    # pool for empty (the first optimum would be adopted at once, without the delay)
    fleet = Fleet(delay_s=60.0)
    for gpu, n in (("A10G", 3), ("A100", 2)):
        fleet.pools[gpu] = fleet.planner.pools[gpu] = MemoryActuator(n, clock=fleet.clock)
    fleet.pools["A100"].fail_next = 1
    first = fleet.round_at(0.0, sizes())  # an empty window: the router restarted too
    assert (first.status, dict(first.targets)) == ("unseeded", {})
    assert "A100" in first.error
    assert fleet.planner.targets is None
    assert fleet.specs() == {"A10G": 3, "A100": 2}
    second = fleet.round_at(30.0)  # the round's second read of A100 succeeded: seeded
    assert (second.reason, dict(second.targets)) == ("adopted", {"A10G": 3, "A100": 2})
    assert fleet.specs() == {"A10G": 3, "A100": 2}
    fleet.round_at(91.0)  # the seeded fleet drains only after the delay
    assert fleet.specs() == {"A10G": 0, "A100": 0}


def test_a_restarted_planner_shrinks_the_fleet_it_finds_only_after_the_delay() -> None:
    fleet = Fleet(delay_s=60.0)
    for gpu, n in (("A10G", 3), ("A100", 1)):
        fleet.pools[gpu] = fleet.planner.pools[gpu] = MemoryActuator(n, clock=fleet.clock)
    first = fleet.round_at(0.0, sizes())  # the router restarted too: an empty window
    assert (first.reason, dict(first.targets)) == ("adopted", {"A10G": 3, "A100": 1})
    assert fleet.specs() == {"A10G": 3, "A100": 1}
    fleet.round_at(61.0)
    assert fleet.specs() == {"A10G": 0, "A100": 0}


def test_pools_and_profiles_must_name_the_same_types() -> None:
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match="same GPU types"):
        Planner([SMALL, BIG], {"A10G": MemoryActuator()}, Source(), solve=stand_in_solve,
                rebin=identity_rebin)  # fmt: skip


def test_the_discovery_file_lists_local_engines_with_their_gpu_type(tmp_path: Path) -> None:
    path = tmp_path / "engines.json"
    writer = DiscoveryWriter(path, ["A10G", "A100"])
    assert json.loads(path.read_text()) == []
    writer.publish({"A10G": ["http://127.0.0.1:9002", "http://127.0.0.1:9001"]})
    writer.publish({"A100": ["http://127.0.0.1:9000"], "memory-type": ["x"]})
    assert json.loads(path.read_text()) == [
        {"url": "http://127.0.0.1:9000", "gpu_type": "A100"},
        {"url": "http://127.0.0.1:9001", "gpu_type": "A10G"},
        {"url": "http://127.0.0.1:9002", "gpu_type": "A10G"},
    ]
    writer.publish({"A10G": []})
    assert json.loads(path.read_text()) == [{"url": "http://127.0.0.1:9000", "gpu_type": "A100"}]


def test_one_unservable_request_does_not_freeze_the_fleet() -> None:
    # review finding 1: one long request no profile serves made every round infeasible
    blind = GpuProfile("A100", 3.0, ((4.0,), (0.0,)), OUT_TICKS, IN_TICKS)  # no long cell
    fleet = Fleet(delay_s=60.0, solve=None)
    fleet.planner = Planner(
        [SMALL, blind], fleet.pools, fleet.source, rebin=identity_rebin, headroom=1.0,
        smoother=fleet.planner.smoother, model="m", clock=fleet.clock,
    )  # fmt: skip
    fleet.round_at(0.0, sizes(short=20))
    assert fleet.specs() == {"A10G": 1, "A100": 0}
    record = fleet.round_at(30.0, sizes(short=400, long=1))  # 40 req/s short + 1 long
    assert (record.status, dict(record.targets)) == ("optimal", {"A10G": 20, "A100": 0})
    assert fleet.specs() == {"A10G": 20, "A100": 0}
    assert fleet.planner.plan is not None
    assert fleet.planner.plan.unserved == ((256, 64),)
    status = fleet.planner.status()["unserved"]
    assert status == {"cells": [[256, 64]], "share": pytest.approx(1 / 401)}
    assert fleet.metric("shoal_placement_unserved_share") == pytest.approx(1 / 401)
    served = fleet.planner.plan_json()
    assert served is not None and served["unserved"] == [[256, 64]]


def test_demand_above_the_caps_scales_up_to_the_caps() -> None:
    # review finding 1: 20 req/s under caps carrying 16 kept the old {A10G: 1}
    fleet = Fleet(delay_s=60.0, solve=None, limits=Limits(available={"A10G": 4, "A100": 2}))
    fleet.round_at(0.0, sizes(short=20))
    assert fleet.specs() == {"A10G": 1, "A100": 0}
    record = fleet.round_at(30.0, sizes(short=200))
    assert (record.status, dict(record.targets)) == ("capped", {"A10G": 4, "A100": 2})
    assert fleet.specs() == {"A10G": 4, "A100": 2}
    assert fleet.metric("shoal_placement_solves_total", status="capped") == 1.0
    assert fleet.planner.plan is not None and fleet.planner.plan.status == "capped"


def test_a_wake_scales_the_cheapest_type_from_zero_at_once() -> None:
    # review finding 2: at zero no request finishes, the window stays empty for ever
    fleet = Fleet(delay_s=60.0)
    fleet.round_at(0.0, sizes(short=60))
    fleet.round_at(30.0, sizes())
    fleet.round_at(61.0)
    assert fleet.specs() == {"A10G": 0, "A100": 0}
    targets = asyncio.run(fleet.planner.wake("m"))
    assert targets == {"A10G": 1, "A100": 0}  # A10G: the cheapest serving (16, 64)
    assert fleet.specs() == {"A10G": 1, "A100": 0}
    assert fleet.metric("shoal_placement_wakes_total", result="scaled") == 1.0
    fleet.round_at(91.0)  # still an empty window: the wake holds for the delay
    assert fleet.specs() == {"A10G": 1, "A100": 0}
    again = asyncio.run(fleet.planner.wake(""))  # one is starting: nothing more
    assert again == {"A10G": 1, "A100": 0}
    assert fleet.metric("shoal_placement_wakes_total", result="already") == 1.0
    fleet.round_at(122.0)
    assert fleet.specs() == {"A10G": 0, "A100": 0}


def test_a_wake_respects_the_minimum_and_refuses_another_model() -> None:
    from control.placement.errors import WrongModel

    fleet = Fleet(limits=Limits(min_replicas={"A10G": 2}))
    with pytest.raises(WrongModel, match="not other"):
        asyncio.run(fleet.planner.wake("other"))
    assert fleet.specs() == {"A10G": 0, "A100": 0}
    assert asyncio.run(fleet.planner.wake("m")) == {"A10G": 2, "A100": 0}
    assert fleet.specs() == {"A10G": 2, "A100": 0}


def test_a_wake_before_any_round_seeds_and_a_failed_read_scales_nothing() -> None:
    from control.autoscale.errors import ActuatorError

    fleet = Fleet()
    fleet.pools["A100"].fail_next = 1
    with pytest.raises(ActuatorError, match="A100"):
        asyncio.run(fleet.planner.wake("m"))
    assert fleet.specs() == {"A10G": 0, "A100": 0}
    assert fleet.metric("shoal_placement_wakes_total", result="failed") == 1.0
    assert asyncio.run(fleet.planner.wake("m")) == {"A10G": 1, "A100": 0}
    record = fleet.round_at(0.0, sizes())  # seeded by the wake: held for the delay
    assert (record.status, dict(record.targets)) == ("empty", {"A10G": 1, "A100": 0})


def test_the_wake_type_serves_the_smallest_cell() -> None:
    long_only = GpuProfile("L", 0.5, ((0.0,), (1.0,)), OUT_TICKS, IN_TICKS)
    planner = Planner([long_only, SMALL, BIG], {"L": MemoryActuator(), "A10G":
                      MemoryActuator(), "A100": MemoryActuator()}, Source(),
                      solve=stand_in_solve, rebin=identity_rebin)  # fmt: skip
    assert planner.wake_gpu == "A10G"  # L is cheaper but serves no short request
    capped = Planner([SMALL, BIG], {"A10G": MemoryActuator(), "A100": MemoryActuator()},
                     Source(), solve=stand_in_solve, rebin=identity_rebin,
                     limits=Limits(available={"A10G": 0}))  # fmt: skip
    assert capped.wake_gpu == "A100"


def test_gpu_type_names_the_router_refuses_are_refused() -> None:
    # review finding 4: the router's discovery drops the whole file for one bad gpu_type
    from shoal.errors import ConfigError

    spaced = GpuProfile("NVIDIA A100 80GB", 3.0, ((4.0,), (1.0,)), OUT_TICKS, IN_TICKS)
    with pytest.raises(ConfigError, match="A100-80GB"):
        Planner([SMALL, spaced], {"A10G": MemoryActuator(), "NVIDIA A100 80GB":
                MemoryActuator()}, Source(), solve=stand_in_solve, rebin=identity_rebin)  # fmt: skip


def test_the_planned_rate_is_the_higher_of_finished_and_arrived() -> None:
    # review finding 5: under overload the finished rate is what was served, not demand
    overloaded = RequestSizes(40, 4.0, 10.0, OUT_TICKS, IN_TICKS, ((30.0,), (10.0,)),
                              arrivals=90, arrival_rate=9.0)  # fmt: skip
    w = workload_from(overloaded, OUT_TICKS, IN_TICKS, headroom=1.1, slice_factor=2,
                      rebin=identity_rebin)  # fmt: skip
    assert w == Workload(9.0 * 1.1, ((0.75,), (0.25,)), OUT_TICKS, IN_TICKS, 2)
    quiet = RequestSizes(40, 4.0, 10.0, OUT_TICKS, IN_TICKS, ((30.0,), (10.0,)),
                         arrivals=40, arrival_rate=4.0)  # fmt: skip
    assert workload_from(quiet, OUT_TICKS, IN_TICKS, headroom=1.0, slice_factor=2,
                         rebin=identity_rebin).rate == 4.0  # fmt: skip


def test_parse_request_sizes_reads_arrivals_and_bounds_the_edges() -> None:
    data = {
        "model": "m", "window_s": 300, "span_s": 120.0, "count": 6, "rate": 0.05,
        "out_edges": [16, 32], "in_edges": [16], "counts": [[4], [2]],
        "arrivals": 12, "arrival_rate": 0.1,
    }  # fmt: skip
    parsed = parse_request_sizes(data)
    assert (parsed.arrivals, parsed.arrival_rate) == (12, 0.1)
    many = list(range(1, 66))
    with pytest.raises(SizesUnavailable, match="64 edges"):
        parse_request_sizes({**data, "in_edges": many, "counts": [[0] * 65, [0] * 65]})
    with pytest.raises(SizesUnavailable, match="arrival_rate"):
        parse_request_sizes({**data, "arrival_rate": -1})


# -- settings and flags ------------------------------------------------------------------


def test_pools_parse_in_every_documented_form() -> None:
    from control.placement.config import PlacementSettings, PoolSpec, parse_pools

    settings = PlacementSettings(
        pool="A=memory; B=local; C=kubernetes:serving/vllm-a100; D=kubernetes:vllm-h100;"
        "E=kubernetes:ns/statefulset/vllm-l4",
        pool_engine_command="B=shoal sim engine --port {port}",
    )
    assert parse_pools(settings) == (
        PoolSpec("A", "memory"),
        PoolSpec("B", "local", engine_command="shoal sim engine --port {port}"),
        PoolSpec("C", "kubernetes", namespace="serving", name="vllm-a100"),
        PoolSpec("D", "kubernetes", name="vllm-h100"),
        PoolSpec("E", "kubernetes", namespace="ns", workload_kind="statefulset", name="vllm-l4"),
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"pool": "A=local"}, "needs --pool-engine-command A="),
        ({"pool": "A=memory", "pool_engine_command": "A=x --port {port}"}, "not a local pool"),
        ({"pool": "A=local", "pool_engine_command": "A=x --port 8000"}, "with {port}"),
        ({"pool": "A=memory;A=memory"}, "names A twice"),
        ({"pool": "A=gke:x"}, "TYPE=kubernetes:"),
        ({"min_replicas": "A=-1"}, "--min-replicas"),
        ({"max_replicas": "A"}, "--max-replicas"),
        ({"headroom": 0.9}, "--headroom must be >= 1"),
        ({"min_saving": 1.0}, "--min-saving"),
        ({"backend": "cplex"}, "--backend"),
        ({"interval_s": 0.0}, "--interval-s must be > 0"),
        ({"window_s": 5.0}, "--window-s must be between 10 and 600"),
        ({"window_s": 601.0}, "--window-s must be between 10 and 600"),
        ({"slice_factor": 65}, "--slice-factor must be between 1 and 64"),
        ({"host": "0.0.0.0"}, "--auth-token-file"),
    ],
)
def test_bad_settings_name_the_fix(flags: dict[str, Any], message: str) -> None:
    from control.placement.config import PlacementSettings
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        PlacementSettings(**flags)


def test_list_flags_repeat_on_the_command_line() -> None:
    import argparse

    from control.placement.run_cli import add_verbs, settings_from_args

    parser = argparse.ArgumentParser()
    add_verbs(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(
        ["run", "--profile", "a.json", "--profile", "b.json", "--pool", "A=memory",
         "--pool", "B=local", "--pool-engine-command", "B=sim --port {port} --x 1",
         "--min-replicas", "B=1", "--dry-run"]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.profile, settings.pool, settings.pool_engine_command) == (
        "a.json;b.json",
        "A=memory;B=local",
        "B=sim --port {port} --x 1",
    )
    assert (settings.min_replicas, settings.dry_run, settings.port) == ("B=1", True, 8091)


# -- with the real solver and formats ----------------------------------------------------


def test_with_the_real_solver_the_plan_moves_and_is_served_in_the_agreed_form() -> None:
    fleet = Fleet(delay_s=0.0, solve=None)  # solver.solve through HiGHS
    fleet.round_at(0.0, sizes(short=60))
    assert fleet.specs() == {"A10G": 3, "A100": 0}
    fleet.round_at(30.0, sizes(long=20))
    assert fleet.specs() == {"A10G": 0, "A100": 2}
    served = fleet.planner.plan_json()
    assert served is not None
    assert served["gpus"] == {"A100": 2, "A10G": 0}
    assert served["assignment"]["A100"] == [[0.0], [1.0]]
    assert served["indexes"] == [list(OUT_TICKS), list(IN_TICKS)]
    assert (served["model"], served["created"]) == ("m", 1_700_000_030.0)


def test_a_solver_bug_while_weighing_the_mix_in_force_adopts_the_optimum() -> None:
    calls: list[Limits | None] = []

    def solve(profiles: Any, workload: Any, limits: Any = None, **kwargs: Any) -> Plan:
        calls.append(limits)
        if limits is not None and limits.available:  # the fit: counts as caps
            raise KeyError("a solver bug")
        return stand_in_solve(profiles, workload, limits, **kwargs)

    fleet = Fleet(delay_s=0.0, min_saving=0.4, solve=solve)
    fleet.round_at(0.0, sizes(long=20))
    record = fleet.round_at(30.0, sizes(short=80))  # 33 % saving < 40 %: asks the fit
    assert (record.reason, dict(record.targets)) == ("no-longer-serves", {"A10G": 4, "A100": 0})
    assert len(calls) == 3


def test_targets_never_exceed_the_availability_cap_even_for_a_larger_fleet_found() -> None:
    fleet = Fleet(delay_s=60.0, limits=Limits(available={"A10G": 2}))
    fleet.pools["A10G"] = fleet.planner.pools["A10G"] = MemoryActuator(5, clock=fleet.clock)
    record = fleet.round_at(0.0, sizes(short=20))  # 1 A10G needed; 5 running, cap 2
    assert dict(record.targets) == {"A10G": 2, "A100": 0}
    assert fleet.specs() == {"A10G": 2, "A100": 0}


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    async def readany(self) -> bytes:
        return self._chunks.pop(0) if self._chunks else b""


class _Reply:
    url = "http://router/v1/request_sizes"
    content_length = None

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)


def test_an_answer_over_the_limit_is_refused_not_buffered() -> None:
    # review finding 8: the router's answer was read whole, whatever its size
    from control.placement.sizes import MAX_ANSWER_BYTES
    from shoal.bodies import read_capped

    assert asyncio.run(read_capped(_Reply([b"ab", b"c"]), 3)) == b"abc"
    assert asyncio.run(read_capped(_Reply([b"ab", b"cd"]), 3)) is None
    assert MAX_ANSWER_BYTES == 1 << 20
