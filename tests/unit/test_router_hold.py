"""The holding queue of scale from zero (router/hold.py) on virtual time, the autoscaler
wake gate, the bounded model labels of the router's metrics, and when a router holds and
wakes (the proxy's decisions on a pool whose health checks are recorded by hand)."""

from __future__ import annotations

import asyncio

import pytest

from router.config import RouterSettings
from router.engines import EnginePool, parse_engines
from router.errors import HoldFull, HoldTimedOut, NoEngineAvailable
from router.hold import HoldQueue, WakeGate
from router.ledger import InMemoryLedger
from router.limits import InMemoryLimiter
from router.metrics import OTHER_MODEL, ModelLabels, RouterMetrics
from router.proxy import Proxy
from router.server import _pipeline


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def queue(clock: Clock, *, max_requests: int = 3, timeout_s: float = 10.0) -> HoldQueue:
    return HoldQueue(max_requests=max_requests, timeout_s=timeout_s, clock=clock)


# ---- the logic ---------------------------------------------------------------------------


def test_requests_are_held_per_model_under_one_bound_and_refused_beyond_it() -> None:
    q = queue(Clock(), max_requests=3)
    a1, b1, a2 = q.try_hold("a"), q.try_hold("b"), q.try_hold("a")
    assert None not in (a1, b1, a2)
    assert q.try_hold("c") is None  # the bound is over all models
    assert (q.num_held(), q.num_held("a"), q.num_held("b"), q.num_held("c")) == (3, 2, 1, 0)
    stats = q.statistics()
    assert dict(stats.held) == {"a": 2, "b": 1}
    assert (stats.num_admitted, stats.num_full) == (3, 1)


def test_wake_takes_one_models_tickets_in_arrival_order_and_frees_room() -> None:
    q = queue(Clock(), max_requests=3)
    first, other, second = q.try_hold("a"), q.try_hold("b"), q.try_hold("a")
    assert q.wake("a") == [first, second]
    assert q.wake("a") == []  # nothing left to wake
    assert q.held_models() == ["b"] and q.num_held() == 1
    assert first is not None and other is not None and first.state == "woken"
    assert other.state == "held"
    assert q.try_hold("c") is not None and q.try_hold("c") is not None  # room again
    assert q.statistics().num_woken == 2


def test_tickets_expire_at_their_deadline_on_the_injected_clock() -> None:
    clock = Clock()
    q = queue(clock, timeout_s=10.0)
    early = q.try_hold("a")
    clock.now += 4
    late = q.try_hold("a")
    explicit = q.try_hold("b", deadline=clock.now + 1)  # a re-hold keeps its first deadline
    clock.now += 1
    assert q.take_expired() == [explicit]
    clock.now += 4.999
    assert q.take_expired() == []
    clock.now += 0.001  # exactly 10 s after the first
    assert q.take_expired() == [early]
    assert q.wake("a") == [late]
    assert (q.statistics().num_timed_out, q.num_held()) == (2, 0)


def test_a_cancelled_ticket_leaves_the_queue_once() -> None:
    q = queue(Clock())
    ticket = q.try_hold("a")
    assert ticket is not None
    assert q.cancel(ticket) is True
    assert q.cancel(ticket) is False  # no double count
    assert q.wake("a") == [] and q.num_held() == 0
    assert q.statistics().num_cancelled == 1


def test_holding_is_off_with_a_zero_bound_or_timeout() -> None:
    assert not queue(Clock(), max_requests=0).enabled
    assert not queue(Clock(), timeout_s=0).enabled
    assert queue(Clock(), timeout_s=0).try_hold("a") is None


def test_the_wake_gate_passes_each_model_at_most_once_per_interval() -> None:
    gate = WakeGate(1.0, max_models=2)
    assert [gate.try_pass("a", 0.0), gate.try_pass("a", 0.5), gate.try_pass("b", 0.5)] == [
        True,
        False,
        True,
    ]
    assert gate.try_pass("a", 1.0) is True
    assert gate.try_pass("a", 1.5) is False
    assert gate.try_pass("c", 2.6) is True  # over max_models: forgets models past their interval
    assert gate.try_pass("a", 2.6) is True


# ---- the waiting -------------------------------------------------------------------------


def test_waiters_resume_first_come_first_served_when_their_model_wakes() -> None:
    async def scenario() -> tuple[list[str], float]:
        q = HoldQueue(max_requests=8, timeout_s=30.0)
        order: list[str] = []

        async def client(name: str, model: str) -> None:
            await q.hold(model)
            order.append(name)

        tasks = [asyncio.create_task(client(n, m)) for n, m in
                 [("a1", "a"), ("b1", "b"), ("a2", "a"), ("a3", "a")]]  # fmt: skip
        await asyncio.sleep(0)
        assert q.num_held() == 4
        q.wake("a")
        await asyncio.sleep(0.01)
        held_b = q.num_held("b")
        tasks[1].cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return order, held_b

    order, held_b = asyncio.run(scenario())
    assert order == ["a1", "a2", "a3"]
    assert held_b == 1


def test_a_waiter_times_out_with_retry_after_and_leaves_the_queue() -> None:
    async def scenario() -> tuple[HoldTimedOut, int]:
        q = HoldQueue(max_requests=8, timeout_s=0.05, retry_after_s=3.0)
        with pytest.raises(HoldTimedOut) as caught:
            await q.hold("a")
        return caught.value, q.num_held()

    error, left = asyncio.run(scenario())
    assert isinstance(error, NoEngineAvailable)  # the same 503 family
    assert (error.status, error.code, error.retry_after_s, left) == (503, "hold_timeout", 3.0, 0)
    assert "0.05 s" in str(error)


def test_a_full_queue_refuses_at_once_and_a_cancelled_waiter_is_dropped() -> None:
    async def scenario() -> tuple[str, int, int]:
        q = HoldQueue(max_requests=1, timeout_s=30.0)
        waiter = asyncio.create_task(q.hold("a"))
        await asyncio.sleep(0)
        with pytest.raises(HoldFull) as caught:
            await q.hold("a")
        waiter.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return caught.value.code, q.num_held(), q.statistics().num_cancelled

    assert asyncio.run(scenario()) == ("hold_full", 0, 1)


# ---- model labels and settings -----------------------------------------------------------


def test_model_labels_are_bounded_but_served_models_always_get_their_own() -> None:
    labels = ModelLabels(limit=2)
    assert [labels.label("x"), labels.label("y"), labels.label("z"), labels.label("")] == [
        "x",
        "y",
        OTHER_MODEL,
        OTHER_MODEL,
    ]
    labels.serve(["tiny"])
    assert labels.label("tiny") == "tiny" and labels.label("x") == "x"


def test_served_models_are_reported_at_zero_while_idle() -> None:
    metrics = RouterMetrics()
    metrics.serve_models(["tiny"])
    assert metrics.count_arrival("tiny") == "tiny"
    text = metrics.render().decode()
    assert 'shoal_router_arrivals_total{model="tiny"} 1.0' in text
    assert 'shoal_router_in_flight{model="tiny"} 0.0' in text


@pytest.mark.parametrize(
    ("flags", "holds"),
    [
        ({"engines": "http://a:1"}, False),  # a static fleet: nobody adds engines
        ({"engines": "http://a:1", "autoscaler_url": "http://127.0.0.1:8090"}, True),
        ({"discovery": "file", "discovery_file": "engines.json"}, True),
        ({"discovery": "file", "discovery_file": "f", "hold_timeout_s": 0}, False),
        ({"discovery": "file", "discovery_file": "f", "hold_max_requests": 0}, False),
    ],
)
def test_a_router_holds_only_where_engines_can_appear(
    flags: dict[str, object], holds: bool
) -> None:
    assert RouterSettings(**flags).holds is holds  # type: ignore[arg-type]


def test_the_autoscaler_url_must_be_http() -> None:
    with pytest.raises(ValueError, match="autoscaler_url"):
        RouterSettings(autoscaler_url="127.0.0.1:8090")


# ---- which requests a router holds, and when it wakes them --------------------------------


def proxy(*urls: str, **flags: object) -> Proxy:
    settings = RouterSettings(
        engines=",".join(urls), autoscaler_url="http://127.0.0.1:9", breaker_failures=1,
        **flags,  # type: ignore[arg-type]
    )  # fmt: skip
    pool = EnginePool(parse_engines(settings.engines), settings)
    return Proxy(settings, pool, _pipeline(settings, None), InMemoryLedger(), InMemoryLimiter())


def healthy(p: Proxy, engine_id: str, *models: str) -> None:
    """What a passing health check (and a models poll) records, and the event it sends."""
    engine = p.pool._engines[engine_id]
    engine.healthy, engine.models = True, frozenset(models)
    p._health_changed(engine_id, True)


def test_a_router_holds_while_no_healthy_engine_serves_the_model_only() -> None:
    none = proxy()
    assert none._may_hold("tiny")  # zero engines
    p = proxy("http://a:1", "http://b:1")
    assert p._may_hold("tiny")  # both still starting
    healthy(p, "http://a:1", "other")
    assert p._may_hold("tiny")  # a only serves another model; b may serve it once up
    healthy(p, "http://b:1", "tiny")
    assert not p._may_hold("tiny")
    p.pool.record_failure("http://b:1")  # its breaker opens: 503 at once, not held
    assert not p.pool.allows("http://b:1") and not p._may_hold("tiny")
    assert not proxy(hold_timeout_s=0)._may_hold("tiny")  # holding switched off


def test_an_engine_that_becomes_healthy_wakes_the_requests_it_can_take() -> None:
    p = proxy("http://a:1")
    tiny, other = p.hold.try_hold("tiny"), p.hold.try_hold("other")
    assert tiny is not None and other is not None
    p.pool._engines["http://a:1"].models = frozenset({"tiny"})  # listed before it is up
    healthy(p, "http://a:1", "tiny")
    # both go on: "other" will be told the model does not exist (404) rather than wait
    assert (tiny.state, other.state, p.hold.num_held()) == ("woken", "woken", 0)


def test_a_health_event_with_no_engine_for_the_model_wakes_nothing() -> None:
    p = proxy("http://a:1", "http://b:1")
    ticket = p.hold.try_hold("tiny")
    assert ticket is not None
    p.pool.record_failure("http://a:1")  # a's breaker is open when it comes up
    healthy(p, "http://a:1", "tiny")
    assert ticket.state == "held" and p.hold.num_held() == 1


def test_the_waker_keeps_going_after_an_unexpected_error() -> None:
    """A bug in one round (here: reading the held models raises) is logged and counted;
    the loop goes on, so requests held later still wake the autoscaler."""
    import aiohttp

    from router.wake import AutoscalerWaker

    calls: list[str] = []

    def held() -> list[str]:
        calls.append("read")
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return []

    async def scenario() -> tuple[int, bool]:
        # nothing is held after the first round, so no POST is ever sent: no server needed
        async with aiohttp.ClientSession() as session:
            waker = AutoscalerWaker("http://127.0.0.1:9", held, interval_s=0.01)
            waker.start(session)
            waker.notify()
            for _ in range(100):
                await asyncio.sleep(0.01)
                if calls:
                    break
            waker.notify()  # a later hold: the loop must still be there to take it
            for _ in range(100):
                await asyncio.sleep(0.01)
                if len(calls) >= 3:
                    break
            alive = waker._task is not None and not waker._task.done()
            await waker.close()
            return waker.num_failed, alive

    num_failed, alive = asyncio.run(scenario())
    assert num_failed == 1 and alive
    assert len(calls) >= 3  # the failed round, then the next notify's two reads
