"""Load-only strategies (placeholder set by the proxy helper so the router runs; the
strategies helper owns the final versions of this file).

* ``random``: every candidate costs 0; the pipeline's tie-break picks uniformly.
* ``least-request``: cost = the router-tracked requests in flight on the engine; an
  engine at ``max_in_flight_per_engine`` is refused (inf), so a fleet where every engine
  is that busy answers 429.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from router.strategies.base import Strategy, register
from router.types import EngineView, PrefixView, RouteRequest

__all__ = ["LeastRequest", "RandomStrategy"]


@register
class RandomStrategy(Strategy):
    name = "random"

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        return [0.0] * len(engines)


@register
class LeastRequest(Strategy):
    name = "least-request"

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        limit = self.deps.max_in_flight_per_engine
        return [float(e.in_flight) if e.in_flight < limit else math.inf for e in engines]

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        return "load"
