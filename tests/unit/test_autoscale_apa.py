"""AIBrix's APA on virtual time: fluctuation bands, scale rates, cooldown windows.

Target: 1 running request per replica, so a replica's value is its ratio. ``quick``
shortens the stable window to one bucket and turns the scale-down cooldown off, for
tests of the per-round formula.
"""

from __future__ import annotations

import pytest

from control.autoscale.types import ROUTER_IN_FLIGHT
from tests.unit.autoscale_factories import drive, observe, policy

quick = {"stable_window_s": 1.0, "scale_down_cooldown_window_s": 0.0}


@pytest.mark.parametrize(
    ("per_replica", "desired", "bounds"),
    [
        (1.1, 4, ""),  # at +10%: inside the up band, hold
        (1.15, 5, ""),  # above it: ceil(4 * 1.15)
        (0.85, 4, ""),  # inside the 20% down band: hold
        (0.8, 4, ""),  # exactly at its edge: hold
        (0.7, 3, ""),  # below: ceil(4 * 0.7)
        (3.0, 8, "max-scale-up-rate"),  # ceil(4 * 3) = 12, at most 2 * 4
        (0.1, 2, "max-scale-down-rate"),  # ceil(0.4) = 1, at least floor(4 / 2)
    ],
)
def test_bands_and_rates(per_replica: float, desired: int, bounds: str) -> None:
    apa = policy("apa", max_replicas=20, **quick)
    decision = apa.decide(observe(0.0, ready=4, per_replica=per_replica))
    assert (decision.desired, decision.bounds) == (desired, bounds)


def test_tolerances_are_options() -> None:
    apa = policy(
        "apa",
        max_replicas=20,
        up_fluctuation_tolerance=0.5,
        down_fluctuation_tolerance=0.05,
        **quick,
    )
    assert apa.decide(observe(0.0, ready=4, per_replica=1.4)).desired == 4
    # 0.9 is outside a 5% down band: ceil(10 * 0.9) (the default 20% band holds 10)
    assert apa.decide(observe(1.0, ready=10, per_replica=0.9)).desired == 9


def test_value_is_the_stable_window_average() -> None:
    """180 s of 1.0 then a jump to 3.0: the window average passes 1.1 only when
    (n * 3 + (180 - n) * 1) / 180 > 1.1, i.e. after n > 9 rounds of the jump."""
    apa = policy("apa", max_replicas=20)
    drive(apa, range(180), lambda t: observe(t, ready=4, per_replica=1.0))
    jump = drive(apa, range(180, 200), lambda t: observe(t, ready=4, per_replica=3.0))
    desired = [d.desired for d in jump]
    assert desired[:9] == [4] * 9
    assert desired[9] == 5  # n=10: (30 + 170) / 180 = 1.11 -> ceil(4.44)


def test_scale_down_cooldown_keeps_the_largest_of_300_s() -> None:
    apa = policy("apa", max_replicas=20, stable_window_s=1.0)
    drive(apa, range(10), lambda t: observe(t, ready=8, per_replica=1.0))
    low = drive(apa, range(10, 320), lambda t: observe(t, ready=8, per_replica=0.5))
    desired = [d.desired for d in low]
    assert desired[:299] == [8] * 299
    assert desired[299] == 4
    assert "cooldown" in low[0].bounds


def test_pending_replicas_keep_the_count_asked_for() -> None:
    """2 ready at 1.5x asked for 3; while the third starts, the same ratio on the 2 ready
    ones still asks for 3 (AIBrix HEAD multiplies by the spec count: ceil(3 * 1.5) = 5)."""
    apa = policy("apa", max_replicas=20, **quick)
    assert apa.decide(observe(0.0, ready=2, per_replica=1.5)).desired == 3
    starting = drive(apa, range(1, 60), lambda t: observe(t, ready=2, per_replica=1.5, pending=1))
    assert {d.desired for d in starting} == {3}


def test_a_band_hold_keeps_pending_replicas() -> None:
    apa = policy("apa", max_replicas=20, **quick)
    decision = apa.decide(observe(0.0, ready=2, per_replica=1.05, pending=2))
    assert decision.desired == 4  # inside the band: keep what is asked for


def test_router_metric_per_ready_replica() -> None:
    apa = policy("apa", (ROUTER_IN_FLIGHT, 4.0), max_replicas=20, **quick)
    decision = apa.decide(observe(0.0, ready=2, router={ROUTER_IN_FLIGHT: 12.0}))
    assert decision.desired == 3  # 6 per replica / 4 = 1.5 -> ceil(2 * 1.5)
