"""Routing strategies: the contract every strategy keeps, then each one's exact choices.

``StrategyContract`` is inherited by one test class per strategy (cachetools'
``CacheTestMixin`` pattern); the per-strategy classes add exact-order assertions through
``Picker``, which picks as the pipeline does (argmin, seeded tie-break, then ``routed``).
"""

from __future__ import annotations

import builtins
import math
import socket
from collections import Counter
from typing import Any, ClassVar

import pytest

from router.strategies import STRATEGIES
from router.strategies.base import Strategy
from router.types import PrefixView
from tests.unit.router_factories import (
    Picker,
    engine,
    engines,
    make,
    metrics,
    prefix,
    request,
    unknown_metrics,
)

ALL_NAMES = (
    "random",
    "round-robin",
    "least-request",
    "least-kv-cache",
    "least-latency",
    "throughput",
    "power-of-two",
    "session-affinity",
    "prefix-cache",
    "precise-prefix",
    "vtc",
    "slo",
    "lora-affinity",
    "shoal",
)


def valid_cost(cost: float) -> bool:
    return isinstance(cost, float) and not math.isnan(cost) and cost != -math.inf


class StrategyContract:
    """What every strategy promises the pipeline (``router/strategies/base.py``)."""

    name: ClassVar[str]

    def strategy(self, seed: int = 0, **tunables: Any) -> Strategy:
        return make(self.name, seed, **tunables)

    def prefixes(self, prompt_tokens: int) -> list[PrefixView | None]:
        """The views the pipeline may pass: ``None`` always (a locator may fail)."""
        if not STRATEGIES[self.name].uses_prefix:
            return [None]
        return [
            None,
            prefix(prompt_tokens, "precise", e0=(prompt_tokens, 0, 0), e1=(0, 8, 0)),
            prefix(prompt_tokens, "approximate", e2=(4, 0, 0)),
        ]

    def test_is_registered_under_its_name(self) -> None:
        assert STRATEGIES[self.name].name == self.name

    def test_one_valid_cost_per_candidate_in_order(self) -> None:
        fleet = [
            engine(0, in_flight=3, tokens=300, metrics=metrics(num_running=3, num_waiting=1)),
            engine(1),
            engine(2, in_flight=1, tokens=10),
        ]
        req = request(user="alice", session="s1")
        for view in self.prefixes(req.prompt_tokens):
            strategy = self.strategy()
            forward = strategy.score(req, fleet, view)
            backward = self.strategy().score(req, fleet[::-1], view)
            assert len(forward) == len(fleet)
            assert all(valid_cost(c) for c in forward), forward
            # a candidate's cost follows it, not its position (same fresh state, same rng)
            if self.order_independent:
                assert backward[::-1] == forward

    order_independent: ClassVar[bool] = True

    def test_deterministic_with_a_seeded_rng(self) -> None:
        fleet = engines(4)
        runs = []
        for _ in range(2):
            picker = Picker(self.strategy(seed=11), seed=3)
            runs.append(
                [
                    picker.pick_id(request(f"prompt {i % 3} " * 40, user=f"u{i % 2}"), fleet)
                    for i in range(20)
                ]
            )
        assert runs[0] == runs[1]

    def test_a_single_candidate_is_chosen(self) -> None:
        req = request()
        for view in self.prefixes(req.prompt_tokens):
            costs = self.strategy().score(req, [engine(0)], view)
            assert len(costs) == 1 and math.isfinite(costs[0])

    def test_unknown_metrics_give_finite_costs(self) -> None:
        fleet = [engine(0, metrics=None), engine(1, metrics=unknown_metrics()), engine(2)]
        costs = self.strategy().score(request(), fleet, None)
        assert all(math.isfinite(c) for c in costs), costs

    def test_empty_prompt(self) -> None:
        req = request("", tokens=0)
        for view in self.prefixes(0):
            costs = self.strategy().score(req, engines(3), view)
            assert len(costs) == 3 and all(valid_cost(c) for c in costs)

    def test_no_candidates_no_costs(self) -> None:
        assert self.strategy().score(request(), [], None) == []

    def test_a_saturated_engine_is_refused(self) -> None:
        fleet = [engine(0, in_flight=4), engine(1, in_flight=1)]
        costs = self.strategy(max_in_flight_per_engine=4).score(request(), fleet, None)
        assert costs[0] == math.inf and math.isfinite(costs[1])

    def test_score_does_no_io(self, monkeypatch: pytest.MonkeyPatch) -> None:
        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("a strategy did I/O in score")

        strategy = self.strategy()
        monkeypatch.setattr(socket.socket, "connect", forbidden)
        monkeypatch.setattr(builtins, "open", forbidden)
        picker = Picker(strategy)
        for i in range(5):
            picker.pick(request(f"hello {i}", user="bob", session="s"), engines(3))


def test_every_named_strategy_is_registered() -> None:
    assert set(ALL_NAMES) <= set(STRATEGIES)


# --- basic.py -------------------------------------------------------------------------


class TestRandom(StrategyContract):
    name = "random"
    order_independent = False  # the draw is by position

    def test_spreads_over_all_engines(self) -> None:
        picker = Picker(self.strategy(seed=5))
        counts = Counter(picker.pick_id(request(), engines(4)) for _ in range(400))
        assert set(counts) == {"e0", "e1", "e2", "e3"}
        assert min(counts.values()) > 60  # 100 expected each

    def test_ignores_load(self) -> None:
        fleet = [engine(0, in_flight=50), engine(1)]
        picker = Picker(self.strategy(seed=1))
        assert {picker.pick_id(request(), fleet) for _ in range(50)} == {"e0", "e1"}


class TestRoundRobin(StrategyContract):
    name = "round-robin"

    def test_visits_engines_in_order(self) -> None:
        picker = Picker(self.strategy())
        picks = [picker.pick_id(request(), engines(3)) for _ in range(7)]
        assert picks == ["e0", "e1", "e2", "e0", "e1", "e2", "e0"]

    def test_rotation_survives_an_engine_leaving_and_joining(self) -> None:
        picker = Picker(self.strategy())
        fleet = engines(4)
        assert [picker.pick_id(request(), fleet) for _ in range(2)] == ["e0", "e1"]
        without_e2 = [fleet[0], fleet[1], fleet[3]]
        assert picker.pick_id(request(), without_e2) == "e3"
        assert [picker.pick_id(request(), fleet) for _ in range(3)] == ["e0", "e1", "e2"]

    def test_a_saturated_engine_passes_its_turn(self) -> None:
        picker = Picker(self.strategy(max_in_flight_per_engine=2))
        fleet = [engine(0), engine(1, in_flight=2), engine(2)]
        assert [picker.pick_id(request(), fleet) for _ in range(4)] == ["e0", "e2", "e0", "e2"]


class TestLeastRequest(StrategyContract):
    name = "least-request"

    def test_picks_the_fewest_in_flight(self) -> None:
        fleet = [engine(0, in_flight=3), engine(1, in_flight=1), engine(2, in_flight=2)]
        assert Picker(self.strategy()).pick_id(request(), fleet) == "e1"

    def test_pending_tokens_break_ties_but_never_outweigh_a_request(self) -> None:
        fleet = [
            engine(0, in_flight=2, tokens=5000),
            engine(1, in_flight=2, tokens=100),
            engine(2, in_flight=3, tokens=0),
        ]
        costs = self.strategy().score(request(), fleet, None)
        assert costs[1] < costs[0] < costs[2]

    def test_ignores_scraped_metrics(self) -> None:
        fleet = [engine(0, metrics=metrics(num_waiting=40)), engine(1, in_flight=1)]
        assert Picker(self.strategy()).pick_id(request(), fleet) == "e0"


class TestPowerOfTwo(StrategyContract):
    name = "power-of-two"
    order_independent = False  # the draw is by position

    def test_the_less_loaded_of_the_two_drawn_wins(self) -> None:
        strategy = self.strategy(seed=2)
        fleet = [engine(i, in_flight=i) for i in range(5)]
        for _ in range(50):
            costs = strategy.score(request(), fleet, None)
            drawn = [i for i, c in enumerate(costs) if c < 1]
            assert len(drawn) == 2
            better = min(drawn)  # engine i has i requests
            assert costs[better] == 0.0 and costs[max(drawn)] == 0.5

    def test_the_most_loaded_engine_is_never_chosen(self) -> None:
        fleet = [engine(i, in_flight=i) for i in range(4)]
        picker = Picker(self.strategy(seed=9))
        counts = Counter(picker.pick_id(request(), fleet) for _ in range(300))
        assert "e3" not in counts
        assert counts["e0"] > counts["e1"] > counts["e2"] > 0

    def test_a_saturated_draw_falls_to_the_other(self) -> None:
        fleet = [engine(0, in_flight=4), engine(1, in_flight=3)]
        picker = Picker(self.strategy(max_in_flight_per_engine=4))
        assert {picker.pick_id(request(), fleet) for _ in range(10)} == {"e1"}


class TestLeastKvCache(StrategyContract):
    name = "least-kv-cache"


class TestLeastLatency(StrategyContract):
    name = "least-latency"


class TestThroughput(StrategyContract):
    name = "throughput"


class TestSessionAffinity(StrategyContract):
    name = "session-affinity"


class TestLoraAffinity(StrategyContract):
    name = "lora-affinity"


class TestPrefixCache(StrategyContract):
    name = "prefix-cache"


class TestPrecisePrefix(StrategyContract):
    name = "precise-prefix"


class TestVtc(StrategyContract):
    name = "vtc"


class TestSlo(StrategyContract):
    name = "slo"


class TestShoal(StrategyContract):
    name = "shoal"
