"""The replay loop, each policy's pipeline and ``shoal autoscale simulate``, on virtual time.

Policies here are small scripted ones defined in this file, so the figures have exact
expected values; the real policies are tested in their own files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from control.autoscale.policies.base import POLICIES, register
from control.autoscale.simulate import command
from control.autoscale.simulate.pipeline import (
    ControlPipeline,
    PipelineSpec,
    RouterCounters,
    pipeline_for,
)
from control.autoscale.simulate.replicas import ReplicaConfig, ReplicaCounters
from control.autoscale.simulate.run import (
    SimulationResult,
    SimulationSpec,
    Slo,
    needed_replicas,
    simulate,
    start_delay_s,
)
from control.autoscale.simulate.traces import Trace, TraceRequest, load_trace
from control.autoscale.types import (
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    TTFT_MEAN_S,
    Decision,
    MetricTarget,
    PolicySpec,
    ReplicaSample,
    ScaleInput,
)

SPEC = PolicySpec((MetricTarget(KV_CACHE_USAGE, 0.7),), min_replicas=1, max_replicas=16)


class Scripted:
    """Desired count as a function of time; records what it was shown."""

    name: ClassVar[str] = "scripted"

    def __init__(self, script: Callable[[float], int]) -> None:
        self.script = script
        self.seen: list[ScaleInput] = []

    def decide(self, observation: ScaleInput) -> Decision:
        self.seen.append(observation)
        desired = self.script(observation.now_s)
        return Decision(desired, desired, "scripted")


class Hold:
    """Registered for the command's tests: keeps spec_replicas."""

    name: ClassVar[str] = "test-hold"

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec

    def decide(self, observation: ScaleInput) -> Decision:
        return Decision(max(1, observation.spec_replicas), None, "hold")


if "test-hold" not in POLICIES:
    register("test-hold")(Hold)


def counters(
    now: float, *, prompt: float = 0.0, kv: float = 0.5, ttft: tuple[float, int] = (0, 0)
) -> ReplicaCounters:
    return ReplicaCounters(now, kv, 2, 3, prompt, 0.0, 0, ttft[0], ttft[1])


def flat_trace(rate: float, duration: float, prompt: int = 1000, output: int = 200) -> Trace:
    gap = 1 / rate
    requests = tuple(TraceRequest(i * gap, prompt, output) for i in range(int(duration * rate)))
    return Trace("flat", requests, duration)


def run(
    trace: Trace,
    policy: Scripted,
    *,
    initial_replicas: int | None = None,
    start_delay_s: float = 38.0,
    warmup_s: float = 0.0,
) -> SimulationResult:
    spec = SimulationSpec(
        policy="scripted",
        policy_spec=SPEC,
        pipeline=PipelineSpec("direct", 2.0),
        initial_replicas=initial_replicas,
        start_delay_s=start_delay_s,
        warmup_s=warmup_s,
    )
    return simulate(trace, spec, policy)


class TestDirectPipeline:
    def test_a_round_every_interval_with_rates_from_the_previous_scrape(self) -> None:
        pipeline = ControlPipeline(PipelineSpec("direct", 2.0), random.Random(0))
        router = RouterCounters(0.0, 0, 0, 0)
        assert pipeline.step(1.0, {"a": counters(1.0)}, router, 1, 0) is None
        first = pipeline.step(
            2.0, {"a": counters(2.0, prompt=100)}, RouterCounters(2.0, 10, 3, 0), 1, 0
        )
        assert first is not None
        # the first scrape of a replica has gauges only: a rate needs two scrapes
        assert first.samples[0].values == {
            KV_CACHE_USAGE: 0.5,
            REQUESTS_WAITING: 2.0,
            "requests_running": 3.0,
        }
        assert ROUTER_ARRIVALS_PER_S not in first.router
        second = pipeline.step(
            4.0,
            {"a": counters(4.0, prompt=500, ttft=(0.9, 3))},
            RouterCounters(4.0, 30, 3, 0),
            1,
            0,
        )
        assert second is not None
        assert second.samples[0].values[PROMPT_TOKENS_PER_S] == pytest.approx(200.0)
        assert second.samples[0].values[TTFT_MEAN_S] == pytest.approx(0.3)
        assert second.router[ROUTER_ARRIVALS_PER_S] == pytest.approx(10.0)

    def test_no_first_token_in_the_interval_leaves_the_ttft_mean_unknown(self) -> None:
        pipeline = ControlPipeline(PipelineSpec("direct", 1.0), random.Random(0))
        r = RouterCounters(0.0, 0, 0, 0)
        pipeline.step(1.0, {"a": counters(1.0, ttft=(1.0, 2))}, r, 1, 0)
        second = pipeline.step(2.0, {"a": counters(2.0, ttft=(1.0, 2))}, r, 1, 0)
        assert second is not None and TTFT_MEAN_S not in second.samples[0].values

    def test_failed_scrapes_are_unknown_never_zero(self) -> None:
        pipeline = ControlPipeline(PipelineSpec("direct", 1.0, failure_rate=0.5), random.Random(3))
        r = RouterCounters(0.0, 0, 0, 0)
        samples: list[ReplicaSample] = []
        for k in range(1, 41):
            observation = pipeline.step(float(k), {"a": counters(float(k))}, r, 1, 0)
            assert observation is not None
            samples.extend(observation.samples)
        failed = [s for s in samples if not s.ok]
        assert 10 < len(failed) < 30
        assert all(s.values == {} for s in failed)


def test_pipeline_clocks_run_at_seeded_phases() -> None:
    hpa = pipeline_for("hpa", seed=1)
    assert hpa.kind == "prometheus" and hpa.interval_s == 15.0 and hpa.scrape_s == 15.0
    assert 0 <= hpa.round_phase_s < 15.0 and 0 <= hpa.scrape_phase_s < 15.0
    assert pipeline_for("hpa", seed=1) == hpa
    assert pipeline_for("hpa", seed=2) != hpa
    assert pipeline_for("kpa").kind == "direct"
    late = ControlPipeline(PipelineSpec("direct", 2.0, round_phase_s=0.5), random.Random(0))
    router = RouterCounters(0.0, 0, 0, 0)
    assert late.step(2.0, {}, router, 1, 0) is None
    assert late.step(2.5, {}, router, 1, 0) is not None


class TestPrometheusPipeline:
    SPEC = PipelineSpec("prometheus", 15.0, scrape_s=15.0, rate_window_s=60.0)

    def test_the_hpa_sees_the_last_prometheus_scrape_not_the_engine_now(self) -> None:
        pipeline = ControlPipeline(self.SPEC, random.Random(0))
        r = RouterCounters(0.0, 0, 0, 0)
        for t in (5.0, 10.0):
            assert pipeline.step(t, {"a": counters(t, kv=0.1)}, r, 1, 0) is None
        # at 15 s Prometheus scrapes (kv 0.2) and then the HPA syncs
        first = pipeline.step(15.0, {"a": counters(15.0, kv=0.2)}, r, 1, 0)
        assert first is not None
        assert first.samples[0].values[KV_CACHE_USAGE] == 0.2
        assert PROMPT_TOKENS_PER_S not in first.samples[0].values  # one scrape: no rate yet

    def test_a_replica_ready_after_the_last_scrape_is_not_seen(self) -> None:
        pipeline = ControlPipeline(
            PipelineSpec("prometheus", 15.0, scrape_s=30.0), random.Random(0)
        )
        r = RouterCounters(0.0, 0, 0, 0)
        assert pipeline.step(15.0, {"a": counters(15.0)}, r, 1, 0) is not None
        pipeline.step(30.0, {"a": counters(30.0)}, r, 2, 1)  # scrape + sync; b is starting
        observation = pipeline.step(45.0, {"a": counters(45.0), "b": counters(45.0)}, r, 2, 0)
        assert observation is not None
        # b serves since 40 s but Prometheus last scraped at 30 s: the HPA does not see it
        assert [s.replica_id for s in observation.samples] == ["a"]
        assert observation.ready_replicas == 2
        later = pipeline.step(
            60.0, {"a": counters(60.0, prompt=3000), "b": counters(60.0)}, r, 2, 0
        )
        assert later is not None
        by_id = {s.replica_id: s.values for s in later.samples}
        assert by_id["a"][PROMPT_TOKENS_PER_S] == pytest.approx(100.0)  # 3000 over 30 .. 60 s
        assert PROMPT_TOKENS_PER_S not in by_id["b"]  # one scrape of b: no rate yet

    def test_rates_cover_the_one_minute_window(self) -> None:
        pipeline = ControlPipeline(self.SPEC, random.Random(0))
        r = RouterCounters(0.0, 0, 0, 0)
        observation = None
        for k in range(
            1, 9
        ):  # scrapes at 15 .. 120 s, prompt counter 0, 100, 200, ... then a burst
            t = 15.0 * k
            prompt = 100.0 * (k - 1) + (6000.0 if k == 8 else 0.0)
            observation = pipeline.step(t, {"a": counters(t, prompt=prompt)}, r, 1, 0)
        assert observation is not None
        # rate over [60 s, 120 s]: scrapes at 60 (300) and 120 (6700): 6400 / 60
        assert observation.samples[0].values[PROMPT_TOKENS_PER_S] == pytest.approx(6400 / 60)


class TestNeeded:
    def test_needed_is_the_work_rate_over_what_a_replica_has_at_the_tpot_slo(self) -> None:
        config = ReplicaConfig()
        trace = flat_trace(10.0, 600.0)
        needed = needed_replicas(trace, config, Slo(tpot_s=0.1))
        p = config.profile
        work = (
            p.c_prefill_s * 1000
            + p.c_attn_s * 1000 * 1001 / 2
            + p.c_decode_s * 200
            + p.c_kv_s * 200 * 1100
        )
        expected = math.ceil(10.0 * work / (1 - p.c0_s / 0.1))
        assert needed[60] == expected  # t = 300 s, a full window of steady load
        assert len(needed) == 121


class TestFigures:
    def test_a_fixed_fleet_costs_its_size_times_the_trace_and_never_oscillates(self) -> None:
        trace = flat_trace(4.0, 300.0)
        result = run(trace, Scripted(lambda t: 3), initial_replicas=3)
        assert result.replica_seconds == pytest.approx(3 * 300.0)
        assert result.oscillations_per_hour == 0
        assert result.slo_attainment == 1.0
        assert result.num_requests == 1200

    def test_first_response_and_full_scaleup_time_the_step(self) -> None:
        trace = load_trace("synthetic:step:base=1,peak=12,at=100,hold=200,duration=400")
        policy = Scripted(lambda t: 1 if t < 110 else 4)
        result = run(trace, policy, initial_replicas=1, start_delay_s=30.0)
        assert result.load_step_s == 100
        assert result.first_response_s == pytest.approx(10.0)
        assert result.target_replicas <= 4
        # ready 30 s after the decision, on the next 0.25 s tick
        assert result.full_scaleup_s == pytest.approx(40.0, abs=0.5)
        # pending replicas counted in the input, and in the cost
        starting = [o for o in policy.seen if 110 < o.now_s < 140]
        assert starting and all(o.pending_replicas == 3 and o.spec_replicas == 4 for o in starting)

    def test_a_fleet_that_already_holds_the_target_responds_in_zero(self) -> None:
        trace = load_trace("synthetic:step:base=1,peak=12,at=100,hold=200,duration=400")
        result = run(trace, Scripted(lambda t: 6), initial_replicas=6)
        assert result.target_replicas < 6
        assert result.first_response_s == 0.0
        assert result.full_scaleup_s == 0.0

    def test_nothing_is_actuated_during_warm_up(self) -> None:
        trace = flat_trace(2.0, 200.0)
        policy = Scripted(lambda t: 1 if t < 30 else 5)
        result = run(trace, policy, initial_replicas=3, warmup_s=60.0, start_delay_s=10.0)
        # asked from the first round, but the fleet stays at 3 until the 60 s warm-up ends
        assert policy.seen[0].now_s == pytest.approx(2.0)
        early = [p for p in result.timeline if p.t_s < 60]
        assert early and all(p.serving == 3 and p.pending == 0 for p in early)
        assert max(p.serving for p in result.timeline) == 5
        assert result.oscillations_per_hour == 0

    def test_direction_changes_are_counted_per_hour(self) -> None:
        trace = flat_trace(2.0, 360.0)
        script = [(0, 1), (60, 3), (120, 2), (180, 4), (240, 4), (300, 1)]

        def desired(t: float) -> int:
            return [d for start, d in script if t >= start][-1]

        result = run(trace, Scripted(desired), initial_replicas=1, start_delay_s=10.0)
        # up, down, up, down: three changes of direction in 0.1 h
        assert result.oscillations_per_hour == pytest.approx(30.0)

    def test_scale_down_drains_so_no_request_is_lost(self) -> None:
        trace = flat_trace(20.0, 120.0, prompt=500, output=400)
        result = run(trace, Scripted(lambda t: 4 if t < 60 else 1), initial_replicas=4)
        assert result.slo_attainment > 0
        assert result.num_requests == 2400

    def test_an_overloaded_fleet_misses_its_slo(self) -> None:
        trace = flat_trace(30.0, 120.0)
        result = run(trace, Scripted(lambda t: 1), initial_replicas=1)
        assert result.slo_attainment < 0.3
        assert result.ttft_p99_ms > 10_000

    def test_scale_from_zero_holds_requests_until_a_replica_starts(self) -> None:
        trace = flat_trace(1.0, 60.0)
        spec = PolicySpec((MetricTarget(KV_CACHE_USAGE, 0.7),), min_replicas=0, max_replicas=4)
        policy = Scripted(lambda t: 1)
        sim_spec = SimulationSpec(
            policy="scripted",
            policy_spec=spec,
            pipeline=PipelineSpec("direct", 2.0),
            initial_replicas=0,
            start_delay_s=20.0,
        )
        result = simulate(trace, sim_spec, policy)
        # the first request waited for the start (20 s, on a 0.25 s tick), and was served
        assert 20_000 <= result.ttft_p99_ms <= 20_600
        assert result.slo_attainment == pytest.approx(39 / 60, abs=0.05)


def test_start_delay_is_engine_start_plus_the_loaders_load() -> None:
    assert start_delay_s("7b") == pytest.approx(31.0 + 13.5 / 1.89)
    assert start_delay_s("70b") > start_delay_s("7b")


class TestCommand:
    def parse(self, *argv: str) -> argparse.Namespace:
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        return parser.parse_args(list(argv))

    def test_json_has_the_figures(self, capsys: pytest.CaptureFixture[str]) -> None:
        args = self.parse(
            "--trace",
            "synthetic:step:duration=400,at=100,hold=100",
            "--policy",
            "test-hold",
            "--json",
        )
        assert command.main(args) == 0
        out = json.loads(capsys.readouterr().out)
        for key in (
            "first_response_s",
            "full_scaleup_s",
            "oscillations_per_hour",
            "replica_seconds",
            "slo_attainment",
            "ttft_p99_ms",
        ):
            assert key in out
        assert out["first_response_s"] is None  # holding never scales up
        assert out["load_step_s"] == 100

    @pytest.mark.parametrize("policy", ["kpa", "apa", "hpa", "aibrix-kpa", "shoal"])
    def test_every_policy_replays_a_step(
        self, policy: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        if policy not in POLICIES:
            import control.autoscale.policies  # noqa: F401  (registers the built ones)
        assert policy in POLICIES, f"policy {policy} is not registered"
        args = self.parse(
            "--trace", "synthetic:step:duration=420,at=120,hold=240", "--policy", policy, "--json"
        )
        assert command.main(args) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["policy"] == policy and out["load_step_s"] == 120
        assert out["first_response_s"] is not None  # every policy reacts to a 10x step
        assert 0 <= out["slo_attainment"] <= 1
        assert out["replica_seconds"] >= 420  # at least one replica all along

    def test_the_table_names_every_figure(self, capsys: pytest.CaptureFixture[str]) -> None:
        args = self.parse("--trace", "synthetic:spike:duration=200", "--policy", "test-hold")
        assert command.main(args) == 0
        out = capsys.readouterr().out
        assert "replica_seconds" in out and "slo_attainment" in out

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (("--trace", "nope.csv"), "cannot read trace"),
            (("--trace", "synthetic:step", "--policy", "nope"), "unknown autoscaling policy"),
            (("--trace", "synthetic:step", "--slo", "ttft=x"), "--slo ttft must be a number"),
            (("--trace", "synthetic:step", "--metrics", "gpu:1"), "unknown metric 'gpu'"),
            (("--trace", "synthetic:step", "--rate-scale", "0"), "rate scale"),
            (
                ("--trace", "synthetic:step", "--min-replicas", "5", "--max-replicas", "2"),
                "min_replicas",
            ),
        ],
    )
    def test_bad_input_exits_2_with_a_message(
        self,
        argv: tuple[str, ...],
        message: str,
        capsys: pytest.CaptureFixture[str],
        tmp_path: Path,
    ) -> None:
        args = self.parse(*(str(tmp_path / a) if a.endswith(".csv") else a for a in argv))
        assert command.main(args) == 2
        assert message in capsys.readouterr().err

    def test_slo_parses(self) -> None:
        assert command.parse_slo("tpot=0.05") == (1.0, 0.05)
