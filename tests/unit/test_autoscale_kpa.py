"""Knative's KPA on virtual time: exact decisions for scripted metric series.

Rounds are one per second from t=0; the metric is running requests, target 1 per
replica, so the observed TOTAL over replicas is the count of replicas wanted.
"""

from __future__ import annotations

import pytest

from control.autoscale.errors import PolicyConfigError
from control.autoscale.types import KV_CACHE_USAGE, ROUTER_HELD, ScaleInput
from tests.unit.autoscale_factories import VirtualService, drive, observe, policy


def test_load_step_enters_panic_on_the_panic_window() -> None:
    """1 replica at 1 request for a minute, then 10: at the step the stable window (60
    buckets) reads (59*1 + 10)/60 = 1.15 -> 2, the panic window (6 buckets)
    (5*1 + 10)/6 = 2.5 -> 3; 3/1 ready >= 200%: panic, and 3 is asked for at once."""
    kpa = policy("kpa", max_replicas=50)
    before = drive(kpa, range(60), lambda t: observe(t, ready=1, per_replica=1.0))
    assert {d.desired for d in before} == {1}
    assert not any(d.panic for d in before)
    step = kpa.decide(observe(60.0, ready=1, per_replica=10.0))
    assert (step.desired, step.recommendation, step.panic) == (3, 3, True)
    assert "stable 1.15 panic 2.5" in step.reason
    # the panic window fills with the step: (4*1 + 2*10)/6 = 4, (3 + 30)/6 = 5.5 ...
    after = drive(kpa, range(61, 66), lambda t: observe(t, ready=1, per_replica=10.0))
    assert [d.desired for d in after] == [4, 6, 7, 9, 10]


def test_panic_is_held_until_a_full_stable_window_passes() -> None:
    """2 replicas; a 10 s burst of 20 requests, then nothing. The panic count climbs to 20
    and is held (no scale-down) while the panic window still reads over the threshold
    (last at t=24: (20 + 5*0)/6 = 3.33 -> 4 >= 2*2) and for a stable window after it:
    panic ends at the first round more than 60 s later (t=85)."""
    kpa = policy("kpa", max_replicas=50)

    def burst(t: float) -> ScaleInput:
        total = 2.0 if t < 10 else 20.0 if t < 20 else 0.0
        return observe(t, ready=2, per_replica=total / 2)

    decisions = drive(kpa, range(120), burst)
    desired = [d.desired for d in decisions]
    panic = [d.panic for d in decisions]
    assert desired[:10] == [2] * 10
    assert panic.index(True) == 10
    assert max(desired) == 20
    peak_at = desired.index(20)
    assert all(d == 20 for d in desired[peak_at:85]), "no scale-down in panic"
    assert all(panic[10:85])
    assert "panic-hold" in decisions[30].bounds
    assert not panic[85]
    # out of panic, the stable window (empty of load since t=26) says 0; the scale-down
    # rate allows floor(2 ready / 2) = 1
    assert desired[85] == 1
    assert "max-scale-down-rate" in decisions[85].bounds


def test_panic_re_extends_while_over_threshold() -> None:
    kpa = policy("kpa", max_replicas=50)
    # 8 requests on 2 replicas stays at panic count 8 >= 4: panic never ends
    decisions = drive(kpa, range(300), lambda t: observe(t, ready=2, per_replica=4.0))
    assert all(d.panic for d in decisions)
    assert {d.desired for d in decisions} == {8}


def test_stale_scrapes_hold_and_never_read_as_zero() -> None:
    kpa = policy("kpa")
    drive(kpa, range(100), lambda t: observe(t, ready=4, per_replica=1.0))
    failed = drive(kpa, range(100, 300), lambda t: observe(t, ready=4, per_replica=0.0, failed=4))
    assert {d.desired for d in failed} == {4}
    # the stable window keeps the last minute of real data, then runs dry: unknown
    assert failed[58].recommendation == 4  # t=158: buckets 99..158 hold t=99
    assert failed[59].recommendation is None
    assert "all unknown: hold" in failed[59].reason


def test_a_hung_replica_counts_as_an_average_one() -> None:
    """3 replicas report 2 requests each, one's scrape fails: the total is 2 * 4 = 8."""
    kpa = policy("kpa", max_replicas=50)
    decision = kpa.decide(observe(0.0, ready=4, per_replica=2.0, failed=1))
    assert decision.recommendation == 8


def test_pending_replicas_count_and_rates_follow_ready_ones() -> None:
    """With max_scale_up_rate 2, 2 ready replicas under 20 requests may ask for 4; while
    2 start, the same 2 ready replicas still allow only 4 (AIBrix's spec-based rate
    would allow 8)."""
    kpa = policy("kpa", max_replicas=50, max_scale_up_rate=2.0)
    first = kpa.decide(observe(0.0, ready=2, per_replica=10.0))
    assert (first.desired, first.recommendation) == (4, 20)
    assert "max-scale-up-rate" in first.bounds
    starting = drive(kpa, range(1, 30), lambda t: observe(t, ready=2, per_replica=10.0, pending=2))
    assert {d.desired for d in starting} == {4}
    ready = kpa.decide(observe(30.0, ready=4, per_replica=5.0))
    assert ready.desired == 8


def test_scale_down_rate_halves_at_most() -> None:
    kpa = policy("kpa", max_replicas=50)
    service = VirtualService(kpa, ready=8)
    decisions = service.run(0.0, 3)
    assert [d.desired for d in decisions] == [4, 2, 1]


def test_scale_down_delay_keeps_the_max_of_its_window() -> None:
    kpa = policy("kpa", max_replicas=50, scale_down_delay_s=30.0, stable_window_s=6.0)
    service = VirtualService(kpa, ready=4)
    service.run(4.0, 10)  # steady at 4
    drop = service.run(1.0, 40)
    desired = [d.desired for d in drop]
    # undelayed, the stable window (6 s) reads (5*4 + 1)/6 -> 4, then 3, 3, and the
    # scale-down rate allows 2 of 4 from then on; delayed, each of those counts shows 30 s
    # later, when the larger ones before it have left the window
    assert [d.recommendation for d in drop[:4]] == [4, 3, 3, 2]
    assert desired == [4] * 30 + [3, 3] + [2] * 8
    assert "scale-down-delay" in drop[10].bounds


def test_scale_to_zero_after_stable_window_and_grace() -> None:
    kpa = policy("kpa", min_replicas=0, scale_to_zero_grace_s=10.0)
    idle = {ROUTER_HELD: 0.0}
    decisions = drive(kpa, range(80), lambda t: observe(t, ready=1, router=idle))
    desired = [d.desired for d in decisions]
    assert desired == [1] * 70 + [0] * 10  # 60 s stable window + 10 s grace
    assert "scale-to-zero-grace" in decisions[69].bounds


def test_scale_from_zero_on_held_requests() -> None:
    kpa = policy("kpa", min_replicas=0)
    woken = kpa.decide(observe(0.0, ready=0, spec=0, router={ROUTER_HELD: 3.0}))
    assert woken.desired == 1
    assert woken.bounds == "activation"


def test_kv_usage_total_over_replicas() -> None:
    """KV usage 0.9 on each of 4 replicas, target 0.7: the total 3.6 asks for 6."""
    kpa = policy("kpa", (KV_CACHE_USAGE, 0.7))
    values = {KV_CACHE_USAGE: 0.9}
    assert kpa.decide(observe(0.0, ready=4, per_replica=values)).recommendation == 6


def test_panic_window_percentage_and_threshold_options() -> None:
    kpa = policy("kpa", panic_window_percentage=50.0, panic_threshold_percentage=300.0)
    assert kpa.panic_window_s == 30.0  # type: ignore[attr-defined]
    # 2 requests on 1 replica: panic count 2 < 300% of 1 ready: no panic
    assert not kpa.decide(observe(0.0, ready=1, per_replica=2.0)).panic


def test_panic_threshold_as_a_ratio() -> None:
    kpa = policy("kpa", panic_threshold=3.0)
    assert not kpa.decide(observe(0.0, ready=1, per_replica=2.0)).panic
    assert kpa.decide(observe(1.0, ready=1, per_replica=5.0)).panic  # (2 + 5) / 2 -> 4 >= 3
    with pytest.raises(PolicyConfigError, match="not both"):
        policy("kpa", panic_threshold=3.0, panic_threshold_percentage=300.0)


def test_panic_window_longer_than_stable_is_rejected() -> None:
    with pytest.raises(PolicyConfigError, match="panic window"):
        policy("kpa", stable_window_s=10.0, panic_window_s=20.0)
    with pytest.raises(PolicyConfigError, match="stable_window_s must be >= 6"):
        policy("kpa", stable_window_s=5.0)
