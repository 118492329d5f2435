"""Every classic policy keeps the shared rules (tests/unit/autoscale_contract.py)."""

from __future__ import annotations

from tests.unit.autoscale_contract import PolicyContract


class TestKpaContract(PolicyContract):
    policy_name = "kpa"
    idle_period_s = 90.0  # stable window 60 s + scale-to-zero grace 30 s


class TestApaContract(PolicyContract):
    policy_name = "apa"
    idle_period_s = 210.0  # stable window 180 s + grace 30 s


class TestHpaContract(PolicyContract):
    policy_name = "hpa"
    idle_period_s = 300.0  # the scale-down stabilization window


class TestAibrixKpaContract(PolicyContract):
    policy_name = "aibrix-kpa"
    idle_period_s = 0.0  # the most aggressive recommendation: zero as soon as it is 0
    keeps_unknown_and_pending = False
