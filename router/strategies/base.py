"""Routing strategies: one small class each, one ``score`` hook (STYLE.md §11).

The pipeline (``router/pipeline.py``) filters candidates (healthy, breaker closed, serves
the model), asks the chosen strategy (or each member of a weighted mix) for one **cost per
candidate, lower is better**, and picks the cheapest; ties are broken by the injected
random generator, so equal engines share load instead of the first one taking it all.

A mix (``least-request:2,prefix-cache:1``) normalises each member's costs to [0, 1] over
the candidates (min-max; all-equal costs become 0) and sums them with the weights, so a
member measured in seconds and one measured in requests can be combined. A single
strategy's costs are used as they are.

Strategies that need to know where the prompt's prefix lives set ``uses_prefix``; the
pipeline then passes a ``PrefixView`` (precise from the cluster index, or approximate),
otherwise ``None``. Strategies that learn (round-robin's cursor, the approximate index,
virtual token counters) do so in ``observe``, called by the proxy after each request, and
in ``routed``, called once the pipeline has chosen. ``cached_tokens`` says how much of the
prompt the chosen engine is expected to reuse, so the ledger counts only uncached tokens
as pending prefill (strategies with their own index know what the pipeline cannot).

Invariant: ``score`` returns exactly one finite or ``math.inf`` cost per candidate, in the
candidates' order; ``math.inf`` marks a candidate the strategy refuses (the pipeline drops
it, and answers ``Saturated`` if none is left). ``score`` does no I/O and never blocks.

Rejected: separate filter/scorer/picker plug-in types per strategy (AIBrix, GIE): most
strategies are one of the three, and a cost vector expresses all of them (a filter is
``inf``, a picker is 0 for its choice and 1 for the rest), so mixes compose any of them.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from router.errors import UnknownStrategy
from router.types import EngineView, PlacementPlan, PrefixView, RouteOutcome, RouteRequest

__all__ = [
    "STRATEGIES",
    "MixMember",
    "Strategy",
    "StrategyDeps",
    "no_plan",
    "parse_mix",
    "register",
    "uncounted",
]


def no_plan() -> PlacementPlan | None:
    """The placement plan of a router without ``--placement-url``: none."""
    return None


def uncounted(outcome: str) -> None:
    """Where placement outcomes go without metrics (tests, ``check_settings``): nowhere."""


@dataclass(frozen=True, slots=True)
class StrategyDeps:
    """What every strategy may be built with: time, randomness, the placement plan and
    tunables injected.

    ``placement`` answers the current plan (or None: no planner, a failed or stale poll)
    when called, as ``clock`` answers the time: the plan changes every few seconds while
    strategies live as long as the process, and a strategy reads it per request as data,
    with no I/O (``router/plan.py``'s poller is the I/O). Rejected: the plan in every
    ``EngineView`` (it is the fleet's, not an engine's: one copy per candidate per request).
    """

    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.monotonic
    placement: Callable[[], PlacementPlan | None] = no_plan
    # each slo decision's placement outcome (router.metrics.PLACEMENT_OUTCOMES), as data
    # going up: the proxy's metrics count them
    count_placement: Callable[[str], None] = uncounted
    # tunables (RouterSettings fills them; tests pick their own)
    session_header: str = "x-session-id"
    max_in_flight_per_engine: int = 256  # an engine at this many is saturated
    prefix_block_chars: int = 256  # approximate index: characters per hashed block
    prefix_index_entries: int = 200_000  # approximate index: block hashes kept (bounded)
    prefill_s_per_token: float = 2e-4  # cost model: recompute one prompt token
    node_load_s_per_token: float = 1e-5  # cost model: load one token's KV from its node's cache
    peer_fetch_s_per_token: float = 4e-5  # cost model: fetch one token's KV from a peer
    ttft_slo_s: float = 2.0
    tpot_slo_s: float = 0.2
    bounded_load_factor: float = 1.25  # session-affinity: an engine takes at most c x mean
    # load gate of prefix-cache: affinity is ignored on an engine with more than
    # min + balance_abs_requests and more than balance_rel x min requests in flight
    balance_abs_requests: int = 8
    balance_rel: float = 1.5
    # cost model: a request already running on an engine delays a new one's prefill like
    # this many queued prompt tokens (decode steps share the batch); uncalibrated default
    running_request_tokens: int = 32
    # shoal: an engine with more than this x the mean in flight (and more than
    # balance_abs_requests above the least loaded) is refused, so hot prefixes spread
    shoal_load_factor: float = 1.5


class Strategy:
    """Base of every strategy: override ``score`` (and ``reason``/``observe`` if needed)."""

    name: ClassVar[str] = ""
    uses_prefix: ClassVar[bool] = False

    def __init__(self, deps: StrategyDeps) -> None:
        self.deps = deps

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        raise NotImplementedError

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        """A short word for the decision log and the decisions metric."""
        return self.name

    def cached_tokens(self, chosen: EngineView, prefix: PrefixView | None) -> int:
        """Prompt tokens of the last scored request ``chosen`` is expected to reuse.

        ``RouteDecision.cached_tokens``; the ledger's pending tokens are the prompt's minus
        these (a reused prefix is not queued prefill). Default: the best tier of the view;
        strategies with their own index (``prefix-cache``, ``shoal``) answer from it.
        """
        if prefix is None:
            return 0
        tiers = prefix.of(chosen.engine_id)
        best = max(tiers.gpu_tokens, tiers.node_tokens, tiers.peer_tokens)
        return min(prefix.prompt_tokens, best)

    def routed(self, request: RouteRequest, chosen: EngineView) -> None:
        """The pipeline sent ``request`` to ``chosen`` (default: nothing to learn)."""

    def observe(self, outcome: RouteOutcome) -> None:
        """The proxy finished a request (default: nothing to learn)."""


STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` choosable by ``cls.name``."""
    assert cls.name and cls.name not in STRATEGIES, f"strategy name {cls.name!r} taken or empty"
    STRATEGIES[cls.name] = cls
    return cls


@dataclass(frozen=True, slots=True)
class MixMember:
    name: str
    weight: float


def parse_mix(text: str) -> tuple[MixMember, ...]:
    """``"least-request:2,prefix-cache:1"`` -> members; a bare name weighs 1.

    Raises ``UnknownStrategy`` naming the bad part (an unknown name, a weight that is not a
    positive finite number, an empty mix, a name given twice).
    """
    members: list[MixMember] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight_text = part.partition(":")
        name = name.strip().lower().replace("_", "-")
        if name not in STRATEGIES:
            known = ", ".join(sorted(STRATEGIES))
            raise UnknownStrategy(f"unknown routing strategy {name!r}; known: {known}")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise UnknownStrategy(f"weight {weight_text!r} of {name!r} is not a number") from None
        if not (math.isfinite(weight) and weight > 0):
            raise UnknownStrategy(f"weight of {name!r} must be a positive number, got {weight}")
        if any(m.name == name for m in members):
            raise UnknownStrategy(f"strategy {name!r} is named twice in {text!r}")
        members.append(MixMember(name, weight))
    if not members:
        raise UnknownStrategy(f"empty routing strategy {text!r}")
    return tuple(members)
