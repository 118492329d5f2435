"""LoRA placement (control/lora/placement.py): exact desired sets and moves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control.lora.placement import choose_wake, is_active, per_copy_rate, place, priority
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
        replica_rate: float = 10.0, hysteresis: float = 0.2, balance: float = 0.5,
        rate_resolution: float = 0.0) -> PlacementInput:  # fmt: skip
    names = list(adapters) if adapters is not None else list(usage)
    return PlacementInput(
        engines=tuple(engines),
        adapters=dict.fromkeys(names, BASE),
        usage={n: Usage(rate, last) for n, (rate, last) in usage.items()},
        now_s=now,
        idle_unload_s=idle,
        replica_rate=replica_rate,
        hysteresis=hysteresis,
        balance=balance,
        rate_resolution=rate_resolution,
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
        # copies by rate per copy, each on the least loaded engine without one: hot A (25),
        # hot B (12.5), warm C (12), hot C (8.3), warm A (6; A and B tie at 8.3 req/s, one
        # adapter each: A by URL), cold B (1): 14.3, 9.3, 14.3 req/s per engine
        assert result.desired == {A: {"hot", "warm"}, B: {"hot", "cold"}, C: {"hot", "warm"}}

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
        kept = place(inp(engines, {"x": (9, 1000)}, balance=0))
        assert kept.replicas == {"x": 2}
        assert kept.loads == kept.unloads == ()
        shrunk = place(inp(engines, {"x": (7.9, 1000)}, balance=0))
        assert shrunk.replicas == {"x": 1}
        assert shrunk.unloads == (Move(B, "x", "shrink"),)

    def test_no_hysteresis_on_the_way_up(self) -> None:
        result = place(inp([engine(A, loaded=["x"]), engine(B)], {"x": (10.5, 1000)}))
        assert result.loads == (load(B, "x", "replicate"),)


class TestSlotHysteresis:
    """One slot, held by ``held``; ``new`` asks for it (placement invariant 4)."""

    def swap(self, held: float, new: float, hysteresis: float = 0.2,
             rate_resolution: float = 0.0) -> bool:  # fmt: skip
        engines = [engine(A, budget=1, loaded=["held"])]
        usage = {"held": (held, 1000.0), "new": (new, 1000.0)}
        result = place(inp(engines, usage, hysteresis=hysteresis,
                           rate_resolution=rate_resolution))  # fmt: skip
        if result.loads:
            assert result.loads == (load(A, "new"),)
            assert result.unloads == (Move(A, "held", "evict"),)
            assert result.unplaced == ("held",)
            return True
        assert result.unloads == ()
        assert result.unplaced == ("new",)
        return False

    def test_the_holder_keeps_its_slot_within_the_margin(self) -> None:
        assert not self.swap(1.0, 1.2)  # 1.2 <= 1.0 / 0.8
        assert self.swap(1.0, 1.3)
        assert self.swap(1.0, 1.2, hysteresis=0.0)  # no margin: the hotter one

    def test_a_tie_at_the_margin_keeps_the_holder(self) -> None:
        assert not self.swap(1.0, 2.0, hysteresis=0.5)
        assert self.swap(1.0, 2.01, hysteresis=0.5)

    def test_a_challenger_must_also_beat_it_by_one_request_per_window(self) -> None:
        # 5 s windows: 2 requests against 1 is noise; 3 against 1 is not (0.6 > 0.25 + 0.2)
        assert self.swap(0.2, 0.4)
        assert not self.swap(0.2, 0.4, rate_resolution=0.2)
        assert self.swap(0.2, 0.6, rate_resolution=0.2)

    def test_an_idle_holder_loses_to_any_traffic_beyond_the_resolution(self) -> None:
        assert not self.swap(0.0, 0.2, rate_resolution=0.2)
        assert self.swap(0.0, 0.25, rate_resolution=0.2)

    def test_among_cold_holders_the_least_recently_used_loses(self) -> None:
        engines = [engine(A, budget=2, loaded=["old", "recent"])]
        usage = {"old": (0.5, 500.0), "recent": (0.5, 900.0), "new": (1.0, 1000)}
        result = place(inp(engines, usage, hysteresis=0.2))
        assert result.unloads == (Move(A, "old", "evict"),)
        assert result.loads == (load(A, "new"),)


class TestBalance:
    @pytest.mark.parametrize(
        ("total", "balance", "per_copy"),
        [
            (8.0, 0.5, 8.0),  # fair 2: 8 req/s of headroom per engine, under replica_rate
            (24.0, 0.5, 4.0),  # fair 6: headroom 4 > 0.5 x 6
            (40.0, 0.5, 5.0),  # fair 10 = replica_rate: half an engine's fair share
            (60.0, 0.5, 7.5),  # fair 15: past capacity, within 1.5x of even
            (200.0, 0.5, 10.0),  # never more than replica_rate
            (40.0, 0.0, 10.0),  # off
            (0.0, 0.5, 10.0),  # no traffic
        ],
    )
    def test_per_copy_rate(self, total: float, balance: float, per_copy: float) -> None:
        fleet = inp([engine(A)], {}, balance=balance)
        assert per_copy_rate(fleet, total, 4) == per_copy

    def test_hot_adapter_under_replica_rate_gets_a_copy_for_balance(self) -> None:
        # 16 req/s on 2 engines (fair 8, per copy max(10 - 8, 0.5 x 8) = 4): hot (7) wants
        # 2 copies; its 2nd (3.5/copy) outranks the only copy of e (1 x 1.25, held)
        engines = [engine(A, budget=3, loaded=["hot", "a", "b"]),
                   engine(B, budget=3, loaded=["c", "d", "e"])]  # fmt: skip
        usage = {"hot": (7, 1000), "a": (3, 1000), "b": (3, 1000), "c": (1, 1000),
                 "d": (1, 1000), "e": (1, 1000)}  # fmt: skip
        result = place(inp(engines, usage))
        assert result.replicas["hot"] == 2
        assert result.loads == (load(B, "hot", "replicate"),)
        assert result.unloads == (Move(B, "e", "evict"),)
        assert result.unplaced == ("e",)
        # A carried 13 req/s and B 3; now 9.5 and 5.5. Without the rule nothing moves
        unbalanced = place(inp(engines, usage, balance=0))
        assert unbalanced.loads == unbalanced.unloads == ()
        assert unbalanced.replicas["hot"] == 1

    def test_no_copy_for_balance_while_engines_have_headroom(self) -> None:
        # 8 req/s on 2 engines: fair 4, headroom 6; hot (6) fits one copy exactly
        result = place(inp([engine(A), engine(B)], {"hot": (6, 1000), "x": (2, 1000)}))
        assert result.replicas == {"hot": 1, "x": 1}
        hotter = place(inp([engine(A), engine(B)], {"hot": (6.5, 1000), "x": (1.5, 1000)}))
        assert hotter.replicas == {"hot": 2, "x": 1}  # 6.5 > 6: a second copy


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
    balance = draw(st.sampled_from((0.0, 0.5)))
    return inp(engines, usage, balance=balance, rate_resolution=draw(st.sampled_from((0.0, 0.2))))


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
        assert rooms == 0  # (than the slot hysteresis margin, for an incumbent)
        keep = 1.0 / (1.0 - fleet.hysteresis)
        for e in fleet.engines:
            for p in result.desired[e.url] - e.pinned:
                held = any(p in f.loaded | f.assigned and p not in f.pinned
                           for f in fleet.engines)  # fmt: skip
                margin, gap = (keep, fleet.rate_resolution) if held else (1.0, 0.0)
                for n in result.unplaced:
                    assert fleet.usage[n].rate <= fleet.usage[p].rate * margin + gap, (n, p)
                    if not held and fleet.usage[n].rate == fleet.usage[p].rate:
                        assert priority(n, fleet.usage) > priority(p, fleet.usage), (n, p)
    # applying the plan and placing again moves nothing (hysteresis, keep-first)
    applied = [
        EngineState(e.url, e.base_model, e.budget,
                    frozenset(result.desired[e.url] | {n for n in e.loaded
                                                       if n not in fleet.adapters}),
                    result.desired[e.url], e.pinned)
        for e in fleet.engines
    ]  # fmt: skip
    again = place(replace(fleet, engines=tuple(applied)))
    assert again.loads == again.unloads == ()
