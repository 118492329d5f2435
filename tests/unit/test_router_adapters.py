"""LoRA adapters on demand (router/adapters.py), without sockets: when a router holds a
request for a model no engine lists, what a LoRA manager's 404 ends, which held models an
engine's new list wakes; the settings that switch it on."""

from __future__ import annotations

import asyncio

import pytest

from router.config import RouterSettings
from router.engines import EnginePool, parse_engines
from router.errors import ModelNotFound
from router.hold import HoldQueue
from router.ledger import InMemoryLedger
from router.limits import InMemoryLimiter
from router.proxy import Proxy
from router.server import _pipeline
from router.wake import HttpWaker


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("flags", "adapters", "holds"),
    [
        ({"engines": "http://a:1"}, False, False),
        ({"engines": "http://a:1", "lora_url": "http://127.0.0.1:8092"}, True, False),
        ({"engines": "http://a:1", "lora_url": "http://l:1", "hold_timeout_s": 0}, False, False),
        ({"engines": "http://a:1", "lora_url": "http://l:1", "hold_max_requests": 0}, False, False),
    ],
)
def test_a_lora_manager_holds_requests_for_unlisted_models_but_not_a_dead_static_fleet(
    flags: dict[str, object], adapters: bool, holds: bool
) -> None:
    settings = RouterSettings(**flags)  # type: ignore[arg-type]
    assert (settings.holds_adapters, settings.holds) == (adapters, holds)


@pytest.mark.parametrize("name", ["lora_url", "placement_url"])
def test_the_lora_and_placement_urls_must_be_http(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        RouterSettings(**{name: "127.0.0.1:8092"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="placement_interval_s"):
        RouterSettings(placement_interval_s=0)


def proxy(*urls: str, **flags: object) -> Proxy:
    settings = RouterSettings(
        engines=",".join(urls), lora_url="http://127.0.0.1:9", breaker_failures=1,
        **flags,  # type: ignore[arg-type]
    )  # fmt: skip
    pool = EnginePool(parse_engines(settings.engines), settings)
    return Proxy(settings, pool, _pipeline(settings, None), InMemoryLedger(), InMemoryLimiter())


def up(p: Proxy, engine_id: str, *models: str) -> None:
    engine = p.pool._engines[engine_id]
    engine.healthy, engine.models = True, frozenset(models)


def test_a_404_from_the_manager_ends_the_models_held_requests_while_the_fleet_answers() -> None:
    p = proxy("http://a:1")
    assert p.adapters is not None
    sql, chat = p.hold.try_hold("sql-lora"), p.hold.try_hold("chat-lora")
    assert sql is not None and chat is not None
    p.adapters._not_found("sql-lora")  # no engine up yet: "not an adapter" proves nothing
    assert sql.state == "held"
    up(p, "http://a:1", "base")
    assert p.adapters.fleet_answers()
    p.adapters._not_found("sql-lora")
    assert (sql.state, chat.state, p.hold.num_held()) == ("refused", "held", 1)
    assert p.hold.statistics().num_refused == 1


def test_a_held_waiter_raises_the_refusal_at_once() -> None:
    clock = Clock()
    hold = HoldQueue(max_requests=4, timeout_s=60.0, clock=clock)

    async def scenario() -> BaseException | None:
        waiter = asyncio.create_task(hold.hold("sql-lora"))
        await asyncio.sleep(0)
        hold.refuse("sql-lora", ModelNotFound("sql-lora"))
        try:
            await asyncio.wait_for(waiter, 1.0)
        except ModelNotFound as exc:
            return exc
        return None

    error = asyncio.run(scenario())
    assert isinstance(error, ModelNotFound) and error.status == 404
    assert "`sql-lora` does not exist" in str(error)
    assert hold.num_held() == 0


def test_an_engine_listing_a_held_adapter_wakes_its_requests_only() -> None:
    p = proxy("http://a:1", "http://b:1")
    assert p.adapters is not None
    up(p, "http://a:1", "base")
    sql, chat = p.hold.try_hold("sql-lora"), p.hold.try_hold("chat-lora")
    assert sql is not None and chat is not None
    assert p.adapters.wake_listed() == []
    p.pool._engines["http://b:1"].models = frozenset({"base", "sql-lora"})  # b not healthy yet
    assert p.adapters.wake_listed() == []
    up(p, "http://b:1", "base", "sql-lora")
    assert p.adapters.wake_listed() == ["sql-lora"]
    assert (sql.state, chat.state) == ("woken", "held")


def test_the_manager_is_asked_only_while_the_fleet_answers() -> None:
    p = proxy("http://a:1")
    assert p.adapters is not None
    p.hold.try_hold("sql-lora")
    assert p.adapters._models_to_ask() == []  # scale from zero is the autoscaler's
    up(p, "http://a:1", "base")
    assert p.adapters._models_to_ask() == ["sql-lora"]


def test_a_404_is_remembered_for_one_interval() -> None:
    clock = Clock()
    waker = HttpWaker("http://m:1", list, interval_s=1.0, clock=clock, on_not_found=print)
    waker._remember_not_found("nope")
    assert waker.was_not_found("nope") and not waker.was_not_found("other")
    clock.now += 0.999
    assert waker.was_not_found("nope")
    clock.now += 0.002
    assert not waker.was_not_found("nope")
