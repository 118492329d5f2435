"""Load signals every strategy reads the same way: saturation, the router's own load, freshness.

Invariant: a strategy never reads a missing metric as zero. ``EngineView.metrics`` is
``None`` when the scrape is stale or failed, and each field is ``None`` when the engine does
not export it; the helpers here return ``None`` for "unknown" and the callers fall back to
the router-local in-flight accounting (``in_flight``, ``in_flight_tokens``), which is always
known because the router itself produced it (issue 12, complaint 3: AIBrix #1185, GIE #1497,
where missing metrics silently turned into zeros and every request went to the engine that
had not reported).

Saturation is the router's own count reaching ``StrategyDeps.max_in_flight_per_engine``:
every strategy refuses (``math.inf``) a saturated engine, so the pipeline answers
``Saturated`` (429/503 with Retry-After) only when all candidates are saturated, whichever
strategy the client chose. Rejected: saturation from scraped ``num_waiting`` (stale by up to
a scrape interval, and absent on some engines); it feeds the cost models instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from router.strategies.base import StrategyDeps
from router.types import EngineView

__all__ = [
    "fresh_waiting",
    "in_flight_costs",
    "is_saturated",
    "refuse_saturated",
]


def is_saturated(engine: EngineView, deps: StrategyDeps) -> bool:
    """The router already has ``max_in_flight_per_engine`` requests on ``engine``."""
    return engine.in_flight >= deps.max_in_flight_per_engine


def refuse_saturated(
    costs: Sequence[float], engines: Sequence[EngineView], deps: StrategyDeps
) -> list[float]:
    """``costs`` with every saturated engine's cost replaced by ``math.inf``."""
    assert len(costs) == len(engines), "one cost per candidate"
    return [math.inf if is_saturated(e, deps) else c for c, e in zip(costs, engines, strict=True)]


def in_flight_costs(engines: Sequence[EngineView]) -> list[float]:
    """Least-request order as one number: requests in flight, then their pending tokens.

    ``in_flight + in_flight_tokens / (1 + max in_flight_tokens)``: the fraction is below one,
    so requests always dominate and pending prompt tokens only break ties between engines
    with as many requests (a long prompt waiting costs more than a short one).
    """
    scale = 1.0 + max((e.in_flight_tokens for e in engines), default=0)
    return [e.in_flight + e.in_flight_tokens / scale for e in engines]


def fresh_waiting(engine: EngineView) -> float | None:
    """Requests the engine itself reports waiting, or ``None`` when unknown (stale, absent)."""
    if engine.metrics is None or engine.metrics.num_waiting is None:
        return None
    return max(0.0, engine.metrics.num_waiting)
