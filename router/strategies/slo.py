"""SLO: place requests on engines predicted to meet the TTFT and TPOT targets.

Per engine, two predictions for this request:

* TTFT = ``max(model, measured)``: ``model`` is ``signals.expected_ttft`` (the engine's
  queue from the router's accounting, plus this request's own load/fetch/recompute cost
  priced from the ``PrefixView`` when the locator gave one, else a full recompute);
  ``measured`` is the engine's scraped ``ttft_mean_s`` when fresh. The measured mean is a
  floor because it includes what the linear model leaves out (decode interference, slow
  hardware); the model covers what happened since the scrape.
* TPOT = ``tpot_mean_s x (running + 1) / running``, with ``running`` the larger of the
  scraped ``num_running`` and the router's ``in_flight``: a decode step's time grows about
  linearly with the batch. Unknown (no fresh ``tpot_mean_s``): no TPOT prediction, only
  TTFT is checked; an unknown is never read as a fast engine.

Decision: engines whose predictions meet ``ttft_slo_s`` and ``tpot_slo_s`` cost their
predicted TTFT (seconds); engines that break either are refused (``inf``), unless every
candidate breaks them: then each costs ``max(ttft / ttft_slo_s, tpot / tpot_slo_s)`` and
the least bad is chosen (reason ``"slo-missed"``), so the pipeline answers ``Saturated``
only for engines at ``max_in_flight_per_engine``, as with every strategy. Rejected:
refusing the request when no engine can meet the SLO (admission control proper): a late
answer is usually better than a 429 for interactive clients, and ``vtc`` or the rate
limits are where requests are turned away.

With a placement plan (``--placement-url``, issue 14; ``StrategyDeps.placement``): the
plan picks the request's GPU type (``placement.place``: its cell from prompt tokens and
``max_tokens``, walked to the nearest row with traffic when the cell has none, a weighted
pick from the request id over the cell's shares),
and the candidates of that type (``EngineView.gpu_type``) that meet the targets cost
their predicted TTFT while every other candidate is refused (reason ``"plan"``). When no
candidate of that type meets them (none exists, none is healthy, all are predicted late
or saturated), the decision above over all candidates stands (``"slo-met"`` /
``"slo-missed"``), so a plan never makes a request later than the plan-less strategy
would, and a request whose model the plan was not made for, a column without traffic, no
plan or a stale one leave the strategy as it was. Every decision's outcome goes to
``StrategyDeps.count_placement`` (plan, nearest_row, fallback, no_share, no_plan), so a
plan that is not being followed shows in the router's metrics. Rejected: re-picking among the types
present when the picked type has no engine (the plan's shares are per type; moving a
missing type's share to another type silently is what the fallback already does, on
predicted latency rather than on shares).

How it fails: predictions are only as good as the per-token prices in ``StrategyDeps`` and
a scrape interval's means; a burst within one interval is predicted from the router's own
queue alone; the TPOT scaling ignores context length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from router.strategies.base import Strategy, StrategyDeps, register
from router.strategies.placement import place
from router.strategies.signals import expected_ttft, prompt_tokens, refuse_saturated
from router.types import EnginePrefix, EngineView, PrefixView, RouteRequest

__all__ = ["SloAware", "predict_tpot", "predict_ttft"]


def predict_ttft(engine: EngineView, tokens: int, tiers: EnginePrefix, deps: StrategyDeps) -> float:
    modelled = expected_ttft(engine, tokens, tiers, deps)
    measured = None if engine.metrics is None else engine.metrics.ttft_mean_s
    return modelled if measured is None else max(modelled, measured)


def predict_tpot(engine: EngineView) -> float | None:
    m = engine.metrics
    if m is None or m.tpot_mean_s is None:
        return None
    running = max(m.num_running or 0.0, float(engine.in_flight), 1.0)
    return m.tpot_mean_s * (running + 1) / running


@register
class SloAware(Strategy):
    """Predicted TTFT among engines meeting the targets; the least bad when none does."""

    name = "slo"
    uses_prefix = True

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        assert deps.ttft_slo_s > 0 and deps.tpot_slo_s > 0, "SLO targets must be positive"
        self._met = True
        self._planned = False  # the last decision followed the placement plan

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        tokens = prompt_tokens(request, prefix)
        none = EnginePrefix()
        ttfts = [
            predict_ttft(e, tokens, none if prefix is None else prefix.of(e.engine_id), self.deps)
            for e in engines
        ]
        tpots = [predict_tpot(e) for e in engines]
        badness = refuse_saturated(
            [
                max(
                    ttft / self.deps.ttft_slo_s,
                    0.0 if tpot is None else tpot / self.deps.tpot_slo_s,
                )
                for ttft, tpot in zip(ttfts, tpots, strict=True)
            ],
            engines,
            self.deps,
        )
        self._met = any(b <= 1.0 for b in badness)
        self._planned = False
        plan = self.deps.placement()
        gpu_type, outcome = (None, "no_plan") if plan is None else place(plan, request, tokens)
        if gpu_type is not None:
            planned = [
                t if b <= 1.0 and e.gpu_type == gpu_type else math.inf
                for t, b, e in zip(ttfts, badness, engines, strict=True)
            ]
            if any(math.isfinite(c) for c in planned):
                self._planned = True
                self.deps.count_placement(outcome)
                return planned
            outcome = "fallback"
        self.deps.count_placement(outcome)
        if self._met:
            costs = [t if b <= 1.0 else math.inf for t, b in zip(ttfts, badness, strict=True)]
        else:
            costs = badness
        return costs

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        if self._planned:
            return "plan"
        return "slo-met" if self._met else "slo-missed"
