"""Fairness: virtual token counters per user (VTC) applied as admission and placement.

VTC (Sheng et al., "Fairness in Serving LLMs", OSDI'24) keeps a counter of service per
client, ``prompt tokens x w_in + generated tokens x w_out`` (the paper's w_in = 1,
w_out = 2), lifts a client that becomes backlogged to the smallest counter among backlogged
clients (so idle time banks no credit), and always serves the backlogged client with the
smallest counter; the service given to any two backlogged clients then differs by a
bounded amount.

A router cannot reorder: it has no queue, engines schedule first come, first served. What
this strategy does instead (and all it claims):

1. Counters per user (``RouteRequest.user``; anonymous requests share the ``""`` user),
   charged when a request is routed with its prompt tokens and ``max_tokens`` as the
   generation estimate, corrected in ``observe`` with the tokens actually generated (a
   failed request is refunded, and a retry voids its earlier attempt's charge). A user
   with nothing in flight is lifted to the minimum counter of the users that have, when
   routed.
2. Admission under contention: when every candidate engine has at least
   ``contention_fraction x max_in_flight_per_engine`` requests in flight, a user whose
   counter is more than ``budget_tokens`` ahead of the least-served active user is refused
   (``inf`` on every engine: the pipeline answers 429 with Retry-After), so the engines'
   queues fill with the under-served users' requests. Without contention everyone is
   admitted (work-conserving, as VTC is).
3. Placement: least-request, plus, for a user ahead of the least-served one, a penalty on
   engines already running that user's requests (``excess / budget_tokens`` per request,
   at most 1): a heavy user's backlog is spread over engines instead of queueing in front
   of light users on one of them.

How it fails: the bound on service difference VTC proves does not hold (nothing is
reordered; refused clients must retry, and a heavy client that does not retry simply loses
requests); counters live in this router process (not shared through Redis), so with several
replicas each enforces fairness over its own share of traffic; users are remembered LRU,
``max_users`` at most, and a forgotten user starts again at the active minimum (which is
what VTC would give it anyway after an idle period). Requests whose outcome never arrives
are dropped from the accounting after ``max_pending`` newer ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from router.strategies.base import Strategy, StrategyDeps, register
from router.strategies.signals import in_flight_costs, refuse_saturated
from router.types import EngineView, PrefixView, RouteOutcome, RouteRequest

__all__ = ["VirtualTokenCounter"]


@dataclass(frozen=True, slots=True)
class _Charge:
    user: str
    engine_id: str
    prompt_charge: float
    output_charge: float


@register
class VirtualTokenCounter(Strategy):
    """Per-user virtual token counters: refuse the over-served under contention, spread them."""

    name = "vtc"
    input_weight: ClassVar[float] = 1.0
    output_weight: ClassVar[float] = 2.0
    budget_tokens: ClassVar[float] = 16_384.0
    contention_fraction: ClassVar[float] = 0.75
    max_users: ClassVar[int] = 100_000
    max_pending: ClassVar[int] = 100_000

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self._counters: OrderedDict[str, float] = OrderedDict()
        self._running: dict[str, dict[str, int]] = {}  # user -> engine id -> requests
        self._pending: OrderedDict[str, _Charge] = OrderedDict()  # request id -> charge
        self._excess = 0.0

    def counter(self, user: str) -> float:
        """The user's virtual token counter (0 for a user never seen)."""
        return self._counters.get(user, 0.0)

    def _active_minimum(self, excluding: str) -> float | None:
        counters = [self.counter(u) for u in self._running if u != excluding]
        return min(counters) if counters else None

    def _lifted(self, user: str) -> float:
        """The user's counter as VTC would see it now: lifted if it is not backlogged."""
        own = self.counter(user)
        floor = self._active_minimum(excluding=user)
        if floor is None:
            return own
        return own if user in self._running else max(own, floor)

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        floor = self._active_minimum(excluding=request.user)
        self._excess = 0.0 if floor is None else max(0.0, self._lifted(request.user) - floor)
        contended = bool(engines) and all(
            e.in_flight >= self.contention_fraction * self.deps.max_in_flight_per_engine
            for e in engines
        )
        if contended and self._excess > self.budget_tokens:
            return [float("inf")] * len(engines)
        penalty = min(1.0, self._excess / self.budget_tokens)
        mine = self._running.get(request.user, {})
        load = in_flight_costs(engines)
        costs = [c + penalty * mine.get(e.engine_id, 0) for c, e in zip(load, engines, strict=True)]
        return refuse_saturated(costs, engines, self.deps)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        return "heavy" if self._excess > 0 else "fair"

    def routed(self, request: RouteRequest, chosen: EngineView) -> None:
        retried = self._pending.pop(request.request_id, None)
        if retried is not None:  # a retry on another engine: the first attempt is void
            self._refund(retried, retried.prompt_charge + retried.output_charge)
            self._finish(retried)
        user = request.user
        prompt_charge = request.prompt_tokens * self.input_weight
        output_charge = request.max_tokens * self.output_weight
        self._counters[user] = self._lifted(user) + prompt_charge + output_charge
        self._counters.move_to_end(user)
        per_engine = self._running.setdefault(user, {})
        per_engine[chosen.engine_id] = per_engine.get(chosen.engine_id, 0) + 1
        self._pending[request.request_id] = _Charge(
            user, chosen.engine_id, prompt_charge, output_charge
        )
        while len(self._pending) > self.max_pending:
            _, lost = self._pending.popitem(last=False)
            self._finish(lost)
        self._trim_users()

    def observe(self, outcome: RouteOutcome) -> None:
        charge = self._pending.pop(outcome.request.request_id, None)
        if charge is None:
            return
        if outcome.ok:
            actual = outcome.completion_tokens * self.output_weight
            refund = charge.output_charge - actual
        else:
            refund = charge.prompt_charge + charge.output_charge
        self._refund(charge, refund)
        self._finish(charge)

    def _refund(self, charge: _Charge, amount: float) -> None:
        if charge.user in self._counters:
            self._counters[charge.user] -= amount

    def _finish(self, charge: _Charge) -> None:
        per_engine = self._running.get(charge.user)
        if per_engine is None:
            return
        left = per_engine.get(charge.engine_id, 0) - 1
        if left > 0:
            per_engine[charge.engine_id] = left
        else:
            per_engine.pop(charge.engine_id, None)
        if not per_engine:
            del self._running[charge.user]

    def _trim_users(self) -> None:
        """Forget the least recently routed users past ``max_users`` (never an active one)."""
        excess = len(self._counters) - self.max_users
        for user in list(self._counters):
            if excess <= 0:
                break
            if user not in self._running:
                del self._counters[user]
                excess -= 1
