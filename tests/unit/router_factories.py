"""Factories for the router's values, and a pipeline stand-in that picks as the real one does.

``Picker`` drops refused candidates (``inf``), takes the cheapest and breaks ties with a
seeded rng, then tells the strategy what was routed: the contract of ``router/strategies/
base.py`` without the proxy, so strategy tests assert on picks, not only on costs.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import replace

from router.strategies.base import STRATEGIES, Strategy, StrategyDeps
from router.types import EngineMetrics, EnginePrefix, EngineView, PrefixView, RouteRequest

MODEL = "tiny"
_request_ids = itertools.count()


def engine(
    index: int,
    *,
    in_flight: int = 0,
    tokens: int = 0,
    metrics: EngineMetrics | None = None,
    models: Sequence[str] = (MODEL,),
    node: str = "",
) -> EngineView:
    """Engine ``e<index>`` at ``http://10.0.0.<index>:8000`` serving ``models``."""
    return EngineView(
        engine_id=f"e{index}",
        url=f"http://10.0.0.{index}:8000",
        models=frozenset(models),
        in_flight=in_flight,
        in_flight_tokens=tokens,
        metrics=metrics,
        node=node or f"n{index}",
        stream=f"n{index}/gpu0",
    )


def engines(count: int, **kwargs: object) -> list[EngineView]:
    return [engine(i, **kwargs) for i in range(count)]  # type: ignore[arg-type]


def engine_ids(count: int) -> list[str]:
    return [f"e{i}" for i in range(count)]


def metrics(age_s: float = 0.5, **fields: object) -> EngineMetrics:
    return EngineMetrics(age_s=age_s, **fields)  # type: ignore[arg-type]


def unknown_metrics() -> EngineMetrics:
    """A fresh scrape that exported nothing useful: every field unknown."""
    return EngineMetrics(age_s=0.1)


def request(
    text: str = "You are a helpful assistant. Hello!",
    *,
    tokens: int | None = None,
    user: str = "",
    session: str = "",
    model: str = MODEL,
    max_tokens: int = 16,
) -> RouteRequest:
    """A completions request; ``tokens`` defaults to a quarter of the characters."""
    return RouteRequest(
        request_id=f"r{next(_request_ids)}",
        route="completions",
        model=model,
        prompt_text=text,
        prompt_tokens=len(text) // 4 if tokens is None else tokens,
        max_tokens=max_tokens,
        user=user,
        session_id=session,
    )


def prefix(
    prompt_tokens: int, source: str = "precise", **per_engine: tuple[int, int, int]
) -> PrefixView:
    """``prefix(1000, e0=(gpu, node, peer))``: where each engine can get the prompt's KV."""
    return PrefixView(
        source=source,
        prompt_tokens=prompt_tokens,
        engines={eid: EnginePrefix(*tiers) for eid, tiers in per_engine.items()},
    )


def make(name: str, seed: int = 0, **tunables: object) -> Strategy:
    """The registered strategy ``name`` with a seeded rng and ``tunables``."""
    deps = StrategyDeps(rng=random.Random(seed), **tunables)  # type: ignore[arg-type]
    return STRATEGIES[name](deps)


class Picker:
    """Argmin over one strategy's costs, seeded tie-break, then ``routed`` (the pipeline's job)."""

    def __init__(self, strategy: Strategy, seed: int = 0) -> None:
        self.strategy = strategy
        self.rng = random.Random(seed)

    def pick(
        self,
        request: RouteRequest,
        candidates: Sequence[EngineView],
        prefix: PrefixView | None = None,
    ) -> EngineView | None:
        """The engine chosen, or ``None`` when every candidate is refused (Saturated)."""
        costs = self.strategy.score(request, candidates, prefix)
        assert len(costs) == len(candidates)
        best = min(costs, default=math.inf)
        if math.isinf(best):
            return None
        chosen = self.rng.choice([e for e, c in zip(candidates, costs, strict=True) if c == best])
        self.strategy.routed(request, chosen)
        return chosen

    def pick_id(
        self,
        request: RouteRequest,
        candidates: Sequence[EngineView],
        prefix: PrefixView | None = None,
    ) -> str | None:
        chosen = self.pick(request, candidates, prefix)
        return None if chosen is None else chosen.engine_id


class FakeClock:
    """Virtual ``time.monotonic`` for strategies (``StrategyDeps.clock``)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def loaded(view: EngineView, in_flight: int, tokens: int = 0) -> EngineView:
    """``view`` with the router's accounting replaced."""
    return replace(view, in_flight=in_flight, in_flight_tokens=tokens)


def long_text(topic: str, chars: int) -> str:
    """Deterministic prose of ``chars`` characters, different per ``topic``."""
    words = [f"{topic}-{i}" for i in range(chars)]
    return " ".join(words)[:chars]


SYSTEM = long_text("system", 2048)  # a shared system prompt: eight 256-character blocks
