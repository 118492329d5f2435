"""Routing strategies: the contract every strategy keeps, then each one's exact choices.

``StrategyContract`` is inherited by one test class per strategy (cachetools'
``CacheTestMixin`` pattern); the per-strategy classes add exact-order assertions through
``Picker``, which picks as the pipeline does (argmin, seeded tie-break, then ``routed``).
The prefix strategies (prefix-cache, precise-prefix, shoal) are specified in
``test_router_prefix_strategies.py`` with the same contract.
"""

from __future__ import annotations

import asyncio
import builtins
import math
import random
import socket
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from router.pipeline import Pipeline
from router.strategies import STRATEGIES
from router.strategies.base import Strategy, StrategyDeps
from router.strategies.signals import lexicographic, pending_tokens, queue_seconds
from router.types import (
    EngineView,
    PrefixView,
    RouteDecision,
    RouteOutcome,
    RouteRequest,
)
from tests.unit.router_factories import (
    SYSTEM,
    Picker,
    engine,
    engines,
    loaded,
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
    order_independent: ClassVar[bool] = True  # costs follow engines, not positions

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


# --- load.py --------------------------------------------------------------------------


class TestLeastKvCache(StrategyContract):
    name = "least-kv-cache"

    def test_picks_the_lowest_usage(self) -> None:
        fleet = [
            engine(i, metrics=metrics(kv_cache_usage=u)) for i, u in enumerate((0.7, 0.2, 0.5))
        ]
        strategy = self.strategy()
        assert Picker(strategy).pick_id(request(), fleet) == "e1"
        assert strategy.reason(fleet[1], None) == "kv-cache"

    def test_in_flight_breaks_ties_without_reordering_usage(self) -> None:
        fleet = [
            engine(0, in_flight=2, metrics=metrics(kv_cache_usage=0.3)),
            engine(1, in_flight=1, metrics=metrics(kv_cache_usage=0.3)),
            engine(2, in_flight=9, metrics=metrics(kv_cache_usage=0.29)),
        ]
        costs = self.strategy().score(request(), fleet, None)
        assert costs[2] < costs[1] < costs[0]

    @pytest.mark.parametrize("unknown", [None, unknown_metrics()])
    def test_an_unknown_usage_ranks_everyone_by_least_request(self, unknown: Any) -> None:
        fleet = [
            engine(0, in_flight=5, metrics=metrics(kv_cache_usage=0.1)),
            engine(1, in_flight=0, metrics=unknown),
            engine(2, in_flight=2, metrics=metrics(kv_cache_usage=0.0)),
        ]
        strategy = self.strategy()
        assert Picker(strategy).pick_id(request(), fleet) == "e1"
        assert strategy.reason(fleet[1], None) == "fallback"


class TestLeastLatency(StrategyContract):
    name = "least-latency"

    def test_predicted_latency_depends_on_max_tokens(self) -> None:
        fleet = [
            engine(0, metrics=metrics(ttft_mean_s=0.1, tpot_mean_s=0.05)),
            engine(1, metrics=metrics(ttft_mean_s=0.5, tpot_mean_s=0.01)),
        ]
        picker = Picker(self.strategy())
        assert picker.pick_id(request(max_tokens=1), fleet) == "e0"  # 0.15 s against 0.51 s
        assert picker.pick_id(request(max_tokens=100), fleet) == "e1"  # 5.1 s against 1.5 s

    def test_an_engine_that_finished_nothing_falls_back_to_least_request(self) -> None:
        idle = engine(1, metrics=metrics(num_running=0))  # no TTFT mean: nothing finished
        busy = engine(0, in_flight=4, metrics=metrics(ttft_mean_s=0.01, tpot_mean_s=0.01))
        strategy = self.strategy()
        assert Picker(strategy).pick_id(request(), [busy, idle]) == "e1"
        assert strategy.reason(idle, None) == "fallback"


class TestThroughput(StrategyContract):
    name = "throughput"

    def test_picks_the_fewest_weighted_tokens_per_second(self) -> None:
        rates = ((100.0, 500.0), (900.0, 100.0), (300.0, 300.0))  # weighted 1100, 1100, 900
        fleet = [
            engine(
                i, in_flight=i, metrics=metrics(prompt_tokens_per_s=p, generation_tokens_per_s=g)
            )
            for i, (p, g) in enumerate(rates)
        ]
        strategy = self.strategy()
        assert Picker(strategy).pick_id(request(), fleet) == "e2"
        assert strategy.reason(fleet[2], None) == "throughput"
        assert Picker(strategy).pick_id(request(), fleet[:2]) == "e0"  # tie: fewer in flight

    def test_a_stale_engine_falls_back_to_least_request(self) -> None:
        fleet = [
            engine(0, in_flight=1, metrics=metrics(generation_tokens_per_s=1.0)),  # no prompt rate
            engine(1, in_flight=3, metrics=None),
            engine(
                2,
                in_flight=2,
                metrics=metrics(prompt_tokens_per_s=0.0, generation_tokens_per_s=0.0),
            ),
        ]
        assert Picker(self.strategy()).pick_id(request(), fleet) == "e0"


# --- affinity.py ----------------------------------------------------------------------


def homes(strategy: Strategy, sessions: list[str], fleet: list[Any]) -> dict[str, str]:
    """Each session's pick on an idle ``fleet``."""
    picker = Picker(strategy)
    return {s: str(picker.pick_id(request(session=s), fleet)) for s in sessions}


class TestSessionAffinity(StrategyContract):
    name = "session-affinity"

    def test_a_session_stays_on_one_engine(self) -> None:
        strategy = self.strategy()
        picker = Picker(strategy)
        fleet = engines(4)
        picks = {picker.pick(request(session="conversation-42"), fleet) for _ in range(20)}
        assert len(picks) == 1
        chosen = picks.pop()
        assert chosen is not None and strategy.reason(chosen, None) == "session"

    def test_replicas_agree_without_shared_state(self) -> None:
        sessions = [f"s{i}" for i in range(50)]
        assert homes(self.strategy(seed=1), sessions, engines(4)) == homes(
            self.strategy(seed=2), sessions, engines(4)[::-1]
        )

    def test_sessions_spread_over_engines(self) -> None:
        counts = Counter(homes(self.strategy(), [f"s{i}" for i in range(800)], engines(4)).values())
        assert set(counts) == {"e0", "e1", "e2", "e3"}
        assert max(counts.values()) < 1.3 * 200 and min(counts.values()) > 0.7 * 200

    def test_adding_an_engine_moves_about_one_in_n_sessions_all_to_it(self) -> None:
        sessions = [f"s{i}" for i in range(2000)]
        before = homes(self.strategy(), sessions, engines(4))
        after = homes(self.strategy(), sessions, engines(5))
        moved = [s for s in sessions if before[s] != after[s]]
        assert 0.1 * len(sessions) < len(moved) < 0.3 * len(sessions)  # 1/5 expected
        assert {after[s] for s in moved} == {"e4"}

    def test_removing_an_engine_moves_only_its_sessions(self) -> None:
        sessions = [f"s{i}" for i in range(1000)]
        before = homes(self.strategy(), sessions, engines(4))
        after = homes(self.strategy(), sessions, engines(4)[:3])
        assert all(after[s] == before[s] for s in sessions if before[s] != "e3")

    def test_a_full_home_spills_to_the_sessions_next_engine_only(self) -> None:
        strategy = self.strategy()
        fleet = engines(4)
        home = Picker(strategy).pick_id(request(session="hot"), fleet)
        assert home is not None
        index = int(home[1:])
        # capacity = ceil(1.25 x (4 + 1) / 4) = 2 with one request everywhere: home stays
        even = [loaded(e, 1) for e in fleet]
        assert Picker(strategy).pick_id(request(session="hot"), even) == home
        # home at 3, others 1: capacity ceil(1.25 x 7 / 4) = 3, home is full
        skewed = [loaded(e, 3 if e.engine_id == home else 1) for e in fleet]
        spills = {
            Picker(strategy, seed=s).pick_id(request(session="hot"), skewed) for s in range(10)
        }
        assert len(spills) == 1 and home not in spills
        spilled_to = next(e for e in skewed if e.engine_id in spills)
        assert strategy.reason(spilled_to, None) == "spill"
        assert strategy.reason(skewed[index], None) == "session"

    def test_no_engine_exceeds_the_bounded_load(self) -> None:
        strategy = self.strategy()
        fleet = engines(4)
        picker = Picker(strategy)
        for _ in range(40):  # one session only, requests never finish
            chosen = picker.pick(request(session="one-heavy-session"), fleet)
            assert chosen is not None
            fleet = [loaded(e, e.in_flight + (e is chosen)) for e in fleet]
            total = sum(e.in_flight for e in fleet)
            assert max(e.in_flight for e in fleet) <= math.ceil(1.25 * total / 4)

    def test_without_a_session_least_request_decides(self) -> None:
        strategy = self.strategy()
        fleet = [engine(0, in_flight=2), engine(1), engine(2, in_flight=1)]
        assert Picker(strategy).pick_id(request(), fleet) == "e1"
        assert strategy.reason(fleet[1], None) == "no-session"


class TestLoraAffinity(StrategyContract):
    name = "lora-affinity"

    def test_engines_serving_the_adapter_win_then_the_least_loaded(self) -> None:
        fleet = [
            engine(0),  # idle but without the adapter
            engine(1, in_flight=3, models=("tiny", "sql-lora")),
            engine(2, in_flight=1, metrics=metrics(loras_loaded=frozenset({"sql-lora"}))),
            engine(3, in_flight=2, models=("tiny", "sql-lora")),
        ]
        strategy = self.strategy()
        picker = Picker(strategy)
        assert picker.pick_id(request(model="sql-lora"), fleet) == "e2"
        assert strategy.reason(fleet[2], None) == "lora-hit"
        assert picker.pick_id(request(model="sql-lora"), [fleet[0], fleet[1]]) == "e1"

    def test_nobody_has_it_least_request_decides(self) -> None:
        strategy = self.strategy()
        fleet = [engine(0, in_flight=1), engine(1)]
        assert Picker(strategy).pick_id(request(model="new-lora"), fleet) == "e1"
        assert strategy.reason(fleet[1], None) == "lora-miss"


# --- fairness.py ----------------------------------------------------------------------


def outcome(req: Any, engine_id: str, *, ok: bool = True, completion: int = 0) -> RouteOutcome:
    return RouteOutcome(request=req, engine_id=engine_id, ok=ok, completion_tokens=completion)


class TestVtc(StrategyContract):
    name = "vtc"

    def vtc(self, **tunables: Any) -> Any:
        return self.strategy(**tunables)

    def test_counters_charge_prompt_and_generation_then_correct(self) -> None:
        vtc = self.vtc()
        req = request(user="alice", tokens=100, max_tokens=50)
        chosen = Picker(vtc).pick(req, engines(2))
        assert chosen is not None
        assert vtc.counter("alice") == 100 * 1 + 50 * 2
        vtc.observe(outcome(req, chosen.engine_id, completion=10))
        assert vtc.counter("alice") == 100 + 10 * 2
        failed = request(user="alice", tokens=100, max_tokens=50)
        Picker(vtc).pick(failed, engines(2))
        vtc.observe(outcome(failed, "e0", ok=False))
        assert vtc.counter("alice") == 120  # a failed request is refunded

    def test_a_newly_active_user_is_lifted_to_the_active_minimum(self) -> None:
        vtc = self.vtc()
        picker = Picker(vtc)
        for _ in range(3):  # alice stays active: nothing is observed
            picker.pick(request(user="alice", tokens=300, max_tokens=0), engines(2))
        picker.pick(request(user="bob", tokens=10, max_tokens=0), engines(2))
        assert vtc.counter("bob") == 900 + 10

    def test_under_contention_only_the_over_served_user_is_refused(self) -> None:
        vtc = self.vtc(max_in_flight_per_engine=4)
        picker = Picker(vtc)
        picker.pick(request(user="bob", tokens=10, max_tokens=0), engines(2))
        picker.pick(request(user="alice", tokens=20_000, max_tokens=0), engines(2))
        contended = engines(2, in_flight=3)  # 3 >= 0.75 x 4 everywhere
        assert picker.pick(request(user="alice", tokens=10), contended) is None
        assert picker.pick(request(user="bob", tokens=10), contended) is not None
        quiet = engines(2, in_flight=1)
        assert picker.pick(request(user="alice", tokens=10), quiet) is not None
        assert vtc.reason(quiet[0], None) == "heavy"

    def test_a_heavy_users_backlog_is_spread(self) -> None:
        vtc = self.vtc()
        picker = Picker(vtc)
        fleet = engines(2)
        picker.pick(request(user="bob", tokens=10, max_tokens=0), [fleet[1]])
        picker.pick(request(user="alice", tokens=20_000, max_tokens=0), [fleet[0]])
        # equal router load: alice avoids the engine running her request, bob does not care
        even = engines(2, in_flight=1)
        alice = vtc.score(request(user="alice"), even, None)
        assert alice[1] < alice[0]
        assert vtc.reason(even[1], None) == "heavy"
        bob = vtc.score(request(user="bob"), even, None)
        assert bob[0] == bob[1]
        assert vtc.reason(even[1], None) == "fair"

    def test_a_retry_is_charged_once(self) -> None:
        vtc = self.vtc()
        req = request(user="alice", tokens=100, max_tokens=10)
        Picker(vtc).pick(req, [engine(0)])
        Picker(vtc).pick(req, [engine(1)])  # the pipeline retried it on e1
        assert vtc.counter("alice") == 100 + 10 * 2
        vtc.observe(outcome(req, "e1", completion=10))
        assert vtc.counter("alice") == 120
        # nothing of alice is left running anywhere: bob's lift has no floor
        Picker(vtc).pick(request(user="bob", tokens=1, max_tokens=0), [engine(0)])
        assert vtc.counter("bob") == 1

    def test_finished_requests_leave_the_active_set(self) -> None:
        vtc = self.vtc()
        picker = Picker(vtc)
        req = request(user="alice", tokens=5000, max_tokens=0)
        chosen = picker.pick(req, engines(2))
        assert chosen is not None
        vtc.observe(outcome(req, chosen.engine_id))
        # alice is idle: carol's lift has no floor, alice's counter is kept
        picker.pick(request(user="carol", tokens=1, max_tokens=0), engines(2))
        assert vtc.counter("carol") == 1 and vtc.counter("alice") == 5000


# --- slo.py ---------------------------------------------------------------------------


class TestSlo(StrategyContract):
    name = "slo"

    def test_engines_predicted_to_break_ttft_are_refused(self) -> None:
        strategy = self.strategy(ttft_slo_s=2.0)
        # 20000 pending tokens x 2e-4 s = 4 s of queue
        fleet = [engine(0, in_flight=1, tokens=20_000), engine(1, in_flight=3, tokens=3000)]
        costs = strategy.score(request(tokens=1000), fleet, None)
        assert costs[0] == math.inf and math.isfinite(costs[1])
        assert strategy.reason(fleet[1], None) == "slo-met"

    def test_a_measured_ttft_is_a_floor(self) -> None:
        fleet = [engine(0, metrics=metrics(ttft_mean_s=3.0)), engine(1, in_flight=2, tokens=2000)]
        assert Picker(self.strategy()).pick_id(request(tokens=100), fleet) == "e1"

    def test_tpot_grows_with_the_running_batch(self) -> None:
        fleet = [
            engine(0, metrics=metrics(tpot_mean_s=0.15, num_running=1)),  # 0.3 s predicted
            engine(1, in_flight=3, metrics=metrics(tpot_mean_s=0.05, num_running=3)),
        ]
        costs = self.strategy(tpot_slo_s=0.2).score(request(), fleet, None)
        assert costs[0] == math.inf and math.isfinite(costs[1])

    def test_an_unknown_tpot_is_not_a_violation(self) -> None:
        costs = self.strategy().score(request(), [engine(0, metrics=None)], None)
        assert math.isfinite(costs[0])

    def test_when_every_engine_misses_the_least_bad_is_chosen(self) -> None:
        strategy = self.strategy(ttft_slo_s=1.0)
        fleet = [engine(0, in_flight=1, tokens=30_000), engine(1, in_flight=1, tokens=10_000)]
        picker = Picker(strategy)
        assert picker.pick_id(request(tokens=100), fleet) == "e1"
        assert strategy.reason(fleet[1], None) == "slo-missed"

    def test_the_prefix_view_shortens_the_prediction(self) -> None:
        view = prefix(8000, e0=(8000, 0, 0))
        fleet = [engine(0, in_flight=1, tokens=4000), engine(1)]
        # e0: 0.8 s queue, no prefill; e1: 8000 x 2e-4 = 1.6 s
        assert Picker(self.strategy()).pick_id(request(tokens=8000), fleet, view) == "e0"


# --- signals.py -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0, math.inf]),
            st.floats(min_value=0, max_value=1e6, allow_nan=False),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_lexicographic_orders_by_primary_then_secondary(pairs: list[tuple[float, float]]) -> None:
    primary = [p for p, _ in pairs]
    secondary = [s for _, s in pairs]
    costs = lexicographic(primary, secondary)
    for (p1, s1), c1 in zip(pairs, costs, strict=True):
        assert math.isinf(c1) == math.isinf(p1)
        for (p2, s2), c2 in zip(pairs, costs, strict=True):
            if math.isfinite(p1) and math.isfinite(p2) and (p1, s1) < (p2, s2):
                assert c1 <= c2
                if p1 < p2:
                    assert c1 < c2


def test_engine_reported_waiting_requests_the_router_did_not_send_count() -> None:
    deps = StrategyDeps(running_request_tokens=0)
    mine_only = engine(0, in_flight=1, tokens=400)
    others_too = engine(0, in_flight=1, tokens=400, metrics=metrics(num_waiting=5))
    assert pending_tokens(mine_only, 100) == 400
    assert pending_tokens(others_too, 100) == 400 + 4 * 400  # at the router's mean size
    assert pending_tokens(engine(0, metrics=metrics(num_waiting=2)), 100) == 200
    # a stale scrape is unknown: only the router's accounting counts, never a zero-filled guess
    assert pending_tokens(engine(0, in_flight=1, tokens=400, metrics=None), 100) == 400
    assert queue_seconds(others_too, deps, 100) == pytest.approx(2000 * deps.prefill_s_per_token)


# --- through the real pipeline (router/pipeline.py) -----------------------------------


class ViewLocator:
    """A locator that answers one fixed view (no I/O)."""

    def __init__(self, view: PrefixView | None) -> None:
        self.view = view

    async def locate(
        self, request: RouteRequest, engines: Sequence[EngineView]
    ) -> PrefixView | None:
        return self.view

    async def close(self) -> None:
        return None


def route_all(
    pipe: Pipeline,
    requests: list[RouteRequest],
    fleet: list[EngineView],
    strategy: str | None = None,
) -> list[RouteDecision]:
    async def run() -> list[RouteDecision]:
        return [await pipe.route(r, fleet, lambda _: True, strategy=strategy) for r in requests]

    return asyncio.run(run())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_strategy_routes_through_the_pipeline(name: str) -> None:
    pipe = Pipeline(name, StrategyDeps(rng=random.Random(1)))
    fleet = engines(3)
    decisions = route_all(
        pipe, [request(SYSTEM + f" {i}", user="u", session="s") for i in range(10)], fleet
    )
    assert {d.engine_id for d in decisions} <= {"e0", "e1", "e2"}
    assert all(d.reason and d.strategy == name for d in decisions)


def test_a_mix_weighs_prefix_affinity_against_load() -> None:
    pipe = Pipeline("prefix-cache:1,least-request:2", StrategyDeps(rng=random.Random(1)))
    fleet = engines(2)
    first = route_all(pipe, [request(SYSTEM)], fleet)[0].engine_id
    other = "e1" if first == "e0" else "e0"
    # equal load: the warm engine wins (prefix 0 vs 1, load 0 vs 0)
    assert route_all(pipe, [request(SYSTEM + " again")], fleet)[0].engine_id == first
    # the warm engine has two more requests: normalised load 1 x 2 outweighs prefix 1 x 1
    busy = [loaded(e, 2) if e.engine_id == first else e for e in fleet]
    assert route_all(pipe, [request(SYSTEM + " third")], busy)[0].engine_id == other


def test_power_of_two_in_a_mix_leaves_undrawn_engines_choosable() -> None:
    pipe = Pipeline("power-of-two:1,prefix-cache:3", StrategyDeps(rng=random.Random(5)))
    fleet = engines(4)
    warm = route_all(pipe, [request(SYSTEM)], fleet)[0].engine_id
    picks = route_all(pipe, [request(SYSTEM + f" {i}") for i in range(20)], fleet)
    assert all(d.engine_id == warm for d in picks)  # never refused for not being drawn


def test_shoal_through_the_pipeline_uses_the_locators_view() -> None:
    view = prefix(1000, e2=(1000, 0, 0))
    pipe = Pipeline("shoal", StrategyDeps(rng=random.Random(0)), locator=ViewLocator(view))
    decision = route_all(pipe, [request(SYSTEM, tokens=1000)], engines(3))[0]
    assert (decision.engine_id, decision.reason) == ("e2", "affinity")
