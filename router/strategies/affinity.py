"""Affinity strategies: session-affinity (bounded-load consistent hashing) and lora-affinity.

``session-affinity`` keeps a conversation on one engine so its growing prefix stays in that
engine's cache, without a table of sessions: every router process hashes the session id
(``RouteRequest.session_id``, from the session header) onto the same ring of engines, so
replicas agree with no shared state.

Algorithm (consistent hashing with bounded loads, Mirrokni, Thorup and Zadimoghaddam,
SODA'18, as HAProxy and Envoy use it):

1. Each engine id owns ``virtual_nodes`` points ``xxh3_64(f"{engine_id}#{i}")`` on a 64-bit
   ring; the session's point is ``xxh3_64(session_id)``.
2. Walking clockwise from the session's point lists the engines in the session's own
   preference order; the first one is its home.
3. Capacity is ``ceil(bounded_load_factor x (in_flight over all candidates + 1) / n)``: an
   engine with ``in_flight >= capacity`` is full for this request, and the session goes to
   the next engine in its order that is not (there always is one, since the factor is
   above 1: the least loaded engine is below the mean).
4. Costs are the positions in that order, full engines shifted behind every engine that
   is not (position + n); saturated engines are refused like everywhere.

Properties: adding or removing one of n engines moves about 1/n of the sessions (only
those whose home is the new or the gone engine); no engine holds more than
``bounded_load_factor`` times the mean in-flight load, so a hot session spills to its
second engine instead of making a hot spot (issue 12, complaint 2). The ring is rebuilt
only when the set of candidate ids changes (one ring cached). An unhealthy engine is not
a candidate (the pipeline filters it), so its sessions go to their next engine and return
home when it recovers: affinity never pins a session to a dead engine (issue 12,
complaint 4). Without a session id the request is placed by least-request (reason
``"no-session"``).

How it fails: loads are the router-tracked in-flight counts, so with several replicas and
no shared ledger each bounds only its own share; a spilled session loses its cache for that
turn (that is the point of the bound); sessions of very different weights are balanced by
count, not tokens.

``lora-affinity`` prefers engines that already serve the requested model name as an
adapter: those whose scraped ``loras_loaded`` (adapters running or waiting, vLLM's
``lora_requests_info``) or whose ``models`` (from ``/v1/models``) contain it; among the
preferred, then among the rest, least-request decides: an engine without the adapter
must load it (a fetch, and possibly the eviction of another adapter) before the first
token. It fails by piling an adapter's traffic on the engines that have it while others
idle, since it never spreads an adapter on purpose; a mix with least-request bounds that.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import ClassVar

import xxhash

from router.strategies.base import Strategy, StrategyDeps, register
from router.strategies.signals import in_flight_costs, lexicographic, refuse_saturated
from router.types import EngineView, PrefixView, RouteRequest

__all__ = ["LoraAffinity", "SessionAffinity"]


class _Ring:
    """Points of every engine id on a 64-bit hash ring, sorted."""

    def __init__(self, engine_ids: frozenset[str], virtual_nodes: int) -> None:
        points = sorted(
            (xxhash.xxh3_64_intdigest(f"{engine_id}#{i}".encode()), engine_id)
            for engine_id in engine_ids
            for i in range(virtual_nodes)
        )
        self.engine_ids = engine_ids
        self._hashes = [h for h, _ in points]
        self._owners = [owner for _, owner in points]

    def order(self, key: str) -> list[str]:
        """Every engine id once, clockwise from ``key``'s point: the key's preference order."""
        start = bisect.bisect_left(self._hashes, xxhash.xxh3_64_intdigest(key.encode()))
        seen: dict[str, None] = {}
        total = len(self._owners)
        for step in range(total):
            seen.setdefault(self._owners[(start + step) % total])
            if len(seen) == len(self.engine_ids):
                break
        return list(seen)


@register
class SessionAffinity(Strategy):
    """A session stays on its home engine on the hash ring while that engine is under c x mean."""

    name = "session-affinity"
    virtual_nodes: ClassVar[int] = 160

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        assert deps.bounded_load_factor > 1, "a bounded load factor of 1 or less fits nobody"
        self._ring: _Ring | None = None
        self._home: str | None = None  # the last scored session's home (None: no session)

    def _ring_for(self, engines: Sequence[EngineView]) -> _Ring:
        ids = frozenset(e.engine_id for e in engines)
        if self._ring is None or self._ring.engine_ids != ids:
            self._ring = _Ring(ids, self.virtual_nodes)
        return self._ring

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        self._home = None
        if not request.session_id or not engines:
            return refuse_saturated(in_flight_costs(engines), engines, self.deps)
        order = self._ring_for(engines).order(request.session_id)
        total = sum(e.in_flight for e in engines)
        capacity = math.ceil(self.deps.bounded_load_factor * (total + 1) / len(engines))
        by_id = {e.engine_id: e for e in engines}
        cost: dict[str, float] = {}
        for position, engine_id in enumerate(order):
            full = by_id[engine_id].in_flight >= capacity
            cost[engine_id] = float(position + (len(order) if full else 0))
        self._home = order[0]
        return refuse_saturated([cost[e.engine_id] for e in engines], engines, self.deps)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        if self._home is None:
            return "no-session"
        return "session" if chosen.engine_id == self._home else "spill"


@register
class LoraAffinity(Strategy):
    """Engines already serving the requested adapter first, then least-request."""

    name = "lora-affinity"

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self._model = ""

    @staticmethod
    def has_adapter(engine: EngineView, model: str) -> bool:
        loaded = engine.metrics.loras_loaded if engine.metrics is not None else frozenset()
        return model in engine.models or model in loaded

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        self._model = request.model
        misses = [0.0 if self.has_adapter(e, request.model) else 1.0 for e in engines]
        costs = lexicographic(misses, in_flight_costs(engines))
        return refuse_saturated(costs, engines, self.deps)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        return "lora-hit" if self.has_adapter(chosen, self._model) else "lora-miss"
