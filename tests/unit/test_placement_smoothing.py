"""Plan smoothing (control/placement/smoothing.py) on virtual time: exact targets per round."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from control.placement.smoothing import Smoother, mix_cost
from control.placement.types import Plan

COSTS = {"A10G": 1.01, "A100": 3.67}
GPUS = ("A100", "A10G")


def plan(a10g: int = 0, a100: int = 0, status: str = "optimal") -> Plan:
    gpus = {"A10G": a10g, "A100": a100}
    return Plan(gpus=gpus, cost=mix_cost(gpus, COSTS), status=status, solve_s=0.01)


def smoother(delay_s: float = 60.0, min_saving: float = 0.05) -> Smoother:
    return Smoother(GPUS, COSTS, scale_down_delay_s=delay_s, min_saving=min_saving)


class Fit:
    """A stand-in for the solver with the mix's counts as caps: serves or not, by decree."""

    def __init__(self, serves: bool) -> None:
        self.serves = serves
        self.calls: list[dict[str, int]] = []

    def __call__(self, mix: Mapping[str, int]) -> Plan | None:
        self.calls.append(dict(mix))
        if not self.serves:
            return None
        return Plan(gpus={"A10G": 0, "A100": 0}, cost=0.0, status="optimal", solve_s=0.0)


def never(mix: Mapping[str, int]) -> Plan | None:
    raise AssertionError(f"fit({dict(mix)}) asked where the hysteresis had nothing to decide")


def test_the_first_optimum_is_adopted_as_is() -> None:
    s = smoother()
    out = s.smooth(0.0, plan(a10g=3, a100=1), never)
    assert (out.reason, dict(out.targets), out.delayed) == ("first", {"A100": 1, "A10G": 3}, ())
    assert out.plan == plan(a10g=3, a100=1)


def test_scale_up_takes_effect_in_the_round_it_appears() -> None:
    s = smoother(delay_s=60.0)
    s.smooth(0.0, plan(a10g=2), never)
    out = s.smooth(30.0, plan(a10g=5), never)
    assert (out.reason, dict(out.targets)) == ("scale-up", {"A100": 0, "A10G": 5})


def test_scale_down_waits_until_the_smaller_count_held_for_the_delay() -> None:
    s = smoother(delay_s=60.0)
    targets = [
        dict(s.smooth(t, plan(a10g=n), never).targets)["A10G"]
        for t, n in ((0.0, 4), (30.0, 2), (60.0, 2), (90.0, 2), (120.0, 1), (150.0, 1), (180.0, 1))
    ]
    # 4 was last asked for at t=0: it leaves the window after t=60; 2 leaves after t=90.
    assert targets == [4, 4, 4, 2, 2, 2, 1]


def test_a_brief_dip_never_scales_down() -> None:
    s = smoother(delay_s=60.0)
    counts = [4, 1, 4, 1, 4]
    targets = [
        s.smooth(30.0 * k, plan(a10g=n), never).targets["A10G"] for k, n in enumerate(counts)
    ]
    assert targets == [4, 4, 4, 4, 4]


def test_without_delay_and_saving_the_targets_are_each_optimum() -> None:
    s = smoother(delay_s=0.0, min_saving=0.0)
    mixes = [(3, 1), (0, 2), (5, 0), (1, 1)]
    # Fit(False): an optimal solver is never dearer than a mix that still serves.
    out = [dict(s.smooth(float(k), plan(*m), Fit(False)).targets) for k, m in enumerate(mixes)]
    assert out == [{"A10G": a, "A100": b} for a, b in mixes]


def test_a_small_saving_keeps_the_mix_that_still_serves() -> None:
    s = smoother(delay_s=0.0, min_saving=0.05)
    s.smooth(0.0, plan(a10g=3, a100=1), never)  # 6.70
    fit = Fit(serves=True)
    out = s.smooth(30.0, plan(a10g=6), fit)  # 6.06: 9.6 % cheaper, adopted
    assert (out.reason, dict(out.targets)) == ("adopted", {"A100": 0, "A10G": 6})
    assert out.saving == pytest.approx((6.70 - 6.06) / 6.70)
    assert fit.calls == []
    # The optimum moves back to 3+1 = 6.70, dearer than the mix in force, which still
    # serves: it stays (and so does the plan the router sees).
    out = s.smooth(60.0, plan(a10g=3, a100=1), fit)
    assert (out.reason, dict(out.targets), dict(out.mix)) == (
        "held",
        {"A100": 0, "A10G": 6},
        {"A100": 0, "A10G": 6},
    )
    assert fit.calls == [{"A100": 0, "A10G": 6}]
    assert dict(out.plan.gpus) == {"A100": 0, "A10G": 6}
    assert out.plan.cost == pytest.approx(6 * 1.01)


@pytest.mark.parametrize(
    ("a100_cost", "reason", "targets"),
    [
        (19.01, "held", {"A100": 0, "A10G": 20}),  # 20 -> 19.01: 4.95 % < 5 %
        (19.0, "adopted", {"A100": 1, "A10G": 0}),  # 20 -> 19: exactly 5 %
    ],
)
def test_the_saving_threshold_is_inclusive(
    a100_cost: float, reason: str, targets: dict[str, int]
) -> None:
    costs = {"A10G": 1.0, "A100": a100_cost}
    s = Smoother(GPUS, costs, scale_down_delay_s=0.0, min_saving=0.05)

    def p(a10g: int, a100: int) -> Plan:
        gpus = {"A10G": a10g, "A100": a100}
        return Plan(gpus=gpus, cost=mix_cost(gpus, costs), status="optimal", solve_s=0.0)

    s.smooth(0.0, p(20, 0), never)
    out = s.smooth(1.0, p(0, 1), Fit(True))
    assert (out.reason, dict(out.targets)) == (reason, targets)


def test_a_mix_that_no_longer_serves_is_replaced_whatever_the_saving() -> None:
    s = smoother(delay_s=60.0, min_saving=0.05)
    s.smooth(0.0, plan(a10g=6), never)
    fit = Fit(serves=False)
    out = s.smooth(30.0, plan(a10g=3, a100=1), fit)  # dearer: 6.70 > 6.06
    assert out.reason == "no-longer-serves"
    assert out.plan == plan(a10g=3, a100=1)
    # The new type starts at once; the old pool keeps its 6 for the delay.
    assert (dict(out.mix), dict(out.targets), out.delayed) == (
        {"A100": 1, "A10G": 3},
        {"A100": 1, "A10G": 6},
        ("A10G",),
    )
    assert dict(s.smooth(60.0, plan(a10g=3, a100=1), never).targets) == {"A100": 1, "A10G": 6}
    later = s.smooth(91.0, plan(a10g=3, a100=1), never)
    assert (dict(later.targets), later.delayed) == ({"A100": 1, "A10G": 3}, ())


def test_scale_to_zero_after_the_delay_and_back_at_once() -> None:
    s = smoother(delay_s=60.0)
    s.smooth(0.0, plan(a10g=2), never)
    empty = Plan(gpus={}, cost=0.0, status="empty", solve_s=0.0)
    assert dict(s.smooth(30.0, empty, never).targets) == {"A100": 0, "A10G": 2}
    assert dict(s.smooth(61.0, empty, never).targets) == {"A100": 0, "A10G": 0}
    back = s.smooth(90.0, plan(a100=1), never)
    assert (back.reason, dict(back.targets)) == ("scale-up", {"A100": 1, "A10G": 0})


def test_a_seeded_fleet_is_the_mix_in_force_and_shrinks_after_the_delay() -> None:
    s = smoother(delay_s=60.0, min_saving=0.05)
    s.seed(0.0, {"A10G": 4})  # what a restarted planner finds running
    shrink = s.smooth(10.0, plan(a10g=2), never)  # 2.02 vs 4.04: adopted, after the delay
    assert (shrink.reason, dict(shrink.targets)) == ("adopted", {"A100": 0, "A10G": 4})
    assert dict(s.smooth(61.0, plan(a10g=2), never).targets) == {"A100": 0, "A10G": 2}


def test_a_seeded_fleet_that_serves_is_kept_against_a_dearer_optimum() -> None:
    s = smoother(delay_s=60.0, min_saving=0.05)
    s.seed(0.0, {"A10G": 4})
    fit = Fit(serves=True)
    kept = s.smooth(10.0, plan(a10g=1, a100=1), fit)  # 4.68 vs 4.04
    assert (kept.reason, dict(kept.targets), fit.calls) == (
        "held",
        {"A100": 0, "A10G": 4},
        [{"A100": 0, "A10G": 4}],
    )
