"""The rules every autoscaling policy keeps (issue 13), as one test class to inherit.

A policy's test module subclasses ``PolicyContract`` and names the policy::

    class TestKpaContract(PolicyContract):
        policy_name = "kpa"
        idle_period_s = 90.0   # how long it waits, idle, before scaling to zero
        options = {}           # tunables every test builds the policy with

``make`` builds the policy on the given targets (default: running requests, target 1)
and bounds; a policy that needs more (a capacity profile) overrides it.

All rounds are virtual: one per second from ``t = 0`` unless a test says otherwise; the
metric is ``REQUESTS_RUNNING`` with a target of 1 per replica, so a replica reporting 2
running requests is twice as loaded as wanted.

``aibrix-kpa`` (AIBrix HEAD, bugs included) sets ``keeps_unknown_and_pending = False``:
it counts a failed scrape as 0 and ignores pending replicas, which its own tests show.
"""

from __future__ import annotations

from dataclasses import replace
from typing import ClassVar

import pytest

from control.autoscale.errors import PolicyConfigError
from control.autoscale.policies import POLICIES
from control.autoscale.policies.base import Policy, make_policy
from control.autoscale.types import (
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    ScaleInput,
)
from tests.unit.autoscale_factories import make_spec, observe

__all__ = ["PolicyContract"]

IDLE_ROUTER = {ROUTER_HELD: 0.0, ROUTER_ARRIVALS_PER_S: 0.0, ROUTER_IN_FLIGHT: 0.0}


class PolicyContract:
    """Inherit, set ``policy_name`` and ``idle_period_s``; every test here then runs."""

    policy_name: ClassVar[str]
    idle_period_s: ClassVar[float]
    keeps_unknown_and_pending: ClassVar[bool] = True
    options: ClassVar[dict[str, float | str]] = {}

    def make(self, *targets: tuple[str, float], **bounds: int) -> Policy:
        spec = make_spec(*targets, **bounds)
        return make_policy(self.policy_name, replace(spec, options=dict(self.options)))

    def steady(self, subject: Policy, *, ready: int, per_replica: float, seconds: int) -> None:
        """Rounds ``0 .. seconds-1`` at a constant per-replica load."""
        for t in range(seconds):
            subject.decide(observe(float(t), ready=ready, per_replica=per_replica))

    def _needs_contract(self, rule: str) -> None:
        if not self.keeps_unknown_and_pending:
            pytest.skip(f"{self.policy_name} breaks the {rule} rule on purpose (its own tests)")

    # -- construction -----------------------------------------------------------------

    def test_is_registered_under_its_name(self) -> None:
        assert self.policy_name in POLICIES
        assert type(self.make()).name == self.policy_name

    def test_an_unknown_option_is_rejected(self) -> None:
        spec = replace(make_spec(), options={**self.options, "no_such_option": 1.0})
        with pytest.raises(PolicyConfigError, match="no_such_option"):
            make_policy(self.policy_name, spec)

    def test_time_must_not_go_backwards(self) -> None:
        subject = self.make()
        subject.decide(observe(10.0, ready=1, per_replica=1.0))
        with pytest.raises(AssertionError, match="backwards"):
            subject.decide(observe(9.0, ready=1, per_replica=1.0))

    # -- unknown holds ----------------------------------------------------------------

    def test_at_target_it_keeps_the_count(self) -> None:
        subject = self.make()
        decisions = [
            subject.decide(observe(float(t), ready=3, per_replica=1.0)) for t in range(400)
        ]
        assert {d.desired for d in decisions} == {3}
        assert decisions[-1].recommendation == 3

    def test_all_unknown_from_the_start_holds_at_spec(self) -> None:
        self._needs_contract("unknown-holds")
        subject = self.make()
        for t in range(100):
            decision = subject.decide(observe(float(t), ready=3, per_replica=5.0, failed=3))
            assert decision.desired == 3
            assert decision.recommendation is None
            assert set(decision.per_metric.values()) == {None}

    def test_failed_scrapes_after_load_never_read_as_idle(self) -> None:
        self._needs_contract("unknown-holds")
        subject = self.make()
        self.steady(subject, ready=3, per_replica=1.0, seconds=400)
        decisions = [
            subject.decide(observe(float(t), ready=3, per_replica=0.0, failed=3))
            for t in range(400, 1000)
        ]
        assert {d.desired for d in decisions} == {3}
        assert decisions[-1].recommendation is None  # the windows ran dry: unknown

    def test_one_failed_replica_is_not_idle(self) -> None:
        self._needs_contract("unknown-holds")
        subject = self.make()
        self.steady(subject, ready=4, per_replica=1.0, seconds=400)
        decisions = [
            subject.decide(observe(float(t), ready=4, per_replica=1.0, failed=1))
            for t in range(400, 1000)
        ]
        assert {d.desired for d in decisions} == {4}

    # -- pending counts ---------------------------------------------------------------

    def test_pending_replicas_are_not_asked_for_again(self) -> None:
        """2 ready replicas at twice the target ask for 4; while 2 more start (and the
        same 2 stay hot), the policy keeps asking for 4, not 8 (AIBrix RFC #2670)."""
        self._needs_contract("pending-counts")
        subject = self.make(max_replicas=50)
        first = subject.decide(observe(0.0, ready=2, per_replica=2.0))
        assert first.desired == 4
        for t in range(1, 120):
            decision = subject.decide(observe(float(t), ready=2, per_replica=2.0, pending=2))
            assert decision.desired == 4, decision.reason

    # -- bounds -----------------------------------------------------------------------

    def test_never_above_max_replicas(self) -> None:
        subject = self.make(max_replicas=5)
        spec = 1
        for t in range(200):
            decision = subject.decide(observe(float(t), ready=spec, per_replica=50.0))
            assert 1 <= decision.desired <= 5
            spec = decision.desired
        assert spec == 5
        assert "max-replicas" in decision.bounds

    def test_never_below_min_replicas(self) -> None:
        subject = self.make(min_replicas=3, max_replicas=8)
        spec = 8
        for t in range(1000):
            decision = subject.decide(
                observe(float(t), ready=spec, per_replica=0.0, router=IDLE_ROUTER)
            )
            assert 3 <= decision.desired <= 8
            spec = decision.desired
        assert spec == 3

    # -- multi-metric -----------------------------------------------------------------

    def test_the_largest_known_recommendation_wins(self) -> None:
        """Each metric decides as it would alone; the larger count is asked for."""
        running, waiting = (REQUESTS_RUNNING, 1.0), (REQUESTS_WAITING, 2.0)
        both = self.make(running, waiting, max_replicas=50)
        alone = {m: self.make((m, target), max_replicas=50) for m, target in (running, waiting)}
        load = {REQUESTS_RUNNING: 1.0, REQUESTS_WAITING: 20.0}
        for t in range(30):
            round_ = observe(float(t), ready=4, per_replica=load)
            decision = both.decide(round_)
            singles = {m: p.decide(round_) for m, p in alone.items()}
            assert decision.desired == max(d.desired for d in singles.values())
            for metric, single in singles.items():
                assert decision.per_metric[metric] == single.per_metric[metric]
        by_waiting = decision.per_metric[REQUESTS_WAITING]
        by_running = decision.per_metric[REQUESTS_RUNNING]
        assert by_waiting is not None and by_running is not None
        assert by_waiting > by_running

    def test_a_known_metric_decides_when_another_is_unknown(self) -> None:
        self._needs_contract("unknown-holds")
        targets = ((REQUESTS_RUNNING, 1.0), (REQUESTS_WAITING, 2.0))
        subject = self.make(*targets, max_replicas=50)
        decision = subject.decide(observe(0.0, ready=2, per_replica={REQUESTS_WAITING: 4.0}))
        assert decision.per_metric[REQUESTS_RUNNING] is None
        assert decision.per_metric[REQUESTS_WAITING] == 4
        assert decision.recommendation == 4
        assert decision.desired == 4

    # -- zero -------------------------------------------------------------------------

    def _idle_round(self, t: float, ready: int) -> ScaleInput:
        return observe(t, ready=ready, per_replica=0.0, router=IDLE_ROUTER)

    def test_scale_to_zero_only_after_the_idle_period(self) -> None:
        subject = self.make(min_replicas=0)
        spec = 1
        first_zero = None
        for t in range(int(self.idle_period_s) + 60):
            decision = subject.decide(self._idle_round(float(t), spec))
            spec = decision.desired
            if spec == 0 and first_zero is None:
                first_zero = t
            if first_zero is not None:
                assert spec == 0
        assert first_zero == self.idle_period_s

    def test_no_scale_to_zero_when_min_replicas_is_one(self) -> None:
        subject = self.make(min_replicas=1)
        for t in range(int(self.idle_period_s) + 600):
            assert subject.decide(self._idle_round(float(t), 1)).desired == 1

    def test_demand_restarts_the_idle_period(self) -> None:
        if self.idle_period_s < 2:
            pytest.skip(f"{self.policy_name} scales to zero at once")
        subject = self.make(min_replicas=0)
        half = int(self.idle_period_s // 2)
        for t in range(half):
            assert subject.decide(self._idle_round(float(t), 1)).desired == 1
        busy = {**IDLE_ROUTER, ROUTER_ARRIVALS_PER_S: 0.5}
        subject.decide(observe(float(half), ready=1, per_replica=0.0, router=busy))
        for t in range(half + 1, half + 1 + int(self.idle_period_s)):
            decision = subject.decide(self._idle_round(float(t), 1))
            assert decision.desired == 1, f"t={t}: {decision.reason}"

    def test_from_zero_held_requests_ask_for_one(self) -> None:
        subject = self.make(min_replicas=0)
        at_zero = subject.decide(observe(0.0, ready=0, router=IDLE_ROUTER))
        assert at_zero.desired == 0
        held = {**IDLE_ROUTER, ROUTER_HELD: 1.0}
        woken = subject.decide(observe(1.0, ready=0, router=held))
        assert woken.desired == 1
        assert "activation" in woken.bounds

    def test_from_zero_arrivals_ask_for_one(self) -> None:
        subject = self.make(min_replicas=0)
        arriving = {**IDLE_ROUTER, ROUTER_ARRIVALS_PER_S: 2.0}
        assert subject.decide(observe(0.0, ready=0, router=arriving)).desired == 1

    def test_a_starting_first_replica_is_kept(self) -> None:
        subject = self.make(min_replicas=0)
        held = {**IDLE_ROUTER, ROUTER_HELD: 3.0}
        for t in range(60):  # the first replica takes a minute to start
            decision = subject.decide(observe(float(t), ready=0, pending=1, router=held))
            assert decision.desired >= 1

    def test_the_reason_names_inputs_and_result(self) -> None:
        decision = self.make().decide(observe(0.0, ready=2, per_replica=3.0))
        assert self.policy_name in decision.reason
        assert f"desired {decision.desired}" in decision.reason
        assert "\n" not in decision.reason
