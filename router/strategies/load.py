"""Metric-driven strategies: least-kv-cache, least-latency and throughput.

Each ranks engines by one number the engines export on ``/metrics`` (scraped by
``scrape.py``), breaking ties by the router's own in-flight accounting
(``signals.lexicographic``). Scraped numbers are a scrape interval old, so they are the
secondary load signal (issue 12); these strategies exist because users ask for them by
name (AIBrix, vLLM production-stack) and as terms of mixes.

Unknown metrics: when any candidate's number is unknown (its scrape is stale or failed, so
``EngineView.metrics`` is ``None``, or the engine does not export the field), the whole
candidate list is ranked by least-request (in-flight requests, then pending tokens) and the
decision's reason is ``"fallback"``. Rejected: ranking the known engines and putting the
unknown ones last (an engine whose scrape lapsed under load would then be starved or, put
first, flooded: AIBrix #1185, GIE #1497 are the flooding case, with unknown read as 0), and
estimating the missing number from the others (numbers of different engines and ages do
not mix). A fleet half-known is ranked by the one signal known for all of it.

* ``least-kv-cache``: lowest ``kv_cache_usage`` (0..1). Fails when usage is high because
  of reusable prefix cache rather than running sequences (vLLM counts both), and lags by a
  scrape: a burst sent within one interval all goes to the engine that was emptiest.
* ``least-latency``: lowest predicted latency of this request,
  ``ttft_mean_s + tpot_mean_s x max_tokens``. ``ttft_mean_s`` is unknown on an engine
  that finished nothing in the last interval, which is usually an idle engine: the
  fallback to least-request then sends work to it, which is the right answer for the
  usual reason. Fails like every mean: a few long prompts inflate an engine's TTFT for a
  whole interval.
* ``throughput``: fewest weighted tokens per second, ``prompt + 2 x generation`` (AIBrix's
  ``throughput`` routes to "the lowest total weighted tokens"; a generated token weighs two
  because a decode step is the slower per-token work). Both rates come from counters over
  the last scrape interval, so the strategy says what each engine was doing, not what it
  holds now: a burst of new requests is invisible until the next scrape (a mix with
  least-request covers that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from router.strategies.base import Strategy, StrategyDeps, register
from router.strategies.signals import in_flight_costs, lexicographic, refuse_saturated
from router.types import EngineView, PrefixView, RouteRequest

__all__ = ["LeastKvCache", "LeastLatency", "Throughput"]


class _MetricStrategy(Strategy):
    """Rank by ``signal`` when every candidate's is known, else by least-request."""

    known_reason: ClassVar[str] = ""

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self._fell_back = False

    def signal(self, request: RouteRequest, engine: EngineView) -> float | None:
        raise NotImplementedError

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        signals = [self.signal(request, e) for e in engines]
        load = in_flight_costs(engines)
        known = [s for s in signals if s is not None]
        self._fell_back = len(known) < len(signals)
        costs = load if self._fell_back else lexicographic(known, load)
        return refuse_saturated(costs, engines, self.deps)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        return "fallback" if self._fell_back else self.known_reason


@register
class LeastKvCache(_MetricStrategy):
    """Lowest scraped KV-cache usage."""

    name = "least-kv-cache"
    known_reason = "kv-cache"

    def signal(self, request: RouteRequest, engine: EngineView) -> float | None:
        return None if engine.metrics is None else engine.metrics.kv_cache_usage


@register
class LeastLatency(_MetricStrategy):
    """Lowest ``ttft_mean_s + tpot_mean_s x max_tokens`` from the last scrape."""

    name = "least-latency"
    known_reason = "latency"

    def signal(self, request: RouteRequest, engine: EngineView) -> float | None:
        m = engine.metrics
        if m is None or m.ttft_mean_s is None or m.tpot_mean_s is None:
            return None
        return m.ttft_mean_s + m.tpot_mean_s * max(request.max_tokens, 1)


@register
class Throughput(_MetricStrategy):
    """Fewest ``prompt + 2 x generation`` tokens per second from the last scrape."""

    name = "throughput"
    known_reason = "throughput"
    generation_weight: ClassVar[float] = 2.0

    def signal(self, request: RouteRequest, engine: EngineView) -> float | None:
        m = engine.metrics
        if m is None or m.prompt_tokens_per_s is None or m.generation_tokens_per_s is None:
            return None
        return m.prompt_tokens_per_s + self.generation_weight * m.generation_tokens_per_s
