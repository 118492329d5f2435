"""Prefix strategies: prefix-cache (the router's own approximate index) and precise-prefix.

``ApproximatePrefixIndex`` remembers where the router sent which prompt, as chained block
hashes of the prompt text (what GIE's prefix plugin and AIBrix's prefix-cache do; SGLang's
router keeps a character radix tree instead)::

    text   |<- block_chars ->|<- block_chars ->|<- block_chars ->|<- tail ->|
    hash   h1 = xxh3(b1, seed=h0)  h2 = xxh3(b2, seed=h1)  h3 = ...   (tail not hashed)
    h0     = xxh3(model name): two models' identical prompts share nothing

Assumptions: (1) equal text prefixes render to equal token prefixes (true for the same
chat template and tokenizer; a block boundary need not be a token boundary, the match is
approximate anyway); (2) an engine still holds what it was sent recently (it may have
evicted it: this index never hears about evictions, which is why the precise path exists);
(3) only full blocks count, so prompts shorter than one block are always cold.

Memory is bounded: at most ``prefix_index_entries`` block hashes, least recently routed
evicted first. A routed chain is touched from its last block to its first, so the shared
roots of many prompts are the most recent and a chain is evicted from its leaves. Each
entry maps engine ids to the engine's epoch and when the block was last routed there (so
``shoal`` can ask what was sent recently, before KV events can report it):
``forget(engine_id)`` bumps the epoch, which drops the engine from every entry at once
(entries are cleaned when next touched), and an engine absent from the candidates for
``forget_after_s`` is forgotten (it was removed or restarted with an empty cache; the
router cannot tell which, both mean its entries lie).

``prefix-cache`` (approximate only, no locator call):
cost = uncached fraction of the prompt's blocks on the engine, least-request among equals.
Load gate (SGLang's ``balance_abs_threshold``/``balance_rel_threshold``, AIBrix's load
imbalance check): an engine with ``in_flight > min + balance_abs_requests`` and
``in_flight > balance_rel x min`` over the candidates has its affinity ignored (uncached
fraction 1), so a repeated prefix goes to its warm engine until that engine runs
``balance_abs_requests`` requests ahead of the idlest, then to the least loaded. Reasons:
``"affinity"`` (the chosen engine held part of the prefix), ``"load"`` (another did, but was
gated), ``"cold"`` (no engine held any). How it fails: counts are requests, not tokens, so
one engine may take a few long prompts too many before the gate trips; thresholds are
absolute and need tuning per fleet; what engines evicted stays indexed; the index lives in
one router process, so router replicas and ``--workers`` processes each learn only their
own share of the traffic (issue 12, complaint 1: the problem precise routing removes).

``precise-prefix`` (``uses_prefix``: the pipeline passes the locator's ``PrefixView``):
cost = ``signals.expected_ttft`` in seconds: GPU hit (free) < node-cache load < peer
fetch < recompute, with ``StrategyDeps``' per-token prices, plus the engine's queue. It
keeps no state, so router replicas agree (issue 12, complaint 1). Without a view (the
locator failed or timed out) every engine recomputes and the queue decides (reason
``"no-index"``); with an approximate view its estimate is priced as GPU tokens. Reasons
otherwise name the best tier the chosen engine gets: ``"gpu"``, ``"node"``, ``"peer"``,
``"recompute"``. How it fails: the view is as fresh as the KV events and daemon snapshots
behind it, and the linear cost model (see ``signals``) misprices very long prompts.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

import xxhash

from router.strategies.base import Strategy, StrategyDeps, register
from router.strategies.signals import (
    expected_ttft,
    in_flight_costs,
    lexicographic,
    prompt_tokens,
    refuse_saturated,
)
from router.types import EnginePrefix, EngineView, PrefixView, RouteRequest

__all__ = ["ApproximatePrefixIndex", "IndexedStrategy", "PrecisePrefix", "PrefixCache", "best_tier"]


class ApproximatePrefixIndex:
    """Block hash -> engines the router sent that block to (bounded LRU, see the module)."""

    def __init__(
        self,
        block_chars: int,
        max_entries: int,
        clock: Callable[[], float],
        forget_after_s: float = 300.0,
    ) -> None:
        assert block_chars > 0 and max_entries > 0, "index needs positive block size and room"
        self.block_chars = block_chars
        self.max_entries = max_entries
        self.forget_after_s = forget_after_s
        self._clock = clock
        # block hash -> engine id -> (the engine's epoch, when the block was last routed)
        self._blocks: OrderedDict[int, dict[str, tuple[int, float]]] = OrderedDict()
        self._epochs: dict[str, int] = {}
        self._last_seen: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def block_hashes(self, model: str, text: str) -> list[int]:
        """Chained hashes of ``text``'s full blocks, seeded by ``model``."""
        hashes: list[int] = []
        seed = xxhash.xxh3_64_intdigest(model.encode())
        size = self.block_chars
        data = text.encode()
        if len(data) == len(text):  # ASCII: characters are bytes, slice without copies
            view = memoryview(data)
            for start in range(0, len(data) - size + 1, size):
                seed = xxhash.xxh3_64_intdigest(view[start : start + size], seed=seed)
                hashes.append(seed)
            return hashes
        for start in range(0, len(text) - size + 1, size):
            seed = xxhash.xxh3_64_intdigest(text[start : start + size].encode(), seed=seed)
            hashes.append(seed)
        return hashes

    def seen(self, engines: Sequence[EngineView]) -> None:
        """The candidates of a decision: forget engines absent for ``forget_after_s``."""
        now = self._clock()
        for e in engines:
            self._last_seen[e.engine_id] = now
        for engine_id, last in list(self._last_seen.items()):
            if now - last > self.forget_after_s:
                self.forget(engine_id)

    def forget(self, engine_id: str) -> None:
        """Drop everything indexed for ``engine_id`` (removed, or restarted empty)."""
        self._epochs[engine_id] = self._epochs.get(engine_id, 0) + 1
        self._last_seen.pop(engine_id, None)

    def matched_blocks(
        self, hashes: Sequence[int], engine_ids: Sequence[str], since: float = -math.inf
    ) -> dict[str, int]:
        """How many leading blocks of ``hashes`` each engine was sent (since ``since``).

        Binary search per engine: what one engine holds of a chain is prefix-closed (a
        chain is inserted whole, leaf first, so its root is never older than its leaves
        and is evicted last), so the matched length is the first block it does not hold.
        """
        blocks = self._blocks
        epochs = self._epochs
        matched: dict[str, int] = {}
        for engine_id in engine_ids:
            epoch = epochs.get(engine_id, 0)
            low, high = 0, len(hashes)  # blocks [0, low) held; [high, ...) not
            while low < high:
                # probe the root first: most engines hold nothing of most prompts
                middle = 0 if low == 0 else (low + high) // 2
                holders = blocks.get(hashes[middle])
                held = holders.get(engine_id) if holders is not None else None
                if held is not None and held[0] == epoch and held[1] >= since:
                    low = middle + 1
                else:
                    high = middle
            matched[engine_id] = low
        return matched

    def insert(self, hashes: Sequence[int], engine_id: str) -> None:
        """``engine_id`` was sent these blocks: index them, most recent first at the root."""
        epochs = self._epochs
        holder = (epochs.get(engine_id, 0), self._clock())
        blocks = self._blocks
        for block in reversed(hashes):
            holders = blocks.get(block)
            if holders is None:
                blocks[block] = {engine_id: holder}
                continue
            blocks.move_to_end(block)
            if epochs and len(holders) > 1:  # drop forgotten engines while here
                for stale in [e for e, h in holders.items() if h[0] != epochs.get(e, 0)]:
                    del holders[stale]
            holders[engine_id] = holder
        while len(blocks) > self.max_entries:
            blocks.popitem(last=False)

    def view(
        self,
        request: RouteRequest,
        engines: Sequence[EngineView],
        hashes: Sequence[int],
        since: float = -math.inf,
    ) -> PrefixView:
        """An approximate ``PrefixView``: matched blocks as GPU tokens (pro rata of the text)."""
        matched = self.matched_blocks(hashes, [e.engine_id for e in engines], since)
        chars = max(len(request.prompt_text), 1)
        per_engine = {
            engine_id: EnginePrefix(
                gpu_tokens=min(
                    request.prompt_tokens,
                    request.prompt_tokens * blocks * self.block_chars // chars,
                )
            )
            for engine_id, blocks in matched.items()
            if blocks
        }
        return PrefixView("approximate", request.prompt_tokens, per_engine)


class IndexedStrategy(Strategy):
    """Keeps an ``ApproximatePrefixIndex`` and teaches it every routed request."""

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self.index = ApproximatePrefixIndex(
            deps.prefix_block_chars, deps.prefix_index_entries, deps.clock
        )
        self._hashed: tuple[str, list[int]] = ("", [])

    def hashes_of(self, request: RouteRequest) -> list[int]:
        """Block hashes of ``request`` (the last request's are kept for ``routed``)."""
        if self._hashed[0] != request.request_id or not request.request_id:
            self._hashed = (
                request.request_id,
                self.index.block_hashes(request.model, request.prompt_text),
            )
        return self._hashed[1]

    def routed(self, request: RouteRequest, chosen: EngineView) -> None:
        self.index.insert(self.hashes_of(request), chosen.engine_id)


@register
class PrefixCache(IndexedStrategy):
    """Uncached fraction by the approximate index, gated by load (see the module)."""

    name = "prefix-cache"

    def __init__(self, deps: StrategyDeps) -> None:
        super().__init__(deps)
        self._matched: dict[str, int] = {}
        self._tokens_per_block = 0

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        self.index.seen(engines)
        hashes = self.hashes_of(request)
        self._matched = self.index.matched_blocks(hashes, [e.engine_id for e in engines])
        chars = max(len(request.prompt_text), 1)
        self._tokens_per_block = request.prompt_tokens * self.index.block_chars // chars
        least = min((e.in_flight for e in engines), default=0)
        uncached = []
        for e in engines:
            gated = (
                e.in_flight > least + self.deps.balance_abs_requests
                and e.in_flight > self.deps.balance_rel * least
            )
            held = 0 if gated or not hashes else self._matched[e.engine_id]
            uncached.append(1.0 - held / len(hashes) if hashes else 1.0)
        costs = lexicographic(uncached, in_flight_costs(engines))
        return refuse_saturated(costs, engines, self.deps)

    def cached_tokens(self, chosen: EngineView, prefix: PrefixView | None) -> int:
        return self._tokens_per_block * self._matched.get(chosen.engine_id, 0)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        if self._matched.get(chosen.engine_id, 0):
            return "affinity"
        return "load" if any(self._matched.values()) else "cold"


@register
class PrecisePrefix(Strategy):
    """Expected TTFT from the locator's view: gpu < node < peer < recompute, plus queue."""

    name = "precise-prefix"
    uses_prefix = True

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        tokens = prompt_tokens(request, prefix)
        none = EnginePrefix()
        costs = [
            expected_ttft(e, tokens, none if prefix is None else prefix.of(e.engine_id), self.deps)
            for e in engines
        ]
        return refuse_saturated(costs, engines, self.deps)

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        if prefix is None:
            return "no-index"
        return best_tier(prefix.of(chosen.engine_id))


def best_tier(tiers: EnginePrefix) -> str:
    """The tier that supplies most of the prefix: ``gpu``, ``node``, ``peer`` or ``recompute``."""
    best = max(tiers.gpu_tokens, tiers.node_tokens, tiers.peer_tokens)
    if best <= 0:
        return "recompute"
    if tiers.gpu_tokens == best:
        return "gpu"
    return "node" if tiers.node_tokens == best else "peer"
