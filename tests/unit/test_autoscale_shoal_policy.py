"""The ``shoal`` policy on virtual time, with exact decisions.

The profile is chosen so capacity is computed by hand: 10 ms per step, 10 us per prompt
token, 1 ms per decoding sequence. The default mix (16 prompt, 11 output tokens) costs
a = 16 * 10 us + 10 * 1 ms = 10.16 ms of step time per request; with a 20 ms TPOT the
rate is r <= (1 - 10/20) / a = 49.2 /s (the prefill spilling into decodes adds under a
microsecond at 16 tokens), times headroom 0.8: **39.37 requests/s per replica**. A
1024-token prompt costs a = 20.24 ms, and its prefill spills ~0.5 ms into each decode
step of the requests around it: ~19.1 /s per replica.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from control.autoscale.errors import PolicyConfigError
from control.autoscale.policies.base import make_policy
from control.autoscale.policies.shoal import ShoalPolicy
from control.autoscale.types import (
    GENERATION_TOKENS_PER_S,
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_PER_S,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    TTFT_MEAN_S,
    MetricTarget,
    PolicySpec,
    ReplicaSample,
    ScaleInput,
)
from tests.unit.autoscale_contract import PolicyContract

PER_REPLICA = 0.8 * 0.5 / (16 * 1e-5 + 10 * 1e-3)  # 39.37 /s
PER_REPLICA_LONG = 19.1  # /s, with the spill (module docstring)


@pytest.fixture
def profile(tmp_path: Path) -> str:
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps({"c0_s": 0.01, "c_prefill_s": 1e-5, "c_decode_s": 1e-3, "c_kv_s": 0.0})
    )
    return str(path)


def policy(
    profile: str, *, min_replicas: int = 1, targets: tuple[MetricTarget, ...] = (), **options: Any
) -> ShoalPolicy:
    base: dict[str, float | str] = {
        "profile": profile,
        "ttft_slo_s": 1.0,
        "tpot_slo_s": 0.02,
        "prompt_tokens": 16,
        "output_tokens": 11,
        "start_time_s": 30,
        "trend_window_s": 30,
        "scale_down_delay_s": 60,
        "idle_s": 120,
    }
    base.update(options)
    spec = PolicySpec(targets=targets, min_replicas=min_replicas, max_replicas=20, options=base)
    made = make_policy("shoal", spec)
    assert isinstance(made, ShoalPolicy)
    return made


def observe(
    now_s: float,
    *,
    ready: int = 1,
    pending: int = 0,
    spec: int | None = None,
    arrivals: float | None = None,
    held: float | None = None,
    engines: Mapping[str, float] | None = None,
    failed: int = 0,
) -> ScaleInput:
    """One round: ``engines`` are each ready replica's values (the same on each)."""
    router: dict[str, float] = {}
    if arrivals is not None:
        router[ROUTER_ARRIVALS_PER_S] = arrivals
        router[ROUTER_IN_FLIGHT] = 0.0 if arrivals == 0 else arrivals
    if held is not None:
        router[ROUTER_HELD] = held
    samples = [ReplicaSample(f"r{i}", dict(engines or {})) for i in range(ready - failed)]
    samples += [ReplicaSample(f"f{i}", ok=False) for i in range(failed)]
    return ScaleInput(
        now_s=now_s,
        spec_replicas=ready + pending if spec is None else spec,
        ready_replicas=ready,
        pending_replicas=pending,
        samples=tuple(samples),
        router=router,
    )


def ceil_div(rate: float, per_replica: float) -> int:
    return -int(-rate // per_replica)


def test_steady_arrivals_need_rate_over_capacity(profile: str) -> None:
    shoal = policy(profile)
    decisions = [shoal.decide(observe(t, ready=3, arrivals=100.0)) for t in (0, 2, 4, 6)]
    assert [d.desired for d in decisions] == [ceil_div(100, PER_REPLICA)] * 4 == [3] * 4
    assert decisions[-1].per_metric["slo"] == 3 and not decisions[-1].panic


def test_a_ramp_is_met_one_start_time_ahead(profile: str) -> None:
    # arrivals rise 1/s per second; rounds every 2 s. The trend projects r(t + 30 s), so a
    # second replica is asked for at t = 14 (projected 44/s: more than 10% over what one
    # replica serves, 39.37/s) while one replica still runs at a third of its capacity:
    # no queue has had time to form.
    shoal = policy(profile)
    blind = policy(profile, start_time_s=0)
    times = range(0, 22, 2)
    ahead = [shoal.decide(observe(t, arrivals=float(t))).desired for t in times]
    late = [blind.decide(observe(t, arrivals=float(t))).desired for t in times]
    assert ahead == [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]
    assert late == [1] * 11


def test_a_step_is_not_projected_as_a_ramp(profile: str) -> None:
    # 10/s then 35/s from t = 12: the line through the jump rises 1.5/s, which projected
    # 30 s ahead asks for two replicas; but each half of the window is flat: one replica
    shoal = policy(profile)
    rates = [10.0] * 6 + [35.0] * 10
    decisions = [shoal.decide(observe(2 * i, arrivals=r)) for i, r in enumerate(rates)]
    assert [d.desired for d in decisions] == [1] * 16
    assert "predicted 35/s" in decisions[-1].reason


def test_noise_on_a_flat_rate_is_not_a_ramp(profile: str) -> None:
    # 30, 38, 30, 38 ... fits a positive slope at every 38 (0.8/s over the first four
    # points, which projected 30 s ahead is 60/s: two replicas), but never by three
    # standard errors, and 38 is no jump above the 10 s mean: one replica throughout
    shoal = policy(profile)
    rates = [30.0, 38.0] * 8
    decisions = [shoal.decide(observe(2 * i, arrivals=r)) for i, r in enumerate(rates)]
    assert [d.desired for d in decisions] == [1] * 16
    assert "predicted 34/s" in decisions[-1].reason  # the mean of the last 10 s


def test_a_step_takes_the_panic_path_at_once(profile: str) -> None:
    # without the router the arrival rate is the served rate, which a step does not move
    shoal = policy(profile)
    calm = {REQUESTS_RUNNING: 5, REQUESTS_WAITING: 0, REQUESTS_PER_S: 10}
    assert shoal.decide(observe(0, engines=calm)).desired == 1
    # the queue grew by 180 in 2 s: demand is the 12/s served plus 90/s of growth, and
    # the 180 waiting drain in 30 s: (12 + 90 + 180 / 30) / 39.37 -> 3, in this round
    stepped = {REQUESTS_RUNNING: 20, REQUESTS_WAITING: 180, REQUESTS_PER_S: 12}
    decision = shoal.decide(observe(2, engines=stepped))
    assert decision.panic and "waiting" in decision.reason
    assert decision.desired == ceil_div(12 + 90 + 180 / 30, PER_REPLICA) == 3
    # two are starting; the queue still grows (240 over the 4 s seen), and what it
    # needs, (12 + 60 + 240 / 30) / 39.37 -> 3, is on its way: nothing more is asked
    growing = {REQUESTS_RUNNING: 20, REQUESTS_WAITING: 240, REQUESTS_PER_S: 12}
    later = shoal.decide(observe(4, ready=1, pending=2, engines=growing))
    assert later.panic and later.per_metric["panic"] == 3 and later.desired == 3


def test_with_the_router_a_draining_queue_asks_no_more(profile: str) -> None:
    shoal = policy(profile)
    full = {REQUESTS_WAITING: 60.0, REQUESTS_RUNNING: 8.0}
    first = shoal.decide(observe(0, ready=2, arrivals=60.0, engines=full))
    # the router's 60/s is the demand: (60 + 120 / 30) / 39.37 -> 2, and one more
    assert first.panic and first.desired == 3
    draining = {REQUESTS_WAITING: 20.0, REQUESTS_RUNNING: 8.0}  # 120 -> 60 in 4 s
    second = shoal.decide(observe(4, ready=3, arrivals=60.0, engines=draining))
    # 60 waiting, shrinking 15/s: drained within 30 s, so the panic asks for the three
    # ready, not a fourth
    assert second.panic and second.per_metric["panic"] == 3 and second.desired == 3
    growing = {REQUESTS_WAITING: 40.0, REQUESTS_RUNNING: 8.0}  # 60 -> 120: not draining
    third = shoal.decide(observe(6, ready=3, arrivals=60.0, engines=growing))
    assert third.panic and third.desired == 4


def test_kv_pressure_asks_one_more_replica_unless_one_is_pending(profile: str) -> None:
    shoal = policy(profile)
    hot = {KV_CACHE_USAGE: 0.95, REQUESTS_RUNNING: 5, REQUESTS_WAITING: 0}
    first = shoal.decide(observe(0, arrivals=10.0, engines=hot))
    assert first.panic and first.desired == 2
    # the replica asked for is starting: it counts, nothing more is asked
    second = shoal.decide(observe(2, ready=1, pending=1, arrivals=10.0, engines=hot))
    assert second.panic and second.desired == 2


def test_ttft_over_the_slo_is_panic_while_requests_wait(profile: str) -> None:
    shoal = policy(profile)
    slow = {TTFT_MEAN_S: 1.5, REQUESTS_WAITING: 2.0}
    decision = shoal.decide(observe(0, ready=2, arrivals=10.0, engines=slow))
    assert decision.panic and decision.desired == 3
    # nothing waits: the TTFT is the tail of a queue already drained
    drained = shoal.decide(
        observe(2, ready=3, arrivals=10.0, engines={TTFT_MEAN_S: 1.5, REQUESTS_WAITING: 0.0})
    )
    assert not drained.panic


def test_long_prompts_need_more_replicas_at_the_same_rate(profile: str) -> None:
    def engines(prompt_tokens: int) -> dict[str, float]:
        per_replica_rate = 55.0 / 3
        return {
            REQUESTS_PER_S: per_replica_rate,
            PROMPT_TOKENS_PER_S: per_replica_rate * prompt_tokens,
            GENERATION_TOKENS_PER_S: per_replica_rate * 11,
        }

    shoal = policy(profile, mix_window_s=30)
    short = [
        shoal.decide(observe(t, ready=3, arrivals=55.0, engines=engines(16)))
        for t in (0, 10, 20, 30)
    ]
    assert [d.desired for d in short] == [ceil_div(55, PER_REPLICA)] * 4 == [2] * 4
    long = [
        shoal.decide(observe(t, ready=3, arrivals=55.0, engines=engines(1024)))
        for t in (40, 50, 60, 70, 80)
    ]
    # the mix window (30 s) still holds short-prompt rounds until t = 70
    assert long[-2].desired == long[-1].desired == ceil_div(55, PER_REPLICA_LONG) == 3
    # 4 rounds of 10 s at 55/s of 1024-token prompts, and the prior's 50 requests of 16
    assert "mix 1002/11" in long[-1].reason  # (1024 * 2200 + 16 * 50) / 2250


def test_pending_replicas_count_toward_capacity(profile: str) -> None:
    shoal = policy(profile)
    assert shoal.decide(observe(0, ready=1, arrivals=100.0)).desired == 3
    for t in (2, 4, 6):  # two replicas starting: the answer stays 3, never 5
        assert shoal.decide(observe(t, ready=1, pending=2, arrivals=100.0)).desired == 3


def test_unknown_metrics_hold_and_failed_scrapes_are_not_zero(profile: str) -> None:
    shoal = policy(profile)
    assert shoal.decide(observe(0, ready=3, arrivals=100.0)).desired == 3
    # router gone, every engine scrape failed: hold at spec, never scale down
    blind = shoal.decide(observe(2, ready=3, failed=3))
    assert (blind.desired, blind.recommendation) == (3, None)
    assert "unknown" in blind.reason
    # without the router the finished rate of the replicas that answered is extrapolated
    # over the ready ones: 30/s from one of two is 60/s, not 30/s
    fresh = policy(profile)
    one_failed = fresh.decide(observe(0, ready=2, engines={REQUESTS_PER_S: 30.0}, failed=1))
    assert one_failed.desired == ceil_div(60, PER_REPLICA) == 2


def test_scale_down_waits_for_the_delay_and_never_in_panic(profile: str) -> None:
    shoal = policy(profile)
    high = [shoal.decide(observe(t, ready=3, arrivals=100.0)).desired for t in (0, 10, 20)]
    low = [shoal.decide(observe(t, ready=3, arrivals=30.0)).desired for t in range(30, 110, 10)]
    assert high == [3, 3, 3]
    # a recommendation counts while younger than the 60 s window: the last 3 (t = 20)
    # is gone at 80, the 2 of t = 30 (the 10 s mean then was 65/s) at 90
    assert low == [3, 3, 3, 3, 3, 2, 1, 1]
    assert shoal.decide(observe(110, ready=1, spec=1, arrivals=30.0)).bounds == ""

    # five asked for, three ready, none pending (two failed to start), a queue: panic asks
    # 3 + 1, but in panic the desired count never drops below the five asked for
    panicked = policy(profile)
    panicked.decide(observe(0, ready=5, arrivals=180.0))
    queued = {REQUESTS_WAITING: 5.0, REQUESTS_RUNNING: 0.0}
    late = panicked.decide(observe(100, ready=3, spec=5, arrivals=1.0, engines=queued))
    assert late.panic and late.per_metric["panic"] == 4
    assert late.desired == 5 and late.bounds == "panic-no-scale-down"


def test_scale_to_zero_after_idle_and_back_on_held_requests(profile: str) -> None:
    shoal = policy(profile, min_replicas=0)
    assert shoal.decide(observe(0, arrivals=10.0)).desired == 1
    idle = [shoal.decide(observe(t, arrivals=0.0)) for t in range(10, 150, 10)]
    # idle since the first idle round (t = 10): zero at t = 130; one replica kept before
    assert [d.desired for d in idle] == [1] * 12 + [0, 0]
    # the window holds the 1 of t = 10 (the 10 s mean was 5/s) for 60 s, then the grace
    assert (idle[1].bounds, idle[6].bounds) == ("scale-down-delay", "scale-to-zero-grace")
    cold = shoal.decide(observe(150, ready=0, spec=0, arrivals=0.0))
    assert cold.desired == 0
    woken = shoal.decide(observe(160, ready=0, spec=0, arrivals=0.0, held=2))
    assert woken.desired == 1 and woken.per_metric["held"] == 1
    assert woken.bounds == "activation"
    # arrivals alone wake it too
    other = policy(profile, min_replicas=0)
    assert other.decide(observe(0, ready=0, spec=0, arrivals=0.5)).desired == 1


def test_a_wake_starts_from_its_own_demand_not_the_load_before_the_idle(profile: str) -> None:
    shoal = policy(profile, min_replicas=0, idle_s=30)  # shorter than the 60 s delay
    assert shoal.decide(observe(0, ready=3, arrivals=100.0)).desired == 3
    assert shoal.decide(observe(10, ready=3, arrivals=0.0)).desired == 3  # delay holds
    assert shoal.decide(observe(40, ready=3, arrivals=0.0)).desired == 0  # idle since 10
    woken = shoal.decide(observe(50, ready=0, spec=0, arrivals=1.0))
    assert woken.desired == 1 and woken.bounds == "activation"  # not 3: no delay window


def test_min_replicas_one_never_goes_to_zero(profile: str) -> None:
    shoal = policy(profile)
    decisions = [shoal.decide(observe(t, arrivals=0.0)) for t in range(0, 400, 100)]
    assert [d.desired for d in decisions] == [1, 1, 1, 1]


def test_metric_targets_join_and_the_largest_wins(profile: str) -> None:
    shoal = policy(
        profile, targets=(MetricTarget(KV_CACHE_USAGE, 0.5), MetricTarget("requests_waiting", 4))
    )
    decision = shoal.decide(observe(0, ready=2, arrivals=10.0, engines={KV_CACHE_USAGE: 0.8}))
    # KV: 2 * 0.8 / 0.5 = 3.2 -> 4; arrivals 10/s -> 1; waiting unknown
    assert decision.per_metric == {"slo": 1, KV_CACHE_USAGE: 4, "requests_waiting": None}
    assert decision.desired == 4


def test_options_are_checked(profile: str, tmp_path: Path) -> None:
    with pytest.raises(PolicyConfigError, match="unknown option"):
        policy(profile, stable_window_s=60)
    with pytest.raises(PolicyConfigError, match="profile"):
        policy(str(tmp_path / "missing.json"))
    with pytest.raises(PolicyConfigError, match="headroom"):
        policy(profile, headroom=1.5)
    with pytest.raises(PolicyConfigError, match="tpot_slo_s"):
        policy(profile, tpot_slo_s=0)


def test_the_default_profile_is_used_without_a_path() -> None:
    shoal = make_policy("shoal", PolicySpec(targets=()))
    decision = shoal.decide(observe(0, ready=1, arrivals=5.0))
    assert decision.desired == 1 and "(tpot, mix 512/128 tokens" in decision.reason


class TestShoalContract(PolicyContract):
    """The rules every policy keeps (tests/unit/autoscale_contract.py), with the default
    profile and SLOs: without router arrivals the SLO path is unknown and the contract's
    metric targets decide."""

    policy_name = "shoal"
    idle_period_s = 120.0  # idle_s


def test_a_pinned_queue_gets_no_more_replicas_than_it_can_use(profile: str) -> None:
    """400 requests wait on the one replica that took a step of 60/s: draining them in 30 s
    would ask (60 + 400 / 30) / 39.37 -> 2 replicas from the panic path and 100 from a
    ``requests_waiting:4`` target, but a waiting request stays on its engine; what helps
    is the demand's replicas (60 / 39.37 -> 2) plus the one holding the queue (it then
    gets no new work and drains at full speed): 3, for both."""
    shoal = policy(profile, targets=(MetricTarget(REQUESTS_WAITING, 4.0),))
    calm = {REQUESTS_RUNNING: 5.0, REQUESTS_WAITING: 0.0}
    assert shoal.decide(observe(0, arrivals=10.0, engines=calm)).desired == 1
    queued = {REQUESTS_RUNNING: 20.0, REQUESTS_WAITING: 400.0}
    decision = shoal.decide(observe(2, arrivals=60.0, engines=queued))
    assert decision.panic
    assert decision.per_metric[REQUESTS_WAITING] == ceil_div(60.0, PER_REPLICA) + 1 == 3
    assert decision.desired == 3
