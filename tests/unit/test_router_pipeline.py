"""The pipeline: filter, the strategy by header, mixes, tie-breaks, saturation."""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Iterator, Sequence
from typing import ClassVar

import pytest

from router.errors import BadRequest, NoEngineAvailable, Saturated, UnknownStrategy
from router.pipeline import Pipeline, combine
from router.strategies import STRATEGIES, MixMember, Strategy, StrategyDeps
from router.types import EngineView, PrefixView, RouteDecision, RouteOutcome, RouteRequest

COSTS: dict[str, dict[str, float]] = {}  # fake strategy name -> engine -> cost


class Fixed(Strategy):
    """Costs from ``COSTS[name]``; records what it was told."""

    seen: ClassVar[list[tuple[str, str]]] = []

    def score(
        self, request: RouteRequest, engines: Sequence[EngineView], prefix: PrefixView | None
    ) -> list[float]:
        self.seen.append((self.name, ",".join(e.engine_id for e in engines)))
        return [COSTS[self.name][e.engine_id] for e in engines]

    def reason(self, chosen: EngineView, prefix: PrefixView | None) -> str:
        return f"{self.name}-reason"

    def routed(self, request: RouteRequest, chosen: EngineView) -> None:
        self.seen.append((self.name, "routed:" + chosen.engine_id))

    def observe(self, outcome: RouteOutcome) -> None:
        self.seen.append((self.name, "observed:" + outcome.engine_id))


class Prefixed(Fixed):
    uses_prefix = True


def fake(name: str, base: type[Fixed] = Fixed) -> type[Strategy]:
    return type(name.replace("-", "_"), (base,), {"name": name})


@pytest.fixture(autouse=True)
def fakes() -> Iterator[None]:
    added = {n: fake(n) for n in ("fa", "fb", "fc")} | {"fp": fake("fp", Prefixed)}
    STRATEGIES.update(added)
    Fixed.seen.clear()
    COSTS.clear()
    try:
        yield
    finally:
        for name in added:
            del STRATEGIES[name]


def engine(engine_id: str, models: Sequence[str] = ("m",)) -> EngineView:
    return EngineView(engine_id=engine_id, url=engine_id, models=frozenset(models))


def request(model: str = "m") -> RouteRequest:
    return RouteRequest(request_id="r", route="completions", model=model, prompt_text="p",
                        prompt_tokens=1)  # fmt: skip


class FakeLocator:
    def __init__(self, view: PrefixView | None, delay_s: float = 0.0) -> None:
        self.view, self.delay_s, self.calls = view, delay_s, 0

    async def locate(
        self, request: RouteRequest, engines: Sequence[EngineView]
    ) -> PrefixView | None:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        return self.view

    async def close(self) -> None:
        pass


def pipeline(default: str = "fa", seed: int = 0, locator: FakeLocator | None = None) -> Pipeline:
    return Pipeline(default, StrategyDeps(rng=random.Random(seed)), locator=locator,
                    locate_timeout_s=0.05, retry_after_s=2.0)  # fmt: skip


ENGINES = [engine("e1"), engine("e2"), engine("e3")]
ALL: Callable[[str], bool] = lambda engine_id: True  # noqa: E731


def route(p: Pipeline, strategy: str | None = None, engines: Sequence[EngineView] = ENGINES,
          allows: Callable[[str], bool] = ALL, exclude: frozenset[str] = frozenset(),
          model: str = "m") -> RouteDecision:  # fmt: skip
    return asyncio.run(p.route(request(model), engines, allows, strategy=strategy, exclude=exclude))


def test_the_cheapest_engine_wins_and_every_score_is_reported() -> None:
    COSTS["fa"] = {"e1": 3.0, "e2": 1.0, "e3": 2.0}
    decision = route(pipeline())
    assert decision.engine_id == "e2"
    assert decision.strategy == "fa"
    assert decision.reason == "fa-reason"
    assert decision.scores == {"fa": {"e1": 3.0, "e2": 1.0, "e3": 2.0}}
    assert Fixed.seen == [("fa", "e1,e2,e3"), ("fa", "routed:e2")]


def test_candidates_are_healthy_allowed_serving_and_not_yet_tried() -> None:
    COSTS["fa"] = {"e1": 0.0, "e2": 1.0, "e3": 2.0, "e4": 3.0}
    engines = [*ENGINES, engine("e4", models=("other",))]
    decision = route(
        pipeline(), engines=engines, allows=lambda e: e != "e1", exclude=frozenset({"e2"})
    )
    assert decision.engine_id == "e3"
    assert decision.reason == "only-candidate"
    assert Fixed.seen[0] == ("fa", "e3")


def test_an_engine_whose_models_are_not_known_yet_serves_any_model() -> None:
    COSTS["fa"] = {"e1": 5.0, "e9": 1.0}
    decision = route(pipeline(), engines=[engine("e1"), engine("e9", models=())])
    assert decision.engine_id == "e9"


def test_a_model_no_engine_serves_is_404_and_no_allowed_engine_is_503() -> None:
    with pytest.raises(BadRequest, match="does not exist") as missing:
        route(pipeline(), model="nope")
    assert missing.value.status == 404
    with pytest.raises(NoEngineAvailable) as none:
        route(pipeline(), allows=lambda e: False)
    assert none.value.retry_after_s == 2.0
    with pytest.raises(NoEngineAvailable):
        route(pipeline(), allows=lambda e: False, model="nope")


def test_the_header_choice_overrides_the_default_and_aibrix_header_is_honoured() -> None:
    p = pipeline()
    assert p.choose_text({}) == "fa"
    assert p.choose_text({"routing-strategy": "fb"}) == "fb"
    assert p.choose_text({"x-shoal-routing-strategy": "fc", "routing-strategy": "fb"}) == "fc"
    COSTS["fa"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    COSTS["fb"] = {"e1": 1.0, "e2": 1.0, "e3": 0.0}
    assert route(p, strategy="fb").engine_id == "e3"
    assert route(p).engine_id == "e1"


def test_unknown_strategies_fail_per_request_and_at_construction() -> None:
    with pytest.raises(UnknownStrategy):
        route(pipeline(), strategy="no-such")
    with pytest.raises(UnknownStrategy):
        pipeline(default="no-such")


def test_a_mix_min_max_normalises_each_member_then_weights() -> None:
    # fa in seconds (large spread), fb in requests: normalised, fb's weight decides
    COSTS["fa"] = {"e1": 0.0, "e2": 100.0, "e3": 50.0}  # -> 0, 1, 0.5
    COSTS["fb"] = {"e1": 8.0, "e2": 0.0, "e3": 4.0}  # -> 1, 0, 0.5
    assert route(pipeline(), strategy="fa:1,fb:3").engine_id == "e2"  # totals 3, 1, 2
    assert route(pipeline(), strategy="fa:3,fb:1").engine_id == "e1"  # totals 1, 3, 2
    decision = route(pipeline(), strategy="fa:3,fb:1")
    assert decision.reason == "fa-reason"  # the heaviest member names the reason
    assert decision.scores == {"fa": COSTS["fa"], "fb": COSTS["fb"]}


def test_combine_keeps_refusals_and_equal_costs_count_zero() -> None:
    members = (MixMember("a", 1.0), MixMember("b", 2.0))
    assert combine(members, [[1.0, 1.0, 1.0], [0.0, math.inf, 4.0]]) == [0.0, math.inf, 2.0]
    assert combine((MixMember("a", 5.0),), [[7.0, 9.0]]) == [7.0, 9.0]


def test_refused_candidates_are_dropped_and_all_refused_is_saturated() -> None:
    COSTS["fa"] = {"e1": math.inf, "e2": 9.0, "e3": math.inf}
    assert route(pipeline()).engine_id == "e2"
    COSTS["fa"] = {"e1": math.inf, "e2": math.inf, "e3": math.inf}
    Fixed.seen.clear()
    with pytest.raises(Saturated) as caught:
        route(pipeline())
    assert caught.value.status == 429
    assert caught.value.retry_after_s == 2.0
    assert not any(told.startswith("routed:") for _, told in Fixed.seen)


def test_ties_are_broken_by_the_injected_rng() -> None:
    COSTS["fa"] = {"e1": 1.0, "e2": 1.0, "e3": 5.0}
    picks = [route(pipeline(seed=seed)).engine_id for seed in range(40)]
    assert set(picks) == {"e1", "e2"}
    again = [route(pipeline(seed=seed)).engine_id for seed in range(40)]
    assert picks == again


def test_strategy_instances_are_built_once_per_name() -> None:
    p = pipeline()
    COSTS["fa"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    COSTS["fb"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    route(p)
    route(p, strategy="fa:1,fb:1")
    assert p.strategy("fa") is p.strategy("fa")
    assert p.members("fa:1,fb:1") is p.members("fa:1,fb:1")


def test_the_locator_is_asked_only_for_strategies_that_use_the_prefix() -> None:
    view = PrefixView(source="precise", prompt_tokens=10)
    locator = FakeLocator(view)
    p = pipeline(locator=locator)
    COSTS["fa"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    COSTS["fp"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    route(p)
    assert locator.calls == 0
    route(p, strategy="fa,fp")
    assert locator.calls == 1


def test_a_slow_locator_counts_as_unknown() -> None:
    seen: list[PrefixView | None] = []

    class Spy(Prefixed):
        name = "spy"

        def score(self, request: RouteRequest, engines: Sequence[EngineView],
                  prefix: PrefixView | None) -> list[float]:  # fmt: skip
            seen.append(prefix)
            return [0.0] * len(engines)

    STRATEGIES["spy"] = Spy
    try:
        route(pipeline(locator=FakeLocator(PrefixView("precise", 1), delay_s=1.0)), strategy="spy")
    finally:
        del STRATEGIES["spy"]
    assert seen == [None]


def test_observe_reaches_every_member_of_the_deciding_mix() -> None:
    p = pipeline()
    COSTS["fa"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    COSTS["fb"] = {"e1": 0.0, "e2": 1.0, "e3": 1.0}
    decision = route(p, strategy="fa,fb")
    Fixed.seen.clear()
    p.observe(decision, RouteOutcome(request=request(), engine_id="e1", ok=True))
    assert Fixed.seen == [("fa", "observed:e1"), ("fb", "observed:e1")]
