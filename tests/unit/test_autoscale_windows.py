"""Time windows on virtual time, the observed signals, and the shared zero rule."""

from __future__ import annotations

import pytest

from control.autoscale.policies.windows import (
    RecommendationWindow,
    TrendWindow,
    WindowAverage,
    ZeroGate,
    demand_seen,
    least_squares_slope,
    observed_per_replica,
    observed_total,
)
from control.autoscale.types import (
    KV_CACHE_USAGE,
    REQUESTS_RUNNING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    MetricTarget,
)
from tests.unit.autoscale_factories import make_spec, observe


class TestWindowAverage:
    def test_empty_is_unknown_not_zero(self) -> None:
        assert WindowAverage(60.0).average(0.0) is None

    def test_mean_of_the_buckets_in_the_window(self) -> None:
        window = WindowAverage(6.0)
        for t, value in enumerate([1.0, 1.0, 1.0, 1.0, 1.0, 7.0]):
            window.record(float(t), value)
        assert window.average(5.0) == pytest.approx(2.0)

    def test_buckets_older_than_the_window_leave(self) -> None:
        window = WindowAverage(6.0)
        for t in range(6):
            window.record(float(t), 10.0)
        window.record(6.0, 4.0)  # bucket 0 leaves: buckets 1..6 remain
        assert window.average(6.0) == pytest.approx((5 * 10.0 + 4.0) / 6)
        assert window.average(10.0) == pytest.approx((10.0 + 4.0) / 2)  # buckets 5..10
        assert window.average(11.0) == pytest.approx(4.0)
        assert window.average(12.0) is None

    def test_seconds_between_rounds_are_not_zeros(self) -> None:
        window = WindowAverage(60.0)
        for t in range(0, 60, 15):  # a 15 s scrape interval
            window.record(float(t), 8.0)
        assert window.average(59.0) == pytest.approx(8.0)

    def test_two_records_in_one_bucket_count_as_their_mean(self) -> None:
        window = WindowAverage(10.0)
        window.record(0.0, 2.0)
        window.record(1.2, 4.0)
        window.record(1.7, 8.0)
        assert window.average(1.9) == pytest.approx((2.0 + 6.0) / 2)

    def test_granularity_groups_seconds(self) -> None:
        window = WindowAverage(10.0, granularity_s=5.0)
        window.record(0.0, 1.0)
        window.record(4.0, 3.0)  # same 5 s bucket as t=0
        window.record(5.0, 6.0)
        assert window.average(9.0) == pytest.approx((2.0 + 6.0) / 2)
        assert window.average(10.0) == pytest.approx(6.0)

    def test_time_must_not_go_backwards(self) -> None:
        window = WindowAverage(10.0)
        window.record(5.0, 1.0)
        with pytest.raises(AssertionError, match="backwards"):
            window.record(3.0, 1.0)


class TestRecommendationWindow:
    def test_max_and_min_over_the_window(self) -> None:
        window = RecommendationWindow(10.0)
        for t, value in [(0.0, 3), (4.0, 7), (8.0, 5)]:
            window.record(t, value)
        assert (window.max(), window.min()) == (7, 3)
        window.record(10.0, 4)  # t=0 is now exactly a window old: it leaves
        assert (window.max(), window.min()) == (7, 4)
        window.record(14.5, 6)
        assert (window.max(), window.min()) == (6, 4)

    def test_a_zero_window_is_the_latest_only(self) -> None:
        window = RecommendationWindow(0.0)
        window.record(0.0, 9)
        window.record(1.0, 2)
        assert (window.max(), window.min()) == (2, 2)

    def test_the_latest_always_counts(self) -> None:
        window = RecommendationWindow(5.0)
        window.record(0.0, 9)
        window.record(100.0, 1)
        assert window.max() == 1


class TestTrend:
    def test_slope_of_a_line(self) -> None:
        assert least_squares_slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)

    def test_no_slope_from_one_time(self) -> None:
        assert least_squares_slope([(1.0, 1.0)]) is None
        assert least_squares_slope([(1.0, 1.0), (1.0, 2.0)]) is None

    def test_window_forgets_old_points(self) -> None:
        trend = TrendWindow(10.0)
        for t in range(10):
            trend.record(float(t), 100.0 - 10 * t)  # falling
        for t in range(10, 20):
            trend.record(float(t), 3.0 * t)  # rising
        assert trend.slope(19.0) == pytest.approx(3.0)


class TestObservedSignals:
    def test_total_is_the_sum_when_every_replica_reports(self) -> None:
        round_ = observe(0.0, ready=3, per_replica=[1.0, 2.0, 3.0])
        assert observed_total(round_, REQUESTS_RUNNING) == pytest.approx(6.0)

    def test_a_failed_replica_counts_as_the_mean_of_the_others(self) -> None:
        round_ = observe(0.0, ready=3, per_replica=[2.0, 4.0, 99.0], failed=1)
        assert observed_total(round_, REQUESTS_RUNNING) == pytest.approx(3.0 * 3)

    def test_unknown_when_nobody_reported(self) -> None:
        round_ = observe(0.0, ready=2, per_replica=1.0, failed=2)
        assert observed_total(round_, REQUESTS_RUNNING) is None
        assert observed_total(round_, KV_CACHE_USAGE) is None
        assert observed_per_replica(round_, REQUESTS_RUNNING) is None

    def test_router_metrics_are_totals(self) -> None:
        round_ = observe(0.0, ready=4, router={ROUTER_IN_FLIGHT: 12.0})
        assert observed_total(round_, ROUTER_IN_FLIGHT) == 12.0
        assert observed_per_replica(round_, ROUTER_IN_FLIGHT) == 3.0
        assert observed_total(round_, ROUTER_HELD) is None

    def test_demand_is_held_requests_or_arrivals(self) -> None:
        assert not demand_seen(observe(0.0, ready=0))
        assert not demand_seen(observe(0.0, ready=0, router={ROUTER_HELD: 0.0}))
        assert demand_seen(observe(0.0, ready=0, router={ROUTER_HELD: 1.0}))
        assert demand_seen(observe(0.0, ready=0, router={ROUTER_ARRIVALS_PER_S: 0.1}))


IDLE = {ROUTER_HELD: 0.0, ROUTER_ARRIVALS_PER_S: 0.0}
TARGETS = (MetricTarget(REQUESTS_RUNNING, 1.0),)


class TestZeroGate:
    def test_zero_after_idle_period_only(self) -> None:
        gate, spec = ZeroGate(idle_s=30.0), make_spec(min_replicas=0)
        for t in range(31):
            round_ = observe(float(t), ready=1, per_replica=0.0, router=IDLE)
            gate.observe(round_, TARGETS)
            desired, bound = gate.apply(0, round_, spec)
            assert (desired, bound) == ((0, "") if t >= 30 else (1, "scale-to-zero-grace"))

    def test_unknown_rounds_are_not_idle(self) -> None:
        gate = ZeroGate(idle_s=5.0)
        gate.observe(observe(0.0, ready=1, per_replica=0.0, router=IDLE), TARGETS)
        assert gate.idle_since_s == 0.0
        gate.observe(observe(1.0, ready=1, per_replica=0.0, failed=1), TARGETS)
        assert gate.idle_since_s is None

    def test_activation_from_zero_ready(self) -> None:
        gate, spec = ZeroGate(idle_s=30.0), make_spec(min_replicas=0)
        round_ = observe(0.0, ready=0, router={ROUTER_HELD: 2.0})
        gate.observe(round_, TARGETS)
        assert gate.apply(0, round_, spec) == (1, "activation")
        assert gate.apply(3, round_, spec) == (3, "")

    def test_nothing_to_keep_at_zero_without_demand(self) -> None:
        gate, spec = ZeroGate(idle_s=30.0), make_spec(min_replicas=0)
        round_ = observe(0.0, ready=0, router=IDLE)
        gate.observe(round_, TARGETS)
        assert gate.apply(0, round_, spec) == (0, "")
