"""``shoal``, the default: the engine with the lowest expected time to first token.

Every engine is priced with ``signals.expected_ttft``: the queue ahead of the request (the
router's pending uncached tokens on it, requests the engine reports waiting that the
router did not send, and its running requests) plus what this request costs there (GPU
hit free, node-cache load, peer fetch, recompute, per token at ``StrategyDeps``' prices),
and the cheapest wins. Where the prefix lives comes from the cluster index when the
locator has it (``PrefixView.source == "precise"``: KV events and daemon snapshots, no
router-local state, so replicas agree) and from this strategy's own
``ApproximatePrefixIndex`` otherwise (the locator is down, slow, or not configured). The
index learns every routed request either way, so it is warm when the locator fails; in
that approximate mode a prefix sent to an engine wired to a cache daemon (``stream`` set)
counts as node-cache tokens for the other wired engines on its node
(``with_node_copies``: the connector saved it there). With a
precise view, prefixes this router sent to an engine in the last ``recent_s`` seconds count
as on its GPU too: KV events exist only once a prefill has run, so without this a burst of
requests sharing a new prefix would look cold and be scattered, each engine recomputing
it (the merge only adds knowledge; replicas without it still agree on the rest).

"Sticky until saturated" falls out of the one formula, no thresholds: a warm engine saves
``cached tokens x prefill`` seconds, so it keeps a prefix while its queue is shorter than
a cold engine's by less than that saving; once its queue makes it slower, the next request
goes to the cheaper cold (or node-warm) engine, which learns the prefix and shares it from
then on. A hot prefix thus spreads over as many engines as its load needs, and affinity
never overrides load (the hot spots and "death spirals" of SGLang PR #14305 and
vllm-router #179 came from affinity rules with load as an afterthought). Cold prefixes (no
engine holds any of it) cost every engine the same recompute, so the queue decides and the
pipeline's random tie-break spreads equal engines. A node-cache hit makes every engine on
that node nearly as warm as the one that computed it, which is what lets Shoal release
affinity earlier than GPU-only routers at almost no cost.

Reasons: ``"affinity"`` (the chosen engine holds part of the prefix), ``"load"`` (another
engine held some and was passed over: affinity released), ``"cold"`` (nobody held any).

Learned from the routers users compare against: SGLang's cache_aware and AIBrix's
prefix-cache switch between affinity and shortest queue on request-count thresholds
(``balance_abs_threshold``/``balance_rel_threshold``), which need tuning per fleet and
ignore how much of the prompt is cached; llm-d weighs a precise prefix scorer and a
load scorer with fixed weights. Pricing both in seconds removes the thresholds and the
weights: the trade is explicit. How it fails: the prices are linear estimates (see
``signals``); the approximate index does not see evictions; an engine the router is not
the only client of shows its other load only through scraped ``num_waiting``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from router.strategies.base import StrategyDeps, register
from router.strategies.prefix import IndexedStrategy
from router.strategies.signals import expected_ttft, prompt_tokens, refuse_saturated
from router.types import EnginePrefix, EngineView, PrefixView, RouteRequest

__all__ = ["ShoalDefault", "with_node_copies"]


@register
class ShoalDefault(IndexedStrategy):
    """Lowest expected TTFT, precise where the index is, approximate otherwise."""

    name = "shoal"
    uses_prefix = True
    recent_s: ClassVar[float] = 10.0

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self._held: dict[str, int] = {}  # last scored: engine id -> prefix tokens it can get

    def view(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> PrefixView:
        """The precise view when given, else this strategy's own approximate one."""
        self.index.seen(engines)
        hashes = self.hashes_of(request)
        if prefix is None or prefix.source != "precise":
            return with_node_copies(self.index.view(request, engines, hashes), engines)
        recent = self.index.view(request, engines, hashes, since=self.deps.clock() - self.recent_s)
        if not recent.engines:
            return prefix
        merged = dict(prefix.engines)
        for engine_id, sent in recent.engines.items():
            known = prefix.of(engine_id)
            if sent.gpu_tokens > known.gpu_tokens:
                merged[engine_id] = EnginePrefix(
                    min(sent.gpu_tokens, prefix.prompt_tokens), known.node_tokens, known.peer_tokens
                )
        return PrefixView(prefix.source, prefix.prompt_tokens, merged)

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        view = self.view(request, engines, prefix)
        tokens = prompt_tokens(request, view)
        self._held = {}
        costs = []
        for e in engines:
            tiers = view.of(e.engine_id)
            held = max(tiers.gpu_tokens, tiers.node_tokens, tiers.peer_tokens)
            self._held[e.engine_id] = min(tokens, held)
            costs.append(expected_ttft(e, tokens, tiers, self.deps))
        return refuse_saturated(costs, engines, self.deps)

    def cached_tokens(self, chosen: EngineView, prefix: PrefixView | None) -> int:
        return self._held.get(chosen.engine_id, 0)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        if self._held.get(chosen.engine_id, 0) > 0:
            return "affinity"
        return "load" if any(self._held.values()) else "cold"


def with_node_copies(view: PrefixView, engines: Sequence[EngineView]) -> PrefixView:
    """``view`` plus, for every engine wired to a cache daemon, its node's best prefix.

    An engine with a ``stream`` saves what it computes into its node's cache daemon (the
    Shoal connector), so a prefix the router sent to one such engine can be loaded by every
    other such engine on that node: their ``node_tokens``. Engines without a stream (plain
    vLLM, or the stream unknown) neither give nor get node copies.
    """
    best: dict[str, int] = {}
    for e in engines:
        if e.stream and e.node:
            best[e.node] = max(best.get(e.node, 0), view.of(e.engine_id).gpu_tokens)
    if not any(best.values()):
        return view
    merged = dict(view.engines)
    for e in engines:
        node_tokens = best.get(e.node, 0) if e.stream and e.node else 0
        own = view.of(e.engine_id)
        if node_tokens > own.gpu_tokens:
            merged[e.engine_id] = EnginePrefix(own.gpu_tokens, node_tokens, own.peer_tokens)
    return PrefixView(view.source, view.prompt_tokens, merged)
