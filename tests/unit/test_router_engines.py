"""The engine pool's bookkeeping without sockets: membership, verdicts, snapshots."""

from __future__ import annotations

from router.config import RouterSettings
from router.engines import EnginePool, parse_engines
from router.scrape import MetricsScraper
from router.types import EngineSpec


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pool(clock: Clock, *urls: str) -> EnginePool:
    settings = RouterSettings(engines=",".join(urls), breaker_failures=2, breaker_cooldown_s=10,
                              metrics_stale_s=5)  # fmt: skip
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    return EnginePool(parse_engines(settings.engines), settings, clock=clock, scraper=scraper)


def healthy(p: EnginePool, *ids: str) -> None:
    for engine_id in ids:  # what a passing health check records
        p._engines[engine_id].healthy = True


def test_an_engine_is_a_candidate_only_once_healthy_and_while_its_breaker_allows() -> None:
    clock = Clock()
    p = pool(clock, "http://a", "http://b")
    assert not p.allows("http://a")  # never checked
    healthy(p, "http://a", "http://b")
    assert p.allows("http://a") and p.num_healthy() == 2
    p.record_failure("http://a")
    assert p.allows("http://a")
    p.record_failure("http://a")
    assert not p.allows("http://a")
    assert p.breaker_state("http://a").value == "open"
    clock.now = 10.0
    assert p.allows("http://a")  # the half-open probe
    p.on_attempt("http://a")
    assert not p.allows("http://a")
    p.record_success("http://a")
    assert p.allows("http://a")
    assert not p.allows("http://nowhere")


def test_breaker_changes_are_reported() -> None:
    clock = Clock()
    p = pool(clock, "http://a")
    seen: list[tuple[str, str]] = []
    p.on_breaker_change = lambda engine, state: seen.append((engine, state.value))
    p.record_failure("http://a")
    p.record_failure("http://a")
    p.record_failure("http://a")  # already open: no new report
    p.record_success("http://a")
    assert seen == [("http://a", "open"), ("http://a", "closed")]


def test_views_join_the_ledger_and_fresh_metrics() -> None:
    clock = Clock()
    p = pool(clock, "http://a", "http://b=n1/gpu0")
    p.scraper.record("http://a", 'vllm:num_requests_running{engine="0"} 4.0\n')
    views = {v.engine_id: v for v in p.views({"http://b": (3, 120)})}
    assert (views["http://a"].in_flight, views["http://a"].in_flight_tokens) == (0, 0)
    assert views["http://a"].metrics is not None
    assert views["http://a"].metrics.num_running == 4.0
    assert (views["http://b"].in_flight, views["http://b"].in_flight_tokens) == (3, 120)
    assert views["http://b"].metrics is None  # never scraped: unknown
    clock.now = 6.0
    assert all(v.metrics is None for v in p.views({}))  # stale: unknown


def test_discovery_changes_keep_state_of_engines_that_stay() -> None:
    clock = Clock()
    p = pool(clock, "http://a", "http://b")
    healthy(p, "http://a", "http://b")
    p.set_engines([EngineSpec("http://b", "n2/gpu1"), EngineSpec("http://c")])
    assert p.engine_ids == ["http://b", "http://c"]
    assert p.allows("http://b")  # kept its health
    assert not p.allows("http://c")  # new: unhealthy until checked
    assert [v.stream for v in p.views({})] == ["n2/gpu1", ""]


def test_models_are_the_union_of_healthy_engines_cards() -> None:
    clock = Clock()
    p = pool(clock, "http://a", "http://b", "http://c")
    healthy(p, "http://a", "http://b")
    cards = {
        "http://a": ({"id": "base"},),
        "http://b": ({"id": "base", "owned_by": "b"}, {"id": "lora1", "parent": "base"}),
        "http://c": ({"id": "only-on-a-dead-engine"},),
    }
    for engine_id, engine_cards in cards.items():
        p._engines[engine_id].cards = engine_cards
    assert p.model_cards() == [{"id": "base"}, {"id": "lora1", "parent": "base"}]
    rows = {row["id"]: row for row in p.status({"http://a": (2, 10)})}
    assert rows["http://a"]["in_flight"] == 2
    assert rows["http://c"]["healthy"] is False
    assert rows["http://a"]["breaker"] == "closed"


def test_an_engines_gpu_type_reaches_its_view_and_the_status_listing() -> None:
    clock = Clock()
    p = pool(clock, "http://a")
    p.set_engines([EngineSpec("http://a", "", "A100"), EngineSpec("http://b")])
    assert [(v.engine_id, v.gpu_type) for v in p.views({})] == [("http://a", "A100"),
                                                                 ("http://b", "")]  # fmt: skip
    p.set_engines([EngineSpec("http://a", "", "L4")])  # the file changed its type
    assert [v.gpu_type for v in p.views({})] == ["L4"]
    assert [row["gpu_type"] for row in p.status({})] == ["L4"]
