"""The control loop on virtual time with the memory actuator: the decision flow, errors that
hold, dry runs and wakes. The policy is a tiny proportional one (the real policies have their
own tests); the metrics come from a scripted source, not sockets."""

from __future__ import annotations

import asyncio
import io
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar
from unittest import mock

import pytest

from control.autoscale.actuators.memory import MemoryActuator
from control.autoscale.controller import Controller
from control.autoscale.errors import ActuatorError, WrongModel
from control.autoscale.policies.base import clamp
from control.autoscale.types import (
    REQUESTS_WAITING,
    Decision,
    PolicySpec,
    ReplicaSample,
    ScaleInput,
)


class Proportional:
    """desired = ceil(total waiting / 4); unknown holds at spec."""

    name: ClassVar[str] = "proportional"

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.seen: list[ScaleInput] = []

    def decide(self, observation: ScaleInput) -> Decision:
        self.seen.append(observation)
        total = observation.total(REQUESTS_WAITING)
        if total is None:
            return Decision(observation.spec_replicas, None, "unknown: hold")
        recommendation = math.ceil(total / 4)
        desired, bound = clamp(recommendation, self.spec)
        return Decision(desired, recommendation, f"waiting {total}", bounds=bound)


class ScriptedSource:
    """Each endpoint reports ``waiting[url]``; a URL in ``failing`` fails its scrape."""

    def __init__(self) -> None:
        self.waiting: dict[str, float] = {}
        self.failing: set[str] = set()
        self.router: dict[str, float] = {}
        self.num_failures = 0
        self.scraped: list[tuple[str, ...]] = []

    async def scrape(self, endpoints: Iterable[str]) -> tuple[ReplicaSample, ...]:
        urls = tuple(endpoints)
        self.scraped.append(urls)
        samples = []
        for url in urls:
            if url in self.failing:
                self.num_failures += 1
                samples.append(ReplicaSample(url, {}, ok=False))
            else:
                samples.append(ReplicaSample(url, {REQUESTS_WAITING: self.waiting.get(url, 0.0)}))
        return tuple(samples)

    async def scrape_router(self) -> dict[str, float]:
        return dict(self.router)

    async def close(self) -> None:
        return None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


@dataclass
class Rig:
    controller: Controller
    actuator: MemoryActuator
    source: ScriptedSource
    clock: Clock
    policy: Proportional
    out: io.StringIO


def build(
    replicas: int = 1,
    *,
    start_delay_s: float = 0.0,
    dry_run: bool = False,
    min_replicas: int = 1,
    model: str = "",
) -> Rig:
    clock = Clock()
    actuator = MemoryActuator(
        replicas, start_delay_s=start_delay_s, clock=clock, endpoint_for=lambda n: f"http://r{n}"
    )
    source = ScriptedSource()
    policy = Proportional(PolicySpec(targets=(), min_replicas=min_replicas, max_replicas=5))
    out = io.StringIO()
    controller = Controller(
        policy, actuator, source, interval_s=2.0, min_replicas=min_replicas, dry_run=dry_run,
        model=model, clock=clock, sleep=clock.sleep, out=out,
    )  # fmt: skip
    return Rig(controller, actuator, source, clock, policy, out)


def test_a_round_scrapes_ready_endpoints_decides_and_scales() -> None:
    rig = build(2)
    rig.source.waiting = {"http://r0": 6, "http://r1": 6}
    record = asyncio.run(rig.controller.run_round())
    assert rig.source.scraped == [("http://r0", "http://r1")]
    assert rig.policy.seen[0].spec_replicas == 2 and rig.policy.seen[0].ready_replicas == 2
    assert record.decision is not None and record.decision.desired == 3
    assert record.scaled and rig.actuator.scale_calls == [3]


def test_pending_replicas_reach_the_policy_and_are_not_scraped() -> None:
    rig = build(1, start_delay_s=10.0)
    rig.source.waiting = {"http://r0": 12}
    asyncio.run(rig.controller.run_round())  # asks for 3: two start, pending for 10 s
    rig.clock.now = 5.0
    asyncio.run(rig.controller.run_round())
    assert rig.policy.seen[1].ready_replicas == 1 and rig.policy.seen[1].pending_replicas == 2
    assert rig.source.scraped[1] == ("http://r0",)
    assert rig.actuator.scale_calls == [3]  # same desired again: no second scale call
    rig.clock.now = 10.0
    asyncio.run(rig.controller.run_round())
    assert rig.source.scraped[2] == ("http://r0", "http://r1", "http://r2")


def test_unchanged_desired_does_not_call_scale() -> None:
    rig = build(2)
    rig.source.waiting = {"http://r0": 4, "http://r1": 4}
    record = asyncio.run(rig.controller.run_round())
    assert record.decision is not None and record.decision.desired == 2
    assert not record.scaled and rig.actuator.scale_calls == []


def test_failed_scrapes_are_unknown_and_hold() -> None:
    rig = build(2)
    rig.source.failing = {"http://r0", "http://r1"}
    record = asyncio.run(rig.controller.run_round())
    assert record.decision is not None and record.decision.recommendation is None
    assert record.decision.desired == 2 and rig.actuator.scale_calls == []
    assert record.num_failed_scrapes == 2
    assert b"shoal_autoscale_scrape_failures_total 2.0" in rig.controller.metrics.render()


def test_actuator_errors_are_logged_counted_and_the_loop_goes_on() -> None:
    rig = build(1)
    rig.source.waiting = {"http://r0": 12}
    rig.actuator.fail_next = 1  # state() fails: the round holds without a decision
    held = asyncio.run(rig.controller.run_round())
    assert held.decision is None and held.error.startswith("state:")
    rig.actuator.fail_next = 0
    original = rig.actuator.scale

    async def failing_scale(desired: int) -> None:
        raise ActuatorError("409")

    rig.actuator.scale = failing_scale  # type: ignore[method-assign]
    record = asyncio.run(rig.controller.run_round())
    assert record.decision is not None and record.decision.desired == 3
    assert not record.scaled and record.error == "scale: 409"
    rig.actuator.scale = original  # type: ignore[method-assign]
    assert asyncio.run(rig.controller.run_round()).scaled
    assert rig.actuator.scale_calls == [3]
    assert b"shoal_autoscale_actuator_errors_total 2.0" in rig.controller.metrics.render()


def test_dry_run_prints_decisions_and_never_scales() -> None:
    rig = build(1, dry_run=True)
    rig.source.waiting = {"http://r0": 20}
    asyncio.run(rig.controller.run_round())
    assert rig.actuator.scale_calls == []
    line = json.loads(rig.out.getvalue().splitlines()[0])
    assert line["desired"] == 5 and line["recommendation"] == 5 and line["dry_run"] is True
    assert line["ready"] == 1 and line["scaled"] is False


def test_run_rounds_every_interval_until_stopped() -> None:
    rig = build(1)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(rig.controller.run(stop))
        while len(rig.policy.seen) < 3:
            await asyncio.sleep(0)
        stop.set()
        await task

    asyncio.run(main())
    assert [o.now_s for o in rig.policy.seen[:3]] == [0.0, 2.0, 4.0]


def test_wake_scales_from_zero_at_once_and_only_from_zero() -> None:
    rig = build(0, min_replicas=0)
    assert asyncio.run(rig.controller.wake("m")) == 1
    assert rig.actuator.scale_calls == [1]
    rig.clock.now += 2.0  # past one interval: the state is read again
    assert asyncio.run(rig.controller.wake("m")) == 1  # one is pending: nothing more
    assert rig.actuator.scale_calls == [1]
    text = rig.controller.metrics.render()
    assert b'shoal_autoscale_wakes_total{result="scaled"} 1.0' in text
    assert b'shoal_autoscale_wakes_total{result="already"} 1.0' in text


def test_wake_in_a_dry_run_scales_nothing() -> None:
    rig = build(0, min_replicas=0, dry_run=True)
    assert asyncio.run(rig.controller.wake("m")) == 1
    assert rig.actuator.scale_calls == []


def test_metrics_and_status_follow_the_last_round() -> None:
    rig = build(1)
    rig.source.waiting = {"http://r0": 8}
    asyncio.run(rig.controller.run_round())
    text = rig.controller.metrics.render().decode()
    assert "shoal_autoscale_desired_replicas 2.0" in text
    assert 'shoal_autoscale_decisions_total{direction="up"} 1.0' in text
    status = rig.controller.status()
    assert status["replicas"] == {"spec": 1, "ready": 1, "pending": 0}
    assert status["decisions"][-1]["decision"]["desired"] == 2
    json.dumps(status)  # serialisable as /status sends it


def test_a_fresh_target_below_min_replicas_is_started_though_the_policy_holds() -> None:
    rig = build(0, min_replicas=1)  # nothing ready: every metric unknown, the policy holds at 0
    record = asyncio.run(rig.controller.run_round())
    assert record.decision is not None and record.decision.recommendation is None
    assert record.decision.desired == 1 and record.decision.bounds == "min-replicas"
    assert rig.actuator.scale_calls == [1]


def test_the_status_table_shows_each_round_and_unknown_as_a_dash() -> None:
    from control.autoscale.status import render

    rig = build(1)
    rig.source.failing = {"http://r0"}
    asyncio.run(rig.controller.run_round())  # unknown: held
    rig.source.failing = set()
    rig.source.waiting = {"http://r0": 8}
    asyncio.run(rig.controller.run_round())
    lines = render(rig.controller.status())
    assert lines[1] == "replicas: spec 1  ready 1  pending 0"  # as the last round read them
    held, scaled = (line.split() for line in lines[-2:])
    assert held[:5] == ["0.0", "1", "0", "-", "1"]
    assert scaled[:5] == ["0.0", "1", "0", "2", "2"]


class Counting(MemoryActuator):
    """Counts state() calls; ``gate`` (when set) holds state() until it is set."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state_calls = 0
        self.gate: asyncio.Event | None = None

    async def state(self):  # type: ignore[no-untyped-def]
        self.state_calls += 1
        if self.gate is not None:
            await self.gate.wait()
        return await super().state()


def counting_rig(replicas: int, *, model: str = "") -> tuple[Controller, Counting, Clock]:
    clock = Clock()
    actuator = Counting(replicas, clock=clock, endpoint_for=lambda n: f"http://r{n}")
    policy = Proportional(PolicySpec(targets=(), min_replicas=0, max_replicas=5))
    controller = Controller(
        policy, actuator, ScriptedSource(), interval_s=2.0, min_replicas=0, model=model,
        clock=clock, sleep=clock.sleep,
    )  # fmt: skip
    return controller, actuator, clock


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_policy_that_raises_holds_the_round_and_the_loop_goes_on(bad: float) -> None:
    rig = build(2)
    rig.source.waiting = {"http://r0": bad, "http://r1": 1}  # Proportional: math.ceil raises
    record = asyncio.run(rig.controller.run_round())
    assert record.decision is not None and record.decision.desired == 2
    assert record.error.startswith("policy: ") and not record.scaled
    assert b"shoal_autoscale_policy_errors_total 1.0" in rig.controller.metrics.render()
    rig.source.waiting = {"http://r0": 12, "http://r1": 0}
    assert asyncio.run(rig.controller.run_round()).scaled
    assert rig.actuator.scale_calls == [3]


def test_a_policy_error_below_min_replicas_still_starts_the_first_replica() -> None:
    rig = build(0, min_replicas=1)
    with mock.patch.object(rig.policy, "decide", side_effect=RuntimeError("bug")):
        record = asyncio.run(rig.controller.run_round())
    assert record.scaled and rig.actuator.scale_calls == [1]
    assert record.error == "policy: RuntimeError: bug"


def test_a_wake_for_another_model_never_touches_the_actuator() -> None:
    controller, actuator, _ = counting_rig(0, model="m")
    with pytest.raises(WrongModel, match="scales model m"):
        asyncio.run(controller.wake("made-up"))
    assert actuator.state_calls == 0 and actuator.scale_calls == []
    assert asyncio.run(controller.wake("m")) == 1
    assert asyncio.run(controller.wake("")) == 1  # no model named: not refused
    text = controller.metrics.render()
    assert b'shoal_autoscale_wakes_total{result="wrong-model"} 1.0' in text


def test_a_wake_within_an_interval_of_the_last_state_read_answers_from_it() -> None:
    controller, actuator, clock = counting_rig(1)
    asyncio.run(controller.run_round())
    assert actuator.state_calls == 1
    clock.now += 1.5
    assert asyncio.run(controller.wake("m")) == 1
    assert actuator.state_calls == 1
    assert b'shoal_autoscale_wakes_total{result="cached"} 1.0' in controller.metrics.render()
    clock.now += 0.5
    assert asyncio.run(controller.wake("m")) == 1
    assert actuator.state_calls == 2


def test_concurrent_wakes_share_one_in_flight_call() -> None:
    controller, actuator, _ = counting_rig(0)

    async def main() -> list[int]:
        actuator.gate = asyncio.Event()
        wakes = [asyncio.create_task(controller.wake(f"m{i}")) for i in range(50)]
        while actuator.state_calls == 0:
            await asyncio.sleep(0)
        for _ in range(5):
            await asyncio.sleep(0)
        assert actuator.state_calls == 1  # the other 49 wait on the same call, not the lock
        actuator.gate.set()
        return list(await asyncio.gather(*wakes))

    assert asyncio.run(main()) == [1] * 50
    assert actuator.state_calls == 1 and actuator.scale_calls == [1]
