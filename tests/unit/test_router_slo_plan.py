"""The slo strategy with a placement plan (issue 14): a request's cell, its GPU type from
its id over the cell's shares, the fastest engine of that type within the SLO, and the
plan-less decision whenever the plan cannot be followed; the plan document's reading."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace

import pytest

from router.errors import BadPlan
from router.plan import PlanPoller
from router.strategies.placement import (
    cell_of,
    pick_gpu_type,
    place,
    placed_gpu_type,
    plan_from_json,
    traffic_row,
    unit_hash,
)
from router.types import EngineView, PlacementPlan, RouteRequest
from tests.unit.router_factories import MODEL, Picker, engine, loaded, make, request

OUT_TICKS = (64, 256, 1024)
IN_TICKS = (128, 1024, 8192)


def plan(shares: Mapping[str, Sequence[Sequence[float]]], model: str = "") -> PlacementPlan:
    return PlacementPlan(
        OUT_TICKS, IN_TICKS, {g: tuple(tuple(r) for r in m) for g, m in shares.items()}, model
    )


def everywhere(share: float) -> list[list[float]]:
    return [[share] * len(IN_TICKS) for _ in OUT_TICKS]


def cell_only(i: int, j: int, share: float, elsewhere: float) -> list[list[float]]:
    matrix = everywhere(elsewhere)
    matrix[i][j] = share
    return matrix


def typed(index: int, gpu_type: str, **kwargs: object) -> EngineView:
    return replace(engine(index, **kwargs), gpu_type=gpu_type)  # type: ignore[arg-type]


def ask(
    tokens: int = 100, max_tokens: int = 50, request_id: str = "", **kw: object
) -> RouteRequest:
    r = request(tokens=tokens, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]
    return replace(r, request_id=request_id) if request_id else r


def slo_picker(current: PlacementPlan | None) -> Picker:
    return Picker(make("slo", placement=lambda: current))


# ---- the cell ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "cell"),
    [
        (1, 1, (0, 0)),
        (128, 64, (0, 0)),  # at a tick: that tick's cell
        (129, 65, (1, 1)),  # just above: the next
        (1024, 256, (1, 1)),
        (8000, 1000, (2, 2)),
        (100_000, 5000, (2, 2)),  # above the last tick: the last cell
    ],
)
def test_a_request_belongs_to_the_smallest_tick_at_or_above_its_lengths(
    prompt: int, max_tokens: int, cell: tuple[int, int]
) -> None:
    assert cell_of(plan({"A": everywhere(1.0)}), prompt, max_tokens) == cell


# ---- the pick ---------------------------------------------------------------------------


def test_the_pick_cuts_zero_to_one_by_the_shares_in_gpu_name_order() -> None:
    p = plan({"B": everywhere(0.75), "A": everywhere(0.25)})
    assert [pick_gpu_type(p, (0, 0), u) for u in (0.0, 0.2499, 0.25, 0.9999)] == [
        "A", "A", "B", "B"]  # fmt: skip


def test_shares_that_do_not_sum_to_one_are_normalised_and_a_zero_share_is_never_picked() -> None:
    p = plan({"A": everywhere(2.0), "B": everywhere(0.0), "C": everywhere(6.0)})
    assert [pick_gpu_type(p, (1, 1), u) for u in (0.0, 0.2499, 0.25, 0.999999)] == [
        "A", "A", "C", "C"]  # fmt: skip


def test_a_cell_without_traffic_picks_nothing() -> None:
    p = plan({"A": cell_only(2, 0, 0.0, 1.0), "B": cell_only(2, 0, 0.0, 0.0)})
    assert pick_gpu_type(p, (2, 0), 0.5) is None
    assert pick_gpu_type(p, (0, 0), 0.5) == "A"


def test_shares_hold_over_many_request_ids_within_binomial_noise() -> None:
    p = plan({"A": everywhere(0.3), "B": everywhere(0.6), "C": everywhere(0.1)})
    n = 20_000
    picks = [placed_gpu_type(p, ask(request_id=f"req-{k}"), 100) for k in range(n)]
    for gpu, share in (("A", 0.3), ("B", 0.6), ("C", 0.1)):
        sigma = math.sqrt(share * (1 - share) / n)
        assert abs(picks.count(gpu) / n - share) < 5 * sigma, gpu  # 5 sigma: ~6e-7 to fail


def test_the_pick_is_a_function_of_the_request_id_so_replicas_and_retries_agree() -> None:
    p = plan({"A": everywhere(0.5), "B": everywhere(0.5)})
    first = [placed_gpu_type(p, ask(request_id=f"id-{k}"), 100) for k in range(50)]
    again = [placed_gpu_type(p, ask(request_id=f"id-{k}"), 100) for k in range(50)]
    assert first == again and set(first) == {"A", "B"}
    assert all(0.0 <= unit_hash(f"id-{k}") < 1.0 for k in range(50))


def test_a_plan_made_for_another_model_says_nothing() -> None:
    p = plan({"A": everywhere(1.0)}, model="other-model")
    assert placed_gpu_type(p, ask(), 100) is None
    assert placed_gpu_type(replace(p, model=MODEL), ask(), 100) == "A"


def test_a_row_without_traffic_walks_to_the_nearest_row_with_traffic_lower_first() -> None:
    # review finding 10: the router's row comes from max_tokens, the plan's from actual
    # completion tokens, so requests mostly land in rows where the plan has no traffic
    shares = [[0.0, 0.0, 0.0] for _ in OUT_TICKS]
    shares[0][0] = shares[2][0] = 1.0  # column 0: rows 0 and 2; column 1: row 2 only
    shares[2][1] = 1.0
    p = plan({"A": shares})
    assert [traffic_row(p, (i, 0)) for i in range(3)] == [0, 0, 2]  # row 1: lower first
    assert [traffic_row(p, (i, 1)) for i in range(3)] == [2, 2, 2]
    assert traffic_row(p, (1, 2)) is None  # no traffic in column 2 at all
    assert place(p, ask(tokens=100, max_tokens=50), 100) == ("A", "plan")
    assert place(p, ask(tokens=100, max_tokens=256), 100) == ("A", "nearest_row")
    assert place(p, ask(tokens=5000, max_tokens=50), 5000) == (None, "no_share")
    other = plan({"A": everywhere(1.0)}, model="other-model")
    assert place(other, ask(), 100) == (None, "no_share")


def test_the_walk_takes_the_shares_of_the_row_it_finds() -> None:
    a = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    b = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
    p = plan({"A": a, "B": b})
    # row 1 is one away from both: the lower row 0 (all A) wins
    picks = {placed_gpu_type(p, ask(max_tokens=256, request_id=f"r{k}"), 100) for k in range(20)}
    assert picks == {"A"}
    picks = {placed_gpu_type(p, ask(max_tokens=900, request_id=f"r{k}"), 100) for k in range(20)}
    assert picks == {"B"}


# ---- the strategy -----------------------------------------------------------------------


def test_a_cells_requests_go_to_the_planned_type_even_when_another_is_faster() -> None:
    # small cell (0, 0) -> A, everything else -> B; B's engine is idle, A's is busier
    p = plan({"A": cell_only(0, 0, 1.0, 0.0), "B": cell_only(0, 0, 0.0, 1.0)})
    fleet = [loaded(typed(0, "A"), 3, 300), typed(1, "B")]
    picker = slo_picker(p)
    assert picker.pick_id(ask(tokens=100, max_tokens=50), fleet) == "e0"
    assert picker.strategy.reason(fleet[0], None) == "plan"
    assert picker.pick_id(ask(tokens=2000, max_tokens=50), fleet) == "e1"
    assert picker.pick_id(ask(tokens=100, max_tokens=500), fleet) == "e1"


def test_among_the_planned_types_engines_the_fastest_predicted_wins() -> None:
    p = plan({"B": everywhere(1.0)})
    fleet = [typed(0, "A"), loaded(typed(1, "B"), 4, 800), loaded(typed(2, "B"), 1, 100)]
    assert slo_picker(p).pick_id(ask(), fleet) == "e2"


def test_without_an_engine_of_the_planned_type_the_plan_less_decision_stands() -> None:
    p = plan({"C": everywhere(1.0)})
    fleet = [loaded(typed(0, "A"), 2, 200), typed(1, "B")]
    picker = slo_picker(p)
    assert picker.pick_id(ask(), fleet) == "e1"  # the fastest, as without a plan
    assert picker.strategy.reason(fleet[1], None) == "slo-met"


def test_when_the_planned_types_engines_would_break_the_slo_the_others_are_considered() -> None:
    p = plan({"A": everywhere(1.0)})
    late = loaded(typed(0, "A"), 10, 20_000)  # (20000 + 10 x 32) x 2e-4 s queued: over 2 s
    fleet = [late, typed(1, "B")]
    picker = slo_picker(p)
    assert picker.pick_id(ask(), fleet) == "e1"
    assert picker.strategy.reason(fleet[1], None) == "slo-met"
    # and when everyone breaks it, the least bad of all, not the planned type's
    fleet = [late, loaded(typed(1, "B"), 10, 15_000)]
    assert picker.pick_id(ask(), fleet) == "e1"
    assert picker.strategy.reason(fleet[1], None) == "slo-missed"


def test_a_saturated_engine_of_the_planned_type_is_not_chosen() -> None:
    p = plan({"A": everywhere(1.0)})
    fleet = [loaded(typed(0, "A"), 4, 100), typed(1, "B")]
    strategy = make("slo", placement=lambda: p, max_in_flight_per_engine=4)
    assert Picker(strategy).pick_id(ask(), fleet) == "e1"


def test_no_plan_or_engines_without_a_gpu_type_route_as_before() -> None:
    fleet = [loaded(typed(0, "A"), 2, 200), typed(1, "B")]
    assert slo_picker(None).pick_id(ask(), fleet) == "e1"
    untyped = [loaded(engine(0), 2, 200), engine(1)]
    assert slo_picker(plan({"A": everywhere(1.0)})).pick_id(ask(), untyped) == "e1"


def test_the_plan_is_read_per_request_so_a_new_plan_applies_at_once() -> None:
    current: list[PlacementPlan | None] = [plan({"A": everywhere(1.0)})]
    picker = Picker(make("slo", placement=lambda: current[0]))
    fleet = [loaded(typed(0, "A"), 1, 100), typed(1, "B")]  # without a plan: e1, idle
    picks = []
    for shares in ({"A": everywhere(1.0)}, {"B": everywhere(1.0)}, {"A": everywhere(1.0)}, None):
        current[0] = None if shares is None else plan(shares)
        picks.append(picker.pick_id(ask(), fleet))
    assert picks == ["e0", "e1", "e0", "e1"]


def test_each_decision_counts_its_placement_outcome() -> None:
    outcomes: list[str] = []
    current: list[PlacementPlan | None] = [None]
    picker = Picker(make("slo", placement=lambda: current[0], count_placement=outcomes.append))
    fleet = [typed(0, "A"), typed(1, "B")]
    shares = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    picker.pick_id(ask(), fleet)  # no plan
    current[0] = plan({"A": shares})
    picker.pick_id(ask(tokens=100, max_tokens=50), fleet)  # its own cell
    picker.pick_id(ask(tokens=100, max_tokens=1000), fleet)  # walked from row 2 to row 0
    picker.pick_id(ask(tokens=5000, max_tokens=50), fleet)  # column 2 has no traffic
    current[0] = plan({"C": everywhere(1.0)})
    picker.pick_id(ask(), fleet)  # no engine of type C: the plan-less decision
    assert outcomes == ["no_plan", "plan", "nearest_row", "no_share", "fallback"]


def test_the_router_metrics_count_placement_outcomes() -> None:
    from router.metrics import PLACEMENT_OUTCOMES, RouterMetrics

    metrics = RouterMetrics()
    metrics.count_placement("nearest_row")
    metrics.count_placement("nearest_row")
    sample = metrics.registry.get_sample_value
    name = "shoal_router_placement_decisions_total"
    assert sample(name, {"outcome": "nearest_row"}) == 2.0
    assert [sample(name, {"outcome": o}) for o in PLACEMENT_OUTCOMES if o != "nearest_row"] == [
        0.0
    ] * 4


# ---- the poller's verdict (virtual time; its HTTP is the integration test's) ---------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_polled_plan_lasts_three_intervals_and_a_failed_poll_ends_it_at_once() -> None:
    clock = Clock()
    poller = PlanPoller("http://planner:8091", interval_s=5.0, clock=clock)
    assert poller.url == "http://planner:8091/v1/plan"
    assert poller.current() is None
    accepted = poller.accept(document())
    assert poller.current() == accepted
    clock.now += 15.0
    assert poller.current() == accepted  # three intervals: still confirmed
    clock.now += 0.001
    assert poller.current() is None  # not confirmed for longer: stale
    poller.accept(document())
    assert poller.current() is not None
    poller.fail("refused")
    assert poller.current() is None and poller.num_failures == 1
    with pytest.raises(BadPlan):
        poller.accept(document(indexes=[]))
    assert poller.current() is None


def test_failures_are_logged_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    poller = PlanPoller("http://planner:8091", interval_s=5.0, clock=Clock())
    caplog.set_level(logging.DEBUG, logger="shoal.router.plan")
    for _ in range(3):
        poller.fail("refused")
    poller.accept(document())
    poller.fail("answered 500")
    levels = [(r.levelno, r.getMessage().split(": ")[-1]) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "refused; routing without one"),
        (logging.DEBUG, "refused; routing without one"),
        (logging.DEBUG, "refused; routing without one"),
        (logging.INFO, "placement plan from http://planner:8091/v1/plan available again"),
        (logging.WARNING, "answered 500; routing without one"),
    ]


# ---- the plan document ------------------------------------------------------------------


def document(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "gpus": {"A": 1, "B": 2},
        "cost": 6.7,
        "status": "optimal",
        "assignment": {"A": [[1.0, 0.0], [0.5, 0.0]], "B": [[0.0, 1.0], [0.5, 1.0]]},
        "indexes": [[64, 512], [128, 2048]],
        "model": "llama",
        "created": 1_700_000_000.5,
    }
    base.update(changes)
    return base


def test_a_plan_document_becomes_ticks_shares_and_model() -> None:
    p = plan_from_json(document())
    assert (p.out_ticks, p.in_ticks, p.model, p.created) == (
        (64, 512), (128, 2048), "llama", 1_700_000_000.5)  # fmt: skip
    assert p.shares == {"A": ((1.0, 0.0), (0.5, 0.0)), "B": ((0.0, 1.0), (0.5, 1.0))}
    assert plan_from_json(document(model=None, created=None)).model == ""


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"indexes": [[64, 512]]}, "indexes"),
        ({"indexes": [[512, 64], [128, 2048]]}, "strictly increasing"),
        ({"indexes": [[0, 64], [128, 2048]]}, "positive integers"),
        ({"assignment": [[1.0]]}, "assignment"),
        ({"assignment": {"A": [[1.0, 0.0]]}}, "2 rows"),
        ({"assignment": {"A": [[1.0], [1.0]]}}, "2 shares"),
        ({"assignment": {"A": [[1.0, -0.5], [1.0, 0.0]]}}, "negative"),
        ({"assignment": {"A": [[1.0, "x"], [1.0, 0.0]]}}, "numbers"),
        ({"model": 3}, "model"),
        ({"indexes": [list(range(1, 66)), [128, 2048]]}, "1 to 64"),
        ({"assignment": {f"T{k}": [[0.0, 0.0], [0.0, 0.0]] for k in range(65)}}, "64 GPU"),
    ],
)
def test_a_malformed_plan_is_refused_naming_the_field(
    changes: dict[str, object], words: str
) -> None:
    with pytest.raises(BadPlan, match=words):
        plan_from_json(document(**changes))
    with pytest.raises(BadPlan, match="JSON object"):
        plan_from_json([1, 2])


def test_a_plan_answer_over_the_limit_is_not_read() -> None:
    # review finding 8: the plan was read whole (reply.json()) whatever its size
    import asyncio

    from router.plan import MAX_PLAN_BYTES
    from shoal.bodies import read_capped

    class Content:
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def readany(self) -> bytes:
            return self.chunks.pop(0) if self.chunks else b""

    class Reply:
        content_length = None

        def __init__(self, chunks: list[bytes]) -> None:
            self.content = Content(chunks)

    assert asyncio.run(read_capped(Reply([b"{}", b" "]), 3)) == b"{} "
    assert asyncio.run(read_capped(Reply([b"{}", b"  "]), 3)) is None
    assert MAX_PLAN_BYTES == 1 << 20
