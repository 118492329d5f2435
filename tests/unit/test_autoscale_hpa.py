"""The Kubernetes HPA's formula, tolerance and behaviour on virtual time.

Target: 1 running request per replica (an ``AverageValue`` Pods metric), so a replica's
value is its usage ratio. ``no_stab`` turns the 300 s scale-down stabilization off for
tests of the formula alone.
"""

from __future__ import annotations

import pytest

from control.autoscale.errors import PolicyConfigError
from control.autoscale.types import REQUESTS_RUNNING, REQUESTS_WAITING, ROUTER_IN_FLIGHT
from tests.unit.autoscale_factories import drive, observe, policy

no_stab = {"scale_down_stabilization_window_s": 0.0}


@pytest.mark.parametrize(
    ("per_replica", "desired"),
    [
        (1.05, 4),  # within the 0.1 tolerance: hold
        (0.91, 4),
        (1.2, 5),  # ceil(1.2 * 4)
        (2.0, 8),  # ceil(2 * 4): 100% per 15 s allows 8
        (0.5, 2),
        (0.0, 1),  # 0, raised to min_replicas
    ],
)
def test_formula_and_tolerance(per_replica: float, desired: int) -> None:
    hpa = policy("hpa", max_replicas=20, **no_stab)
    decision = hpa.decide(observe(0.0, ready=4, per_replica=per_replica))
    assert decision.desired == desired
    assert decision.bounds == ("min-replicas" if per_replica == 0.0 else "")


def test_missing_pods_count_zero_on_scale_up() -> None:
    """2 of 4 report twice the target: with the 2 missing at 0 the ratio is 4/4 = 1.0,
    within tolerance: hold (instead of 8 from the reporting pods alone)."""
    hpa = policy("hpa", max_replicas=20, **no_stab)
    assert hpa.decide(observe(0.0, ready=4, per_replica=2.0, failed=2)).desired == 4
    hpa = policy("hpa", max_replicas=20, **no_stab)
    # at 3x: (3 + 3 + 0 + 0) / 4 = 1.5 -> ceil(1.5 * 4) = 6
    assert hpa.decide(observe(0.0, ready=4, per_replica=3.0, failed=2)).desired == 6


def test_missing_pods_count_at_target_on_scale_down() -> None:
    """2 of 4 report 0.2: with the missing 2 at the target, (0.4 + 2) / 4 = 0.6 -> 3."""
    hpa = policy("hpa", max_replicas=20, **no_stab)
    assert hpa.decide(observe(0.0, ready=4, per_replica=0.2, failed=2)).desired == 3


def test_unready_pods_count_zero_on_scale_up() -> None:
    """2 ready at 3x with 2 pending: (3 + 3 + 0 + 0) / 4 = 1.5 -> 6, not ceil(3 * 2)
    on top of the 4 asked for."""
    hpa = policy("hpa", max_replicas=20)
    decision = hpa.decide(observe(0.0, ready=2, per_replica=3.0, pending=2))
    assert decision.recommendation == 6


def test_unready_pods_are_ignored_on_scale_down() -> None:
    hpa = policy("hpa", max_replicas=20, **no_stab)
    decision = hpa.decide(observe(0.0, ready=4, per_replica=0.5, pending=2))
    assert decision.recommendation == 2  # ceil(0.5 * 4 ready); the pending ones left out


def test_router_metric_is_an_external_average_value() -> None:
    hpa = policy("hpa", (ROUTER_IN_FLIGHT, 2.0), max_replicas=20, **no_stab)
    within = observe(0.0, ready=4, router={ROUTER_IN_FLIGHT: 8.5})  # 8.5 / (2*4) = 1.06
    assert hpa.decide(within).desired == 4
    above = observe(1.0, ready=4, router={ROUTER_IN_FLIGHT: 13.0})  # ceil(13 / 2)
    assert hpa.decide(above).desired == 7


def test_scale_up_policy_four_pods_or_double_per_15_s() -> None:
    """From 1 replica under heavy load: max(1 + 4, 2 * 1) = 5, then nothing more until
    the 15 s period has passed, then max(5 + 4, 2 * 5) = 10, then 20."""
    hpa = policy("hpa", max_replicas=100)
    spec, desired = 1, []
    for t in range(46):
        decision = hpa.decide(observe(float(t), ready=spec, per_replica=100.0))
        spec = decision.desired
        desired.append(spec)
    assert desired[0] == 5
    assert desired[1:15] == [5] * 14
    assert desired[15] == 10
    assert desired[30] == 20
    assert desired[45] == 40
    assert "scale-up-policy" in hpa.decide(observe(46.0, ready=40, per_replica=100.0)).bounds


def test_scale_up_select_min_policy() -> None:
    hpa = policy("hpa", max_replicas=100, scale_up_select_policy="min")
    assert hpa.decide(observe(0.0, ready=1, per_replica=100.0)).desired == 2  # min(5, 2)


def test_scale_down_stabilization_takes_the_max_of_300_s() -> None:
    """The HPA-correct damping: after load falls, the count stays at the largest
    recommendation of the last 300 s; it falls the round the high ones have aged out."""
    hpa = policy("hpa", max_replicas=20)
    drive(hpa, range(10), lambda t: observe(t, ready=8, per_replica=1.0))  # recommends 8
    low = drive(hpa, range(10, 320), lambda t: observe(t, ready=8, per_replica=0.25))
    desired = [d.desired for d in low]
    assert desired[:299] == [8] * 299  # t=10..308: the 8 of t=9 is younger than 300 s
    assert desired[299] == 2  # t=309: ceil(0.25 * 8)
    assert "stabilization" in low[0].bounds


def test_scale_up_stabilization_takes_the_min_of_its_window() -> None:
    """With a 30 s scale-up window, one spike does not scale up; a sustained rise does
    once every recommendation in the window is high."""
    hpa = policy("hpa", max_replicas=20, scale_up_stabilization_window_s=30.0)
    drive(hpa, range(10), lambda t: observe(t, ready=4, per_replica=1.0))
    spike = hpa.decide(observe(10.0, ready=4, per_replica=3.0))
    assert (spike.recommendation, spike.desired) == (12, 4)
    rise = drive(hpa, range(11, 50), lambda t: observe(t, ready=4, per_replica=2.0))
    desired = [d.desired for d in rise]
    assert desired[:28] == [4] * 28  # t=11..38: the 4 of t=9 is younger than 30 s
    assert desired[28] == 8  # t=39: min over (9, 39] = 8


def test_some_unknown_metric_blocks_scale_down() -> None:
    hpa = policy("hpa", (REQUESTS_RUNNING, 1.0), (REQUESTS_WAITING, 1.0), **no_stab)
    decision = hpa.decide(observe(0.0, ready=4, per_replica={REQUESTS_RUNNING: 0.25}))
    assert decision.recommendation == 1
    assert decision.desired == 4
    assert "some unknown: no scale-down" in decision.reason


def test_scale_down_policy_percent_per_period() -> None:
    """50% per 15 s: 8 -> 4 at once, and not lower within the period."""
    hpa = policy("hpa", max_replicas=20, scale_down_percent=50.0, **no_stab)
    spec, desired = 8, []
    for t in range(16):
        decision = hpa.decide(observe(float(t), ready=spec, per_replica=0.0))
        spec = decision.desired
        desired.append(spec)
    assert desired[:15] == [4] * 15
    assert desired[15] == 2


def test_bad_select_policy_is_rejected() -> None:
    with pytest.raises(PolicyConfigError, match="scale_up_select_policy"):
        policy("hpa", scale_up_select_policy="most")


def test_scale_up_after_a_scale_down_starts_from_the_period_start() -> None:
    """Kubernetes counts both directions' events: 8 -> 4 at t=0, then a burst at t=1
    starts from 4 - 0 added + 4 removed = 8, so max(2 * 8, 8 + 4) = 16 (not 8 from 4)."""
    hpa = policy("hpa", max_replicas=100, scale_down_percent=50.0, **no_stab)
    assert hpa.decide(observe(0.0, ready=8, per_replica=0.0)).desired == 4
    burst = hpa.decide(observe(1.0, ready=4, per_replica=100.0))
    assert burst.desired == 16
    assert "scale-up-policy" in burst.bounds


def test_a_scale_down_after_a_scale_up_starts_from_the_period_start() -> None:
    """6 -> 12 at t=0 (100% wins over 4 pods), then idle at t=1 with 50% down: the period
    started at 12 - 6 = 6, so floor(6 * 0.5) = 3 (not floor(12 * 0.5) = 6)."""
    hpa = policy("hpa", max_replicas=100, scale_down_percent=50.0, **no_stab)
    assert hpa.decide(observe(0.0, ready=6, per_replica=100.0)).desired == 12
    idle = hpa.decide(observe(1.0, ready=12, per_replica=0.0))
    assert (idle.desired, idle.bounds) == (3, "scale-down-policy")


def test_a_decision_never_applied_uses_no_rate_budget() -> None:
    """A dry run or failed write leaves the spec at 1: the next round may ask for 5
    again. Applied between t=1 and t=2 (the spec reads 5), it is an event at t=1, so
    the period ends after t=16 (an event at t=0 would have ended it after t=15)."""
    hpa = policy("hpa", max_replicas=100)
    assert hpa.decide(observe(0.0, ready=1, per_replica=100.0)).desired == 5
    assert hpa.decide(observe(1.0, ready=1, per_replica=100.0)).desired == 5
    applied = drive(hpa, range(2, 17), lambda t: observe(t, ready=5, per_replica=100.0))
    assert [d.desired for d in applied] == [5] * 14 + [10]  # t=2..15 held, t=16: 2 * 5


def test_a_scale_down_never_applied_uses_no_rate_budget() -> None:
    hpa = policy("hpa", max_replicas=20, scale_down_percent=50.0, **no_stab)
    assert hpa.decide(observe(0.0, ready=8, per_replica=0.0)).desired == 4
    assert hpa.decide(observe(1.0, ready=8, per_replica=0.0)).desired == 4  # spec still 8
