"""Filter -> score -> pick: one routing decision per request.

::

    candidates = engines that are healthy, whose breaker allows, that serve the model,
                 and that this request has not failed on already (retries)
    strategy   = header x-shoal-routing-strategy, else AIBrix's routing-strategy, else
                 the default (--strategy); a name or a weighted mix "a:2,b:1"
    prefix     = PrefixLocator.locate(...) only when a member ``uses_prefix`` (None when
                 there is no locator, it fails, or it takes longer than locate_timeout_s;
                 the prefix-cache strategy falls back to its own approximate index)
    costs      = one member: its costs as they are; a mix: each member's finite costs
                 min-max normalised to [0, 1] (all equal -> 0), weighted, summed
    pick       = drop inf (refused) candidates; the cheapest wins, ties broken by the
                 injected rng; none left -> Saturated (429, Retry-After)

Invariant: ``route`` returns an engine that passed the filter and that no member refused;
each member's ``routed`` hook is told the choice before ``route`` returns. Strategy
instances are built once per name and shared by every mix that names them, so a
strategy's learned state (round-robin's cursor, the approximate index, virtual token
counters) is one per process whatever the per-request header says.

Every decision logs one debug line with each member's cost per engine (formatted only
when debug logging is on: the hot path pays one ``isEnabledFor``).

Rejected: a mix that multiplies costs (one member's zero erases the others); z-score
normalisation (unstable with two candidates).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from router.errors import ModelNotFound, NoEngineAvailable, RouterError, Saturated
from router.strategies import STRATEGIES, MixMember, Strategy, StrategyDeps, parse_mix
from router.types import EngineView, PrefixView, RouteDecision, RouteOutcome, RouteRequest
from shoal.errors import ShoalError

__all__ = ["STRATEGY_HEADERS", "Pipeline", "PrefixLocator", "combine"]

log = logging.getLogger("shoal." + __name__)

STRATEGY_HEADERS = ("x-shoal-routing-strategy", "routing-strategy")
_MAX_CACHED_MIXES = 256


class PrefixLocator(Protocol):
    async def locate(
        self, request: RouteRequest, engines: Sequence[EngineView]
    ) -> PrefixView | None: ...

    async def close(self) -> None: ...


def _normalised(costs: Sequence[float]) -> list[float]:
    finite = [c for c in costs if math.isfinite(c)]
    if not finite:
        return list(costs)
    low, high = min(finite), max(finite)
    span = high - low
    if span <= 0:
        return [0.0 if math.isfinite(c) else math.inf for c in costs]
    return [(c - low) / span if math.isfinite(c) else math.inf for c in costs]


def combine(members: Sequence[MixMember], costs: Sequence[Sequence[float]]) -> list[float]:
    """A mix's total cost per candidate: one member's costs as they are; several members'
    min-max normalised costs, weighted and summed (inf from any member stays inf)."""
    if len(members) == 1:
        return list(costs[0])
    totals = [0.0] * len(costs[0])
    for member, member_costs in zip(members, costs, strict=True):
        for i, cost in enumerate(_normalised(member_costs)):
            totals[i] += member.weight * cost
    return totals


class Pipeline:
    """Chooses an engine per request; owns the strategy instances."""

    def __init__(
        self,
        default: str,
        deps: StrategyDeps,
        *,
        locator: PrefixLocator | None = None,
        locate_timeout_s: float = 0.05,
        retry_after_s: float = 1.0,
    ) -> None:
        self.deps = deps
        self._rng: random.Random = deps.rng
        self._locator = locator
        self.locator = locator  # read-only use: its statistics() for /metrics
        self._locate_timeout_s = locate_timeout_s
        self._retry_after_s = retry_after_s
        self._instances: dict[str, Strategy] = {}
        self._mixes: dict[str, tuple[MixMember, ...]] = {}
        self.default = default
        self.default_members = self.members(default)  # UnknownStrategy at start

    def members(self, text: str) -> tuple[MixMember, ...]:
        """The parsed mix of ``text`` (cached; ``UnknownStrategy`` when it does not parse)."""
        members = self._mixes.get(text)
        if members is None:
            members = parse_mix(text)
            if len(self._mixes) >= _MAX_CACHED_MIXES:
                self._mixes.clear()
            self._mixes[text] = members
        return members

    def strategy(self, name: str) -> Strategy:
        instance = self._instances.get(name)
        if instance is None:
            instance = STRATEGIES[name](self.deps)
            self._instances[name] = instance
        return instance

    def choose_text(self, headers: Mapping[str, str]) -> str:
        for header in STRATEGY_HEADERS:
            value = headers.get(header)
            if value:
                return value
        return self.default

    def candidates(
        self,
        request: RouteRequest,
        engines: Sequence[EngineView],
        allows: Callable[[str], bool],
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> list[EngineView]:
        """Engines the request may go to; ``NoEngineAvailable`` or 404 when none."""
        serving = [
            e for e in engines if not request.model or not e.models or request.model in e.models
        ]
        if not serving:
            if any(allows(e.engine_id) for e in engines):
                raise ModelNotFound(request.model)
            raise NoEngineAvailable("no engine is healthy", retry_after_s=self._retry_after_s)
        candidates = [e for e in serving if e.engine_id not in exclude and allows(e.engine_id)]
        if not candidates:
            raise NoEngineAvailable(
                f"no healthy engine serves {request.model or 'the model'}",
                retry_after_s=self._retry_after_s,
            )
        return candidates

    async def _locate(
        self, request: RouteRequest, candidates: Sequence[EngineView]
    ) -> PrefixView | None:
        if self._locator is None:
            return None
        try:
            return await asyncio.wait_for(
                self._locator.locate(request, candidates), self._locate_timeout_s
            )
        except TimeoutError:
            log.debug("prefix lookup of %s timed out", request.request_id)
        except (ShoalError, OSError) as exc:
            log.warning("prefix lookup of %s failed: %s", request.request_id, exc)
        return None

    async def route(
        self,
        request: RouteRequest,
        engines: Sequence[EngineView],
        allows: Callable[[str], bool],
        *,
        strategy: str | None = None,
        exclude: frozenset[str] | set[str] = frozenset(),
    ) -> RouteDecision:
        text = strategy or self.default
        members = self.members(text)
        candidates = self.candidates(request, engines, allows, exclude)
        strategies = [self.strategy(m.name) for m in members]
        prefix = None
        if any(s.uses_prefix for s in strategies):
            prefix = await self._locate(request, candidates)
        costs = [s.score(request, candidates, prefix) for s in strategies]
        for member, member_costs in zip(members, costs, strict=True):
            assert len(member_costs) == len(candidates), (
                f"strategy {member.name} returned {len(member_costs)} costs for "
                f"{len(candidates)} candidates"
            )
        totals = combine(members, costs)
        best = min(totals)
        if not math.isfinite(best):
            raise Saturated(
                f"every engine serving {request.model or 'the model'} is saturated",
                retry_after_s=self._retry_after_s,
            )
        tied = [i for i, total in enumerate(totals) if total <= best]
        index = tied[0] if len(tied) == 1 else self._rng.choice(tied)
        chosen = candidates[index]
        for s in strategies:
            s.routed(request, chosen)
        leader = max(range(len(members)), key=lambda i: members[i].weight)
        reason = strategies[leader].reason(chosen, prefix)
        if len(candidates) == 1:
            reason = "only-candidate"
        scores = {
            m.name: {c.engine_id: cost for c, cost in zip(candidates, member_costs, strict=True)}
            for m, member_costs in zip(members, costs, strict=True)
        }
        decision = RouteDecision(
            engine_id=chosen.engine_id,
            strategy=text,
            reason=reason,
            scores=scores,
            cached_tokens=strategies[leader].cached_tokens(chosen, prefix),
            prompt_tokens=prefix.prompt_tokens if prefix is not None else request.prompt_tokens,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "route %s model=%s tokens=%d strategy=%s -> %s (%s) scores=%s",
                request.request_id,
                request.model,
                request.prompt_tokens,
                text,
                chosen.engine_id,
                reason,
                {m: {e: round(c, 6) for e, c in s.items()} for m, s in scores.items()},
            )
        return decision

    def observe(self, decision: RouteDecision, outcome: RouteOutcome) -> None:
        """Tell every member of the deciding strategy how the request went."""
        try:
            members = self.members(decision.strategy)
        except RouterError:
            return
        for member in members:
            self.strategy(member.name).observe(outcome)
