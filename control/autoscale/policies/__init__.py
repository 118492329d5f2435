"""Autoscaling policies; importing this package registers each of them in ``POLICIES``.

::

    base.py        Policy protocol, registry, options, multi-metric and bound helpers
    windows.py     time windows on injected time, observed signals, the shared zero rule
    kpa.py         kpa: Knative's KPA, faithfully (stable/panic windows, held panic)
    apa.py         apa: AIBrix's APA (tolerance bands, scale rates)
    hpa.py         hpa: the Kubernetes HPA formula, tolerance and behaviour
    aibrix_kpa.py  aibrix-kpa: AIBrix HEAD's KPA as it behaves, bugs included (simulator)
    shoal.py       shoal: SLO-driven from a capacity model, trend-proactive, fast panic
"""

from __future__ import annotations

from control.autoscale.policies import aibrix_kpa, apa, hpa, kpa, shoal  # noqa: F401  (register)
from control.autoscale.policies.base import POLICIES, Policy, make_policy

__all__ = ["POLICIES", "Policy", "make_policy"]
