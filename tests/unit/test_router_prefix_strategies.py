"""Prefix strategies: prefix-cache, precise-prefix and the shoal default, exact choices.

Each inherits ``StrategyContract`` (``test_router_strategies.py``); ``simulate`` keeps
picked requests in flight with their uncached tokens, as the proxy's ledger counts them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from router.strategies.base import Strategy
from router.strategies.prefix import ApproximatePrefixIndex, IndexedStrategy
from router.strategies.shoal import with_node_copies
from router.types import EnginePrefix
from tests.unit.router_factories import (
    SYSTEM,
    FakeClock,
    Picker,
    engine,
    engine_ids,
    engines,
    loaded,
    long_text,
    make,
    prefix,
    request,
)
from tests.unit.test_router_strategies import StrategyContract

# --- prefix.py ------------------------------------------------------------------------


def simulate(
    picker: Picker,
    requests: list[Any],
    fleet: list[Any],
    prefix_of: Any = None,
    *,
    prefilled: bool = False,
) -> list[str | None]:
    """Pick each request in turn; every pick stays in flight with its uncached tokens.

    Pending tokens are the prompt's minus what the strategy expects the engine to reuse
    (``Strategy.cached_tokens``), as the proxy's ledger counts them; ``prefilled``: each
    prompt is done (first token) before the next request arrives, so only ``in_flight``
    grows.
    """
    picks = []
    for req in requests:
        view = None if prefix_of is None else prefix_of(req)
        chosen = picker.pick(req, fleet, view)
        picks.append(None if chosen is None else chosen.engine_id)
        if chosen is None:
            continue
        pending = (
            0 if prefilled else req.prompt_tokens - picker.strategy.cached_tokens(chosen, view)
        )
        fleet[:] = [
            loaded(e, e.in_flight + 1, e.in_flight_tokens + pending) if e is chosen else e
            for e in fleet
        ]
    return picks


def index_of(strategy: Strategy) -> ApproximatePrefixIndex:
    assert isinstance(strategy, IndexedStrategy)
    return strategy.index


class TestPrefixCache(StrategyContract):
    name = "prefix-cache"

    def test_a_repeated_prefix_sticks_until_the_load_gate_trips(self) -> None:
        strategy = self.strategy(balance_abs_requests=8, balance_rel=1.5)
        picker = Picker(strategy, seed=4)
        fleet = engines(3)
        requests = [request(SYSTEM + f" question {i}") for i in range(11)]
        picks = simulate(picker, requests, fleet)
        warm = picks[0]
        # the warm engine takes 9 (it then runs 9 > 0 + 8), the 10th goes to an idle one,
        # which now holds the prefix too and takes the 11th by affinity
        assert picks[:9] == [warm] * 9
        assert picks[9] != warm and picks[10] == picks[9]

    def test_reasons_cold_affinity_load(self) -> None:
        strategy = self.strategy(balance_abs_requests=0, balance_rel=1.0)
        picker = Picker(strategy)
        fleet = engines(2)
        first = picker.pick(request(SYSTEM), fleet)
        assert first is not None and strategy.reason(first, None) == "cold"
        again = picker.pick(request(SYSTEM + " more"), fleet)
        assert again == first and strategy.reason(first, None) == "affinity"
        busy = [loaded(e, 1) if e.engine_id == first.engine_id else e for e in fleet]
        other = picker.pick(request(SYSTEM + " more"), busy)
        assert other is not None and other.engine_id != first.engine_id
        assert strategy.reason(other, None) == "load"

    def test_the_longest_match_wins(self) -> None:
        strategy = self.strategy()
        picker = Picker(strategy)
        fleet = engines(3)
        picker.pick(request(SYSTEM[:512]), [fleet[0]])
        picker.pick(request(SYSTEM[:1536]), [fleet[1]])
        assert picker.pick_id(request(SYSTEM + " new question"), fleet) == "e1"
        costs = strategy.score(request(SYSTEM), fleet, None)
        assert costs[1] < costs[0] < costs[2]  # 6 of 8 blocks, 2 of 8, none

    def test_unrelated_prompts_are_placed_by_load(self) -> None:
        picker = Picker(self.strategy())
        fleet = engines(4)
        picks = simulate(picker, [request(long_text(f"t{i}", 1024)) for i in range(8)], fleet)
        assert Counter(picks) == {"e0": 2, "e1": 2, "e2": 2, "e3": 2}

    def test_prompts_shorter_than_a_block_are_cold(self) -> None:
        strategy = self.strategy()
        picker = Picker(strategy)
        chosen = picker.pick(request("short prompt"), engines(2))
        assert chosen is not None
        picker.pick(request("short prompt"), engines(2))
        assert strategy.reason(chosen, None) == "cold"

    def test_models_do_not_share_prefixes(self) -> None:
        strategy = self.strategy()
        picker = Picker(strategy)
        fleet = engines(2, models=("tiny", "other"))
        picker.pick(request(SYSTEM, model="tiny"), [fleet[0]])
        assert strategy.score(request(SYSTEM, model="other"), fleet, None)[0] >= 1.0

    def test_memory_is_bounded(self) -> None:
        strategy = self.strategy(prefix_index_entries=20)
        picker = Picker(strategy)
        for i in range(30):
            picker.pick(request(long_text(f"p{i}", 1024)), engines(2))
        index = index_of(strategy)
        assert len(index) == 20
        # the most recent prompt is still indexed whole
        last = index.block_hashes("tiny", long_text("p29", 1024))
        assert max(index.matched_blocks(last, ["e0", "e1"]).values()) == 4

    def test_a_forgotten_or_long_absent_engine_holds_nothing(self) -> None:
        clock = FakeClock()
        strategy = self.strategy(clock=clock)
        picker = Picker(strategy)
        fleet = engines(2)
        picker.pick(request(SYSTEM), [fleet[0]])
        index = index_of(strategy)
        hashes = index.block_hashes("tiny", SYSTEM)
        assert index.matched_blocks(hashes, ["e0"]) == {"e0": 8}
        clock.advance(index.forget_after_s + 1)
        strategy.score(request(SYSTEM), [fleet[1]], None)  # e0 not a candidate for long
        assert index.matched_blocks(hashes, ["e0"]) == {"e0": 0}
        picker.pick(request(SYSTEM), [fleet[0]])  # e0 is back and learns again
        assert index.matched_blocks(hashes, ["e0"]) == {"e0": 8}
        index.forget("e0")
        assert index.matched_blocks(hashes, ["e0"]) == {"e0": 0}


class TestPrecisePrefix(StrategyContract):
    name = "precise-prefix"

    def test_prices_gpu_below_node_below_peer_below_recompute(self) -> None:
        view = prefix(1000, e0=(1000, 0, 0), e1=(0, 1000, 0), e2=(0, 0, 1000))
        strategy = self.strategy()
        fleet = engines(4)
        costs = strategy.score(request(tokens=1000), fleet, view)
        assert costs[0] < costs[1] < costs[2] < costs[3]
        assert costs[3] == pytest.approx(1000 * 2e-4)
        assert Picker(strategy).pick_id(request(tokens=1000), fleet, view) == "e0"
        assert [strategy.reason(e, view) for e in fleet] == ["gpu", "node", "peer", "recompute"]

    def test_tiers_are_prefix_lengths_that_overlap(self) -> None:
        view = prefix(1000, e0=(400, 700, 0))
        cost = self.strategy().score(request(tokens=1000), [engine(0)], view)[0]
        assert cost == pytest.approx(300 * 1e-5 + 300 * 2e-4)

    def test_a_queue_outweighs_a_gpu_hit(self) -> None:
        view = prefix(1000, e0=(1000, 0, 0), e1=(0, 1000, 0))
        fleet = [engine(0, in_flight=2, tokens=4000), engine(1)]
        assert Picker(self.strategy()).pick_id(request(tokens=1000), fleet, view) == "e1"

    def test_without_a_view_the_queue_decides(self) -> None:
        strategy = self.strategy()
        fleet = [engine(0, in_flight=1, tokens=500), engine(1, in_flight=1, tokens=100)]
        assert Picker(strategy).pick_id(request(tokens=1000), fleet) == "e1"
        assert strategy.reason(fleet[1], None) == "no-index"


# --- shoal.py -------------------------------------------------------------------------


class TestShoal(StrategyContract):
    name = "shoal"

    def test_the_warm_engine_wins_until_its_queue_makes_it_slower(self) -> None:
        strategy = self.strategy()
        view = prefix(1000, e0=(900, 0, 0))
        picker = Picker(strategy)
        # pressure = mean pending 250 / max(1000, 500) = 0.25
        # e0: (500 + 1 x 32) + 100 x 1.25 = 657 tokens of time < e1: 1000 x 1.25 = 1250
        warm = [engine(0, in_flight=1, tokens=500), engine(1)]
        assert picker.pick_id(request(tokens=1000), warm, view) == "e0"
        assert strategy.reason(warm[0], view) == "affinity"
        # pressure = 1000 / 1000 = 1: e0: (2000 + 2 x 32) + 100 x 2 = 2264 > e1: 1000 x 2
        saturated = [engine(0, in_flight=2, tokens=2000), engine(1)]
        assert picker.pick_id(request(tokens=1000), saturated, view) == "e1"
        assert strategy.reason(saturated[1], view) == "load"

    def test_queue_pressure_makes_a_cache_hit_worth_more_under_load(self) -> None:
        view = prefix(1000, e0=(900, 0, 0))
        # quiet: pressure = mean pending 1000 / max(1000, 100 per request) = 1
        #   e0: (2000 + 320) + 100 x 2 = 2520 > e1: 320 + 1000 x 2 = 2320
        quiet = [engine(0, in_flight=10, tokens=2000), engine(1, in_flight=10)]
        # busy, the same 2000-token gap: pressure = 10000 / 1000 = 10
        #   e0: (11000 + 320) + 100 x 11 = 12420 < e1: (9000 + 320) + 1000 x 11 = 20320
        busy = [engine(0, in_flight=10, tokens=11_000), engine(1, in_flight=10, tokens=9000)]
        picker = Picker(self.strategy())
        assert picker.pick_id(request(tokens=1000), quiet, view) == "e1"
        assert picker.pick_id(request(tokens=1000), busy, view) == "e0"

    def test_a_node_cache_hit_beats_a_cold_engine_when_the_gpu_copy_is_busy(self) -> None:
        view = prefix(4000, e0=(4000, 0, 0), e1=(0, 4000, 0))
        fleet = [engine(0, in_flight=4, tokens=6000), engine(1), engine(2)]
        strategy = self.strategy()
        assert Picker(strategy).pick_id(request(tokens=4000), fleet, view) == "e1"
        assert strategy.reason(fleet[1], view) == "affinity"

    def test_cold_prefixes_spread_by_load(self) -> None:
        strategy = self.strategy()
        fleet = engines(4)
        picks = simulate(
            Picker(strategy, seed=8), [request(long_text(f"c{i}", 1024)) for i in range(12)], fleet
        )
        assert Counter(picks) == {"e0": 3, "e1": 3, "e2": 3, "e3": 3}
        assert strategy.reason(fleet[0], None) == "cold"

    def test_a_hot_prefix_warms_one_more_engine_per_request_until_its_share_is_met(
        self,
    ) -> None:
        # all traffic is one prefix (share 1.0 of 4 engines: it wants 4 warm engines); once
        # hot_min_requests (8) were routed and every warm engine is busy, a cold engine's
        # warm-up is not charged, so the next requests warm e3, e1, e2 one each; then the
        # queues alone decide
        strategy = self.strategy()
        fleet = engines(4)
        hot = [request(SYSTEM + f" user {i:03d}", tokens=520) for i in range(60)]
        picks = simulate(Picker(strategy, seed=2), hot, fleet, prefilled=True)
        assert picks[:8] == [picks[0]] * 8
        assert sorted(picks[8:11]) == sorted(set(engine_ids(4)) - {picks[0]})
        assert strategy.reason(fleet[0], None) in ("affinity", "spread")
        assert sorted(Counter(picks).values()) == [15, 15, 15, 15]

    def test_an_idle_warm_engine_keeps_even_a_hot_prefix(self) -> None:
        # rule 4 needs every warm engine busy: a conversation on an idle fleet stays put
        strategy = self.strategy()
        picker = Picker(strategy, seed=2)
        fleet = engines(4)
        picks = [picker.pick_id(request(SYSTEM + f" turn {i}", tokens=520), fleet)
                 for i in range(20)]  # fmt: skip
        assert picks == [picks[0]] * 20

    def test_without_rule_4_a_hot_prefix_takes_engines_as_the_load_bound_says(self) -> None:
        # 520-token prompts whose 8 indexed blocks are ~517 tokens, each prefilled before
        # the next arrives (nothing finishes): a warm engine with k running costs
        # (32k + 3) x p against a cold one's 520 x p, and the load bound refuses an engine
        # over 1.5 x the mean that is more than 8 (balance_abs_requests) ahead of the least
        strategy = self.strategy()
        strategy.hot_min_requests = 10**9  # type: ignore[misc]  # rule 4 off
        fleet = engines(4)
        hot = [request(SYSTEM + f" user {i:03d}", tokens=520) for i in range(60)]
        picks = simulate(Picker(strategy, seed=2), hot, fleet, prefilled=True)
        first, second = picks[0], picks[9]
        assert picks[:9] == [first] * 9 and second != first  # 9 > 0 + 8, 9 >= 1.5 x 10 / 4
        assert picks[9:18] == [second] * 9
        # three engines at k each stay under 1.5 x (3k + 1) / 4: the bound is met, and the
        # fourth engine gets the prefix only once 32 x 17 + 3 > 520 makes it cheaper
        fourth = (set(engine_ids(4)) - set(picks[:51])).pop()
        assert picks[51:] == [fourth] * 9
        assert sorted(Counter(picks).values()) == [9, 17, 17, 17]  # at most 1.13 x fair share

    def test_without_the_bound_a_short_queue_keeps_the_prefix(self) -> None:
        strategy = self.strategy(shoal_load_factor=100.0)
        strategy.hot_min_requests = 10**9  # type: ignore[misc]  # rule 4 off
        fleet = engines(4)
        hot = [request(SYSTEM + f" user {i:03d}", tokens=520) for i in range(20)]
        picks = simulate(Picker(strategy, seed=2), hot, fleet, prefilled=True)
        assert picks[:17] == [picks[0]] * 17  # 32 x 16 + 3 <= 520 < 32 x 17 + 3
        assert picks[17] != picks[0]

    def test_a_burst_on_a_new_prefix_waits_for_its_first_prefill_briefly(self) -> None:
        # nothing prefilled yet: the warm engine queues the whole first prompt, and the
        # burst stays while (520 + 3k) + 32k + 3 x 1.25 <= 520 x 1.25 (pressure ~ 0.25)
        picks = simulate(
            Picker(self.strategy(), seed=2),
            [request(SYSTEM + f" user {i}", tokens=520) for i in range(6)],
            engines(4),
        )
        assert picks[:4] == [picks[0]] * 4
        assert picks[4] != picks[0]

    def test_reasons_cold_then_affinity_then_load(self) -> None:
        strategy = self.strategy()
        picker = Picker(strategy, seed=1)
        fleet = engines(2)
        chosen = picker.pick(request(SYSTEM, tokens=520), fleet)
        assert chosen is not None and strategy.reason(chosen, None) == "cold"
        assert picker.pick(request(SYSTEM, tokens=520), fleet) == chosen
        assert strategy.reason(chosen, None) == "affinity"
        assert strategy.cached_tokens(chosen, None) == 520  # all 8 blocks of 2048 chars
        busy = [loaded(e, 20, 2000) if e is chosen else e for e in fleet]
        other = picker.pick(request(SYSTEM, tokens=520), busy)
        assert other is not None and other.engine_id != chosen.engine_id
        assert strategy.reason(other, None) == "load"
        assert strategy.cached_tokens(other, None) == 0

    def test_recently_routed_prefixes_count_before_kv_events_arrive(self) -> None:
        clock = FakeClock()
        strategy = self.strategy(clock=clock)
        picker = Picker(strategy, seed=3)
        fleet = engines(3)
        nothing_yet = prefix(600)  # precise, but the first prefill has not run
        first = picker.pick_id(request(SYSTEM, tokens=600), fleet, nothing_yet)
        assert picker.pick_id(request(SYSTEM + " two", tokens=600), fleet, nothing_yet) == first
        clock.advance(60)  # events are long due: the precise view is believed alone
        costs = strategy.score(request(SYSTEM, tokens=600), fleet, nothing_yet)
        assert len(set(costs)) == 1
        assert strategy.reason(fleet[0], nothing_yet) == "cold"

    def test_a_recent_prefix_is_counted_in_the_precise_views_tokens_not_the_estimate(
        self,
    ) -> None:
        # the index estimates 2,000 tokens (characters / 4) and saw the shared part; the
        # precise count is 600, so the merged prefix is the same share of 600, never all of
        # it (the bench found every engine looking fully cached, queues invisible)
        clock = FakeClock()
        strategy = self.strategy(clock=clock)
        picker = Picker(strategy, seed=3)
        fleet = engines(2)
        first = picker.pick_id(request(SYSTEM, tokens=2000), fleet, prefix(600))
        longer = request(SYSTEM + " and a new question of its own" * 40, tokens=2000)
        strategy.score(longer, fleet, prefix(600))
        chosen = next(e for e in fleet if e.engine_id == first)
        assert 0 < strategy.cached_tokens(chosen, prefix(600)) < 600

    def test_a_precise_view_overrides_the_approximate_index(self) -> None:
        clock = FakeClock()
        strategy = self.strategy(clock=clock)
        picker = Picker(strategy)
        fleet = engines(2)
        picker.pick(request(SYSTEM, tokens=600), [fleet[0]])
        clock.advance(60)
        evicted = prefix(600, e1=(600, 0, 0))  # e0 evicted it, e1 got it from elsewhere
        assert picker.pick_id(request(SYSTEM, tokens=600), fleet, evicted) == "e1"


class TestShoalNodeCopies:
    """Approximate mode: what one wired engine computed, its node's other engines can load."""

    def fleet(self) -> list[Any]:
        return [
            replace(engine(0), node="a", stream="a/gpu0"),
            replace(engine(1), node="a", stream="a/gpu1"),
            replace(engine(2), node="b", stream="b/gpu0"),
            replace(engine(3), node="a", stream=""),  # not wired to the daemon
        ]

    def test_a_busy_warm_engine_passes_to_its_node_neighbour(self) -> None:
        strategy = make("shoal")
        picker = Picker(strategy)
        fleet = self.fleet()
        picker.pick(request(SYSTEM, tokens=520), [fleet[0]])
        busy = [loaded(fleet[0], 4, 2000), *fleet[1:]]
        costs = strategy.score(request(SYSTEM, tokens=520), busy, None)
        assert costs[1] < costs[2] == costs[3]
        assert picker.pick_id(request(SYSTEM, tokens=520), busy) == "e1"
        assert strategy.reason(busy[1], None) == "affinity"
        assert strategy.cached_tokens(busy[1], None) == 520

    def test_engines_without_a_stream_neither_give_nor_get(self) -> None:
        view = with_node_copies(prefix(100, "approximate", e3=(100, 0, 0)), self.fleet())
        assert view.of("e0") == EnginePrefix()
        view = with_node_copies(prefix(100, "approximate", e0=(100, 0, 0)), self.fleet())
        assert view.of("e1") == EnginePrefix(0, 100, 0)
        assert view.of("e2") == EnginePrefix() and view.of("e3") == EnginePrefix()


def linear_matched(
    index: ApproximatePrefixIndex, hashes: list[int], engine_id: str, since: float
) -> int:
    """The reference: walk the chain until the engine does not hold a block."""
    epoch = index._epochs.get(engine_id, 0)
    for depth, block in enumerate(hashes):
        held = index._blocks.get(block, {}).get(engine_id)
        if held is None or held[0] != epoch or held[1] < since:
            return depth
    return len(hashes)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("insert"), st.integers(0, 3), st.integers(1, 12), st.integers(0, 2)),
            st.tuples(st.just("forget"), st.integers(0, 2)),
            st.tuples(st.just("tick"), st.integers(1, 5)),
        ),
        max_size=40,
    ),
    st.integers(4, 30),
)
def test_binary_search_matches_walking_the_chain(operations: list[Any], room: int) -> None:
    clock = FakeClock()
    index = ApproximatePrefixIndex(8, room, clock)
    bases = [long_text(f"base{b}", 96) for b in range(4)]
    for op in operations:
        if op[0] == "insert":
            _, base, blocks, engine_index = op
            index.insert(index.block_hashes("m", bases[base][: 8 * blocks]), f"e{engine_index}")
        elif op[0] == "forget":
            index.forget(f"e{op[1]}")
        else:
            clock.advance(op[1])
        assert len(index) <= room
    for base in bases:
        hashes = index.block_hashes("m", base)
        for since in (-math.inf, clock.now - 3, clock.now):
            got = index.matched_blocks(hashes, ["e0", "e1", "e2"], since)
            assert got == {e: linear_matched(index, hashes, e, since) for e in ("e0", "e1", "e2")}
