"""AIBrix HEAD's KPA, bugs included: each bug shown next to what ``kpa`` does instead.

``short`` makes both windows one bucket, so a round's value is what the formula sees.
"""

from __future__ import annotations

from control.autoscale.types import KV_CACHE_USAGE, REQUESTS_RUNNING, REQUESTS_WAITING
from tests.unit.autoscale_factories import drive, observe, policy

short = {"stable_window_s": 1.0, "panic_window_s": 1.0}
kv = {KV_CACHE_USAGE: 0.9}


def test_bug_averages_per_pod_where_the_formula_needs_the_total() -> None:
    """4 pods at 0.9 KV usage, target 0.7: Knative's formula on the total 3.6 asks for 6;
    on the per-pod average it asks for ceil(0.9 / 0.7) = 2, and AIBrix scales DOWN under
    load (to 2, the most its scale-down rate allows)."""
    aibrix = policy("aibrix-kpa", (KV_CACHE_USAGE, 0.7), max_replicas=20)
    knative = policy("kpa", (KV_CACHE_USAGE, 0.7), max_replicas=20)
    loaded = observe(0.0, ready=4, per_replica=kv)
    assert aibrix.decide(loaded).desired == 2
    assert knative.decide(loaded).desired == 6


def test_bug_panic_is_rebuilt_every_cycle_and_can_scale_down() -> None:
    """4 pods at 1 request for 20 s (stable window 20 s, panic 1 s), then 8, 6, 1 per pod.
    t=20: panic (8 / 1.35 > 2), ceil(8) = 8 asked for. t=21: still panic (6 / 1.6), but
    the panic maximum was forgotten: 6, a scale-down from 8 in panic. t=22: the ratio
    drops and panic ends at once: ceil(1.6) = 2, at most halved from 6 to 3. Knative's
    KPA (on the total, 4 * 8 = 32) holds 32 in panic through all three."""
    series = {20: 8.0, 21: 6.0, 22: 1.0}
    options = {"stable_window_s": 20.0, "panic_window_s": 1.0}
    aibrix = policy("aibrix-kpa", max_replicas=50, scale_down_cooldown_window_s=0.0, **options)
    knative = policy("kpa", max_replicas=50, **options)
    for subject in (aibrix, knative):
        drive(subject, range(20), lambda t: observe(t, ready=4, per_replica=1.0))
    spec = 4
    theirs, ours = [], []
    for t, value in series.items():
        round_ = observe(float(t), ready=4, per_replica=value, pending=spec - 4)
        theirs.append(aibrix.decide(round_))
        ours.append(knative.decide(round_))
        spec = theirs[-1].desired
    assert [(d.desired, d.panic) for d in theirs] == [(8, True), (6, True), (3, False)]
    assert [(d.desired, d.panic) for d in ours] == [(32, True), (32, True), (32, True)]


def test_bug_most_aggressive_recommendation_in_both_windows() -> None:
    """Scale-down takes the MIN of its 300 s window: one low round scales down at once
    (the HPA-correct MAX would hold). Scale-up takes the MAX of its window."""
    aibrix = policy("aibrix-kpa", max_replicas=20, **short)
    drive(aibrix, range(100), lambda t: observe(t, ready=4, per_replica=1.0))  # in band
    dip = aibrix.decide(observe(100.0, ready=4, per_replica=0.3))
    assert (dip.recommendation, dip.desired) == (2, 2)  # floor(4 / 2)

    up = policy("aibrix-kpa", max_replicas=20, scale_up_cooldown_window_s=60.0, **short)
    first = up.decide(observe(0.0, ready=4, per_replica=7.0))
    assert first.desired == 7  # ceil(7 / 1) on the average
    second = up.decide(observe(1.0, ready=4, per_replica=5.0))  # not applied yet: spec 4
    assert (second.recommendation, second.desired) == (5, 7)  # the max of the window


def test_bug_failed_scrape_counts_as_zero() -> None:
    """4 pods at the target, 2 scrapes fail: the average halves and AIBrix scales down to
    2; when all fail, the stable value 0 even reads as panic. kpa holds 4."""
    aibrix = policy("aibrix-kpa", max_replicas=20, **short)
    half = aibrix.decide(observe(0.0, ready=4, per_replica=1.0, failed=2))
    assert half.desired == 2
    aibrix = policy("aibrix-kpa", max_replicas=20, **short)
    none = aibrix.decide(observe(0.0, ready=4, per_replica=1.0, failed=4))
    assert (none.desired, none.panic) == (2, True)
    knative = policy("kpa", max_replicas=20)
    assert knative.decide(observe(0.0, ready=4, per_replica=1.0, failed=2)).desired == 4
    assert knative.decide(observe(1.0, ready=4, per_replica=1.0, failed=4)).desired == 4


def test_bug_scales_up_again_while_pods_start() -> None:
    """The RFC #2670 cascade: the same 2 hot ready pods, the rate limit taken from the
    spec count (which includes starting pods): 2 -> 4 -> 8 -> 16. kpa, with the same
    rate relative to READY pods, stays at 4 until they are ready."""
    aibrix = policy("aibrix-kpa", (REQUESTS_WAITING, 1.0), max_replicas=50, **short)
    hot = {REQUESTS_WAITING: 20.0}
    spec, asked = 2, []
    for t in range(3):
        decision = aibrix.decide(
            observe(float(t), ready=2, per_replica=hot, pending=spec - 2, spec=spec)
        )
        spec = decision.desired
        asked.append(spec)
    assert asked == [4, 8, 16]

    knative = policy("kpa", (REQUESTS_WAITING, 1.0), max_replicas=50, max_scale_up_rate=2.0)
    spec, asked = 2, []
    for t in range(3):
        decision = knative.decide(
            observe(float(t), ready=2, per_replica=hot, pending=spec - 2, spec=spec)
        )
        spec = decision.desired
        asked.append(spec)
    assert asked == [4, 4, 4]


def test_the_reason_names_the_per_pod_average() -> None:
    aibrix = policy("aibrix-kpa", (REQUESTS_RUNNING, 1.0))
    decision = aibrix.decide(observe(0.0, ready=2, per_replica=3.0))
    assert "avg/pod stable 3" in decision.reason
