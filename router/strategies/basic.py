"""Load-only strategies: random, round-robin, least-request and power-of-two choices.

None of them looks at the prompt; they are the baselines the issue's benchmark compares
against and the load terms of weighted mixes (``least-request:2,prefix-cache:1``). Each
refuses (``math.inf``) an engine the router already has ``max_in_flight_per_engine``
requests on (``signals.refuse_saturated``), so every strategy agrees on saturation.

Choices, and how each fails:

* ``random``: one candidate drawn by the injected rng costs 0, the others 1 (the picker
  shape of ``base.py``). Fails by ignoring load: with skewed request sizes one engine's queue
  grows while others idle (the issue's "random" arm, p90 TTFT far above the oracle's).
* ``round-robin``: the cursor is the id of the engine chosen last (learned in ``routed``),
  not an index, so engines coming and going do not shift the rotation: the costs are the
  candidates' ranks in engine-id order starting after the cursor (0, 1, 2, ...), so a
  saturated next engine (inf) passes the turn to the one after it. With several router
  processes each keeps its own cursor (they interleave, still spreading evenly). Fails like
  random on skewed request sizes.
* ``least-request``: the router's own in-flight requests, ties broken by their pending
  uncached prompt tokens (``signals.in_flight_costs``); never scraped metrics, which are
  stale by a scrape interval. Fails when requests differ wildly in decode length (a request
  is a request) and, alone, ignores every cache.
* ``power-of-two`` (Mitzenmacher; Ray Serve's ``pow_2_router``): two distinct candidates
  drawn by the injected rng; the less loaded by least-request's order costs 0, the other
  0.5, every candidate not drawn costs 1 (not inf: in a mix the other members may still
  prefer an engine that was not drawn, and a refusal would turn into a spurious Saturated).
  Ties between the two go to the first drawn. Fails like least-request but without its
  herd: several router processes with the same stale view do not all pick the same engine.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from router.strategies.base import Strategy, StrategyDeps, register
from router.strategies.signals import in_flight_costs, refuse_saturated
from router.types import EngineView, PrefixView, RouteRequest

__all__ = ["LeastRequest", "PowerOfTwo", "RandomChoice", "RoundRobin"]


@register
class RandomChoice(Strategy):
    """One candidate drawn uniformly costs 0, the rest 1."""

    name = "random"

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        if not engines:
            return []
        pick = self.deps.rng.randrange(len(engines))
        costs = [0.0 if i == pick else 1.0 for i in range(len(engines))]
        return refuse_saturated(costs, engines, self.deps)


@register
class RoundRobin(Strategy):
    """Candidates ranked in engine-id order, starting after the engine chosen last."""

    name = "round-robin"

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self._last_id: str | None = None

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        if not engines:
            return []
        ids = sorted(e.engine_id for e in engines)
        # the first id after the cursor (cyclically) ranks 0
        start = 0 if self._last_id is None else bisect.bisect_right(ids, self._last_id) % len(ids)
        rank = {engine_id: (i - start) % len(ids) for i, engine_id in enumerate(ids)}
        costs = [float(rank[e.engine_id]) for e in engines]
        return refuse_saturated(costs, engines, self.deps)

    def routed(self, request: RouteRequest, chosen: EngineView) -> None:
        self._last_id = chosen.engine_id


@register
class LeastRequest(Strategy):
    """Fewest router-tracked requests in flight, then fewest pending prompt tokens."""

    name = "least-request"

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        return refuse_saturated(in_flight_costs(engines), engines, self.deps)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        return "load"


@register
class PowerOfTwo(Strategy):
    """Two candidates drawn at random; the less loaded costs 0, the other 0.5, the rest 1."""

    name = "power-of-two"

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        costs = [1.0] * len(engines)
        if len(engines) == 1:
            costs[0] = 0.0
        elif engines:
            first, second = self.deps.rng.sample(range(len(engines)), 2)
            load = in_flight_costs(engines)
            better, worse = (second, first) if load[second] < load[first] else (first, second)
            costs[better], costs[worse] = 0.0, 0.5
        return refuse_saturated(costs, engines, self.deps)
