"""LoRA placement (control/lora/placement.py): exact desired sets and moves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.lora.placement import choose_wake, is_active, place, priority
from control.lora.types import EngineState, Move, PlacementInput, Usage

A, B, C = "http://a:8000", "http://b:8000", "http://c:8000"
BASE = "llama"


def engine(url: str, budget: int = 2, loaded: Iterable[str] = (), *, assigned: Iterable[str] = (),
           pinned: Iterable[str] = (), base: str = BASE, healthy: bool = True) -> EngineState:  # fmt: skip
    return EngineState(
        url, base, budget, frozenset(loaded), frozenset(assigned), frozenset(pinned), healthy
    )


def inp(engines: Iterable[EngineState], usage: Mapping[str, tuple[float, float | None]],
        *, adapters: Iterable[str] | None = None, now: float = 1000.0, idle: float = 600.0,
        replica_rate: float = 10.0, hysteresis: float = 0.2) -> PlacementInput:  # fmt: skip
    names = list(adapters) if adapters is not None else list(usage)
    return PlacementInput(
        engines=tuple(engines),
        adapters=dict.fromkeys(names, BASE),
        usage={n: Usage(rate, last) for n, (rate, last) in usage.items()},
        now_s=now,
        idle_unload_s=idle,
        replica_rate=replica_rate,
        hysteresis=hysteresis,
    )


def load(url: str, name: str, reason: str = "place") -> Move:
    return Move(url, name, reason)  # type: ignore[arg-type]


class TestActivity:
    def test_traffic_or_recent_use_is_active(self) -> None:
        assert is_active(Usage(0.1, None), 1000, 600)
        assert is_active(Usage(0.0, 401.0), 1000, 600)
        assert not is_active(Usage(0.0, 400.0), 1000, 600)
        assert not is_active(Usage(0.0, None), 1000, 600)
        assert not is_active(None, 1000, 600)


class TestFirstCopies:
    def test_every_adapter_with_traffic_gets_one_engine_balanced_by_traffic(self) -> None:
        result = place(
            inp([engine(A), engine(B)], {"x": (3, 1000), "y": (2, 1000), "z": (1, 1000)})
        )
        # x (hottest) -> A; y -> B (A carries 3 req/s); z -> B (B carries 2 < 3)
        assert result.desired == {A: {"x"}, B: {"y", "z"}}
        assert result.loads == (load(A, "x"), load(B, "y"), load(B, "z"))
        assert result.unloads == ()
        assert result.unplaced == ()
        assert result.replicas == {"x": 1, "y": 1, "z": 1}

    def test_no_traffic_no_engine(self) -> None:
        result = place(inp([engine(A)], {"x": (0, None)}))
        assert result.desired == {A: frozenset()}
        assert result.loads == result.unloads == ()

    def test_only_engines_of_the_adapters_base(self) -> None:
        engines = [engine(A, base="other"), engine(B)]
        result = place(inp(engines, {"x": (1, 1000)}))
        assert result.desired == {A: frozenset(), B: {"x"}}
        assert result.loads == (load(B, "x"),)

    def test_unhealthy_engines_are_left_out_and_alone(self) -> None:
        engines = [engine(A, loaded=["x"], healthy=False), engine(B)]
        result = place(inp(engines, {"x": (1, 1000)}))
        assert result.desired == {B: {"x"}}
        assert result.loads == (load(B, "x"),)
        assert result.unloads == ()


class TestBudgets:
    def test_coldest_is_unplaced_when_every_budget_is_full(self) -> None:
        usage = {"w": (4, 1000), "x": (3, 1000), "y": (2, 1000), "z": (1, 1000)}
        result = place(inp([engine(A, budget=1), engine(B, budget=2)], usage))
        assert result.desired == {A: {"w"}, B: {"x", "y"}}
        assert result.unplaced == ("z",)
        assert all(len(v) <= 1 for k, v in result.desired.items() if k == A)

    def test_foreign_and_pinned_adapters_use_budget(self) -> None:
        engines = [engine(A, budget=2, loaded=["theirs", "p"], pinned=["p"]), engine(B, budget=1)]
        result = place(inp(engines, {"x": (5, 1000), "p": (0, 1.0)}))
        # A's two slots are taken (a foreign adapter, a pin): x goes to B
        assert result.desired == {A: {"p"}, B: {"x"}}
        assert result.loads == (load(B, "x"),)
        assert result.unloads == ()  # the idle pin and the foreign adapter stay

    def test_pinned_adapter_not_loaded_is_restored(self) -> None:
        result = place(inp([engine(A, pinned=["p"])], {"p": (0, None)}))
        assert result.loads == (load(A, "p", "restore"),)

    def test_lru_eviction_when_a_hotter_adapter_needs_room(self) -> None:
        # budget full with two cold adapters; a new one with traffic arrives
        engines = [engine(A, budget=2, loaded=["old", "recent"])]
        usage = {"old": (0, 500.0), "recent": (0, 900.0), "new": (2, 1000)}
        result = place(inp(engines, usage))
        assert result.desired == {A: {"recent", "new"}}
        assert result.unloads == (Move(A, "old", "evict"),)
        assert result.loads == (load(A, "new"),)

    def test_engine_loaded_past_a_reduced_budget_keeps_the_hottest(self) -> None:
        engines = [engine(A, budget=1, loaded=["x", "y"])]
        result = place(inp(engines, {"x": (1, 1000), "y": (2, 1000)}))
        assert result.desired == {A: {"y"}}
        assert result.unloads == (Move(A, "x", "evict"),)
        assert result.unplaced == ("x",)


class TestReplication:
    def test_hot_adapter_replicated_in_proportion_to_traffic(self) -> None:
        engines = [engine(A, budget=3), engine(B, budget=3), engine(C, budget=3)]
        result = place(inp(engines, {"hot": (25, 1000), "warm": (12, 1000), "cold": (1, 1000)}))
        assert result.replicas == {"hot": 3, "warm": 2, "cold": 1}
        # first copies hot A, warm B, cold C; then hot's on C (1 req/s) and B; warm's on A
        # (8.3 req/s of hot, against C's 9.3): 14.3, 14.3, 9.3 req/s per engine
        assert result.desired == {A: {"hot", "warm"}, B: {"hot", "warm"}, C: {"hot", "cold"}}

    def test_copies_bounded_by_engines(self) -> None:
        result = place(inp([engine(A), engine(B)], {"hot": (100, 1000)}))
        assert result.replicas == {"hot": 2}
        assert result.desired == {A: {"hot"}, B: {"hot"}}
        assert result.loads == (load(A, "hot"), load(B, "hot", "replicate"))

    def test_extra_copies_go_by_rate_per_copy_when_slots_are_short(self) -> None:
        # 3 slots: h (40 req/s) and g (30) each get one, the third goes to h (40/1 > 30/1)
        engines = [engine(A, budget=1), engine(B, budget=1), engine(C, budget=1)]
        result = place(inp(engines, {"h": (40, 1000), "g": (30, 1000)}))
        assert result.replicas == {"h": 2, "g": 1}

    def test_hysteresis_keeps_a_copy_until_rate_drops_past_the_margin(self) -> None:
        engines = [engine(A, loaded=["x"]), engine(B, loaded=["x"])]
        # 9 req/s would need one copy (10 per copy), but two stay while 9 > 8 (= 10 x 0.8)
        kept = place(inp(engines, {"x": (9, 1000)}))
        assert kept.replicas == {"x": 2}
        assert kept.loads == kept.unloads == ()
        shrunk = place(inp(engines, {"x": (7.9, 1000)}))
        assert shrunk.replicas == {"x": 1}
        assert shrunk.unloads == (Move(B, "x", "shrink"),)

    def test_no_hysteresis_on_the_way_up(self) -> None:
        result = place(inp([engine(A, loaded=["x"]), engine(B)], {"x": (10.5, 1000)}))
        assert result.loads == (load(B, "x", "replicate"),)


class TestFewMoves:
    def test_loaded_adapters_stay_where_they_are(self) -> None:
        # balance would put y on B, but it is loaded on A: no move
        engines = [engine(A, budget=2, loaded=["x", "y"]), engine(B, budget=2)]
        result = place(inp(engines, {"x": (5, 1000), "y": (5, 1000)}))
        assert result.desired == {A: {"x", "y"}, B: frozenset()}
        assert result.loads == result.unloads == ()

    def test_restarted_engine_gets_its_adapters_back(self) -> None:
        # B restarted: it holds nothing, but the manager had placed y there
        engines = [engine(A, loaded=["x"], assigned=["x"]), engine(B, assigned=["y"]),
                   engine(C)]  # fmt: skip
        result = place(inp(engines, {"x": (1, 1000), "y": (1, 1000)}))
        assert result.loads == (load(B, "y", "restore"),)
        assert result.desired == {A: {"x"}, B: {"y"}, C: frozenset()}

    def test_new_engine_takes_the_hot_adapters_new_copy(self) -> None:
        engines = [engine(A, loaded=["hot", "x"]), engine(B)]
        result = place(inp(engines, {"hot": (15, 1000), "x": (1, 1000)}))
        assert result.loads == (load(B, "hot", "replicate"),)
        assert result.unloads == ()

    def test_stable_input_gives_no_moves(self) -> None:
        engines = [engine(A, budget=3), engine(B, budget=3)]
        usage = {"a": (25, 1000), "b": (3, 1000), "c": (0, 900.0)}
        first = place(inp(engines, usage))
        after = [engine(e.url, 3, first.desired[e.url], assigned=first.desired[e.url])
                 for e in engines]  # fmt: skip
        second = place(inp(after, usage))
        assert second.loads == second.unloads == ()
        assert second.desired == first.desired


class TestIdle:
    def test_idle_adapter_is_unloaded_everywhere(self) -> None:
        engines = [engine(A, loaded=["x", "y"]), engine(B, loaded=["x"])]
        result = place(inp(engines, {"x": (0, 399.0), "y": (0, 401.0)}))
        assert result.unloads == (Move(A, "x", "idle"), Move(B, "x", "idle"))
        assert result.desired == {A: {"y"}, B: frozenset()}

    def test_never_used_adapter_loaded_elsewhere_is_unloaded(self) -> None:
        result = place(inp([engine(A, loaded=["x"])], {"x": (0, None)}))
        assert result.unloads == (Move(A, "x", "idle"),)

    def test_unregistered_adapters_are_never_touched(self) -> None:
        result = place(inp([engine(A, loaded=["theirs"])], {}, adapters=[]))
        assert result.unloads == ()


class TestWake:
    def test_engine_with_room_and_least_traffic(self) -> None:
        engines = [engine(A, loaded=["x"]), engine(B, loaded=["y"])]
        usage = {"x": (5, 1000), "y": (1, 1000), "new": (0, None)}
        assert choose_wake(inp(engines, usage), "new") == (B, None)

    def test_full_budgets_evict_the_coldest_anywhere(self) -> None:
        engines = [engine(A, budget=1, loaded=["x"]), engine(B, budget=1, loaded=["y"])]
        usage = {"x": (0, 800.0), "y": (0, 700.0), "new": (0, None)}
        assert choose_wake(inp(engines, usage), "new") == (B, "y")

    def test_pinned_and_foreign_adapters_are_not_evicted(self) -> None:
        engines = [engine(A, budget=2, loaded=["p", "theirs"], pinned=["p"])]
        assert choose_wake(inp(engines, {"p": (0, 1.0), "new": (0, None)}), "new") is None

    def test_no_engine_of_the_base(self) -> None:
        assert choose_wake(inp([engine(A, base="other")], {"new": (0, None)}), "new") is None


@pytest.mark.parametrize("budget", [1, 2, 3])
def test_no_engine_over_budget_whatever_the_traffic(budget: int) -> None:
    usage = {f"a{i}": (float(i * 7 % 23), 1000.0) for i in range(12)}
    engines = [engine(url, budget, loaded=[f"a{i}" for i in range(k, k + budget + 1)])
               for k, url in enumerate((A, B, C))]  # fmt: skip
    result = place(inp(engines, usage))
    for url, names in result.desired.items():
        assert len(names) <= budget, url
    for url, names in result.desired.items():
        loaded = next(e.loaded for e in engines if e.url == url)
        assert {m.adapter for m in result.loads if m.engine == url} == names - loaded
        assert {m.adapter for m in result.unloads if m.engine == url} == loaded - names


NAMES = ("a", "b", "c", "d", "e", "f")


@st.composite
def fleets(draw: st.DrawFn) -> PlacementInput:
    engines = []
    for url in draw(st.lists(st.sampled_from((A, B, C)), min_size=1, max_size=3, unique=True)):
        budget = draw(st.integers(1, 3))
        loaded = draw(st.sets(st.sampled_from((*NAMES, "foreign")), max_size=4))
        pinned = draw(st.sets(st.sampled_from(sorted(loaded - {"foreign"}) or ["a"]), max_size=1))
        assigned = draw(st.sets(st.sampled_from(NAMES), max_size=3))
        engines.append(engine(url, budget, loaded, assigned=assigned, pinned=pinned & loaded))
    usage = {
        n: (draw(st.sampled_from((0.0, 0.5, 3.0, 12.0, 40.0))),
            draw(st.sampled_from((None, 100.0, 700.0, 990.0))))
        for n in NAMES
    }  # fmt: skip
    return inp(engines, usage)


@settings(max_examples=300, deadline=None)
@given(fleets())
def test_invariants_over_random_fleets(fleet: PlacementInput) -> None:
    result = place(fleet)
    rooms = 0
    for e in fleet.engines:
        want = result.desired[e.url]
        foreign = {n for n in e.loaded if n not in fleet.adapters}
        pinned = {n for n in e.pinned if n in fleet.adapters}
        assert pinned <= want
        assert len(want | foreign) <= max(e.budget, len(pinned | foreign)), e.url
        assert {m.adapter for m in result.loads if m.engine == e.url} == want - e.loaded
        unloaded = {m.adapter for m in result.unloads if m.engine == e.url}
        assert unloaded == (e.loaded & set(fleet.adapters)) - want
        rooms += max(0, e.budget - len(pinned) - len(foreign)) - len(want - pinned)
    active = [n for n in NAMES if is_active(fleet.usage[n], fleet.now_s, fleet.idle_unload_s)]
    placed = {n for names in result.desired.values() for n in names}
    assert set(result.unplaced) == set(active) - placed
    if result.unplaced:  # only when every slot is taken, and by adapters no colder
        assert rooms == 0
        coldest_placed = max(
            (priority(n, fleet.usage) for e in fleet.engines
             for n in result.desired[e.url] - e.pinned),
            default=None,
        )  # fmt: skip
        for n in result.unplaced:
            assert coldest_placed is None or priority(n, fleet.usage) > coldest_placed
    # applying the plan and placing again moves nothing (hysteresis, keep-first)
    applied = [
        EngineState(e.url, e.base_model, e.budget,
                    frozenset(result.desired[e.url] | {n for n in e.loaded
                                                       if n not in fleet.adapters}),
                    result.desired[e.url], e.pinned)
        for e in fleet.engines
    ]  # fmt: skip
    again = place(PlacementInput(tuple(applied), fleet.adapters, fleet.usage, fleet.now_s,
                                 fleet.idle_unload_s, fleet.replica_rate, fleet.hysteresis))  # fmt: skip
    assert again.loads == again.unloads == ()
