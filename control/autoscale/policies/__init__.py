"""Autoscaling policies; importing this package registers each of them in ``POLICIES``.

::

    base.py        Policy protocol, registry, options, multi-metric and bound helpers
    windows.py     time-windowed averages and maxima on injected time (pure)
    kpa.py         kpa: Knative's KPA, faithfully (stable/panic windows, held panic)
    apa.py         apa: AIBrix's APA (tolerance bands, scale rates)
    hpa.py         hpa: the Kubernetes HPA formula, tolerance and behaviour
    aibrix_kpa.py  aibrix-kpa: AIBrix HEAD's KPA as it behaves, bugs included (simulator)
    shoal.py       shoal: SLO-driven from a capacity model, trend-proactive, fast panic
"""

from __future__ import annotations

import contextlib
import importlib

from control.autoscale.policies.base import POLICIES, Policy, make_policy

__all__ = ["POLICIES", "Policy", "make_policy"]

# Each policy module registers itself; modules not written yet are skipped (issue 13 work
# in progress lands module by module).
for _module in ("kpa", "apa", "hpa", "aibrix_kpa", "shoal"):
    with contextlib.suppress(ModuleNotFoundError):
        importlib.import_module(f"control.autoscale.policies.{_module}")
