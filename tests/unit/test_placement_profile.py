"""The profiler's pure parts: the rate search, judging a trial, the sweep on a fake endpoint
in virtual time, the resumable state file and the AIBrix JSON it writes."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path

import pytest

from control.placement.errors import ProfileFormatError
from control.placement.formats import load_profile
from control.placement.profile import (
    CellResult,
    Measure,
    RateSearch,
    RequestRecord,
    SweepSpec,
    SweepState,
    TrialPlan,
    TrialResult,
    aibrix_profile,
    evaluate_trial,
    percentile,
    run_sweep,
    to_gpu_profile,
    write_json,
)
from control.placement.types import GpuProfile, Slos

SLOS = Slos(ttft_s=1.0, tpot_s=0.1, percentile=99)


def spec(**overrides: object) -> SweepSpec:
    values: dict[str, object] = {
        "gpu": "A100",
        "cost": 3.67,
        "model": "m",
        "in_ticks": (128, 512),
        "out_ticks": (32, 128),
        "slos": SLOS,
    }
    values.update(overrides)
    return SweepSpec(**values)  # type: ignore[arg-type]


def search_until_done(search: RateSearch, capacity: float) -> list[float]:
    """Drive ``search`` against an endpoint that passes exactly at rates <= capacity."""
    tried = []
    rate = search.next_rate()
    while rate is not None:
        tried.append(rate)
        search.record(rate, rate <= capacity)
        rate = search.next_rate()
    return tried


class TestRateSearch:
    def test_grows_by_doubling_then_bisects_geometrically_to_the_precision(self) -> None:
        search = RateSearch(1.0, min_rate=0.05, max_rate=1000.0, precision=0.05)
        tried = search_until_done(search, capacity=10.0)
        assert tried[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
        assert tried[5] == pytest.approx(math.sqrt(8 * 16))
        assert search.hi is not None and search.lo is not None
        assert search.hi / search.lo <= 1.05
        assert search.lo <= 10.0 < search.hi
        assert search.rate == search.lo and not search.capped
        assert len(tried) == 5 + 4  # 2x down to 5%: ceil(log2(ln 2 / ln 1.05)) halvings

    @pytest.mark.parametrize("capacity", [0.3, 1.0, 3.7, 55.0, 999.0])
    def test_answers_within_the_precision_below_the_capacity(self, capacity: float) -> None:
        search = RateSearch(1.0, min_rate=0.05, max_rate=1000.0, precision=0.05)
        search_until_done(search, capacity)
        assert capacity / 1.05 <= search.rate <= capacity

    def test_halves_from_a_failing_start_and_answers_zero_below_min_rate(self) -> None:
        search = RateSearch(1.0, min_rate=0.1, max_rate=10.0)
        tried = search_until_done(search, capacity=0.01)
        assert tried == [1.0, 0.5, 0.25, 0.125, 0.1]
        assert search.rate == 0.0

    def test_stops_at_max_rate_and_says_capped(self) -> None:
        search = RateSearch(1.0, min_rate=0.1, max_rate=5.0)
        tried = search_until_done(search, capacity=100.0)
        assert tried == [1.0, 2.0, 4.0, 5.0]
        assert search.rate == 5.0 and search.capped

    def test_a_fail_below_a_pass_keeps_the_pass_and_searches_just_above(self) -> None:
        search = RateSearch(4.0, min_rate=0.1, max_rate=100.0, precision=0.05)
        search.record(4.0, True)
        search.record(2.0, False)  # noise: not monotone
        assert search.rate == 4.0
        assert search.next_rate() is None  # the bracket is [4, 4.2]: within the precision


class TestJudgingATrial:
    plan = TrialPlan(rate=2.0, warmup_s=5.0, duration_s=10.0, deadline_s=30.0)

    def test_percentile_is_nearest_rank(self) -> None:
        values = [float(v) for v in range(1, 101)]
        assert percentile(values, 99) == 99.0
        assert percentile(values, 50) == 50.0
        assert percentile(values, 100) == 100.0
        assert percentile([3.0, 1.0, 2.0], 50) == 2.0
        assert percentile([1.0, math.inf], 99) == math.inf

    def test_requests_within_every_slo_and_completed_in_the_window_pass(self) -> None:
        # one request per second from 5 to 14, each 0.2 s to first token, 31 x 0.05 s decode
        records = [RequestRecord(t, t + 0.2, t + 0.2 + 31 * 0.05, 32) for t in range(5, 15)]
        result = evaluate_trial(records, self.plan, SLOS, 32)
        assert result.passed and result.reason == ""
        assert result.num_measured == 10
        assert result.ttft_s == pytest.approx(0.2)
        assert result.tpot_s == pytest.approx(0.05)
        assert result.e2e_s == pytest.approx(1.75)
        # the request arriving at 14 finishes at 15.75, after the window: 9 of 10
        assert result.throughput_ratio == pytest.approx(0.9)

    def test_a_slow_percentile_fails_and_says_which(self) -> None:
        records = [RequestRecord(t, t + 0.2, t + 1.0, 32) for t in range(5, 14)]
        records.append(RequestRecord(14.0, 16.0, 17.0, 32))  # the 99th percentile: 2 s TTFT
        result = evaluate_trial(records, self.plan, SLOS, 32)
        assert not result.passed
        assert "p99 ttft 2s > 1s" in result.reason

    def test_throughput_below_ninety_percent_of_offered_fails(self) -> None:
        # within the SLO, but half of them finish after the window (a queue building up)
        records = [RequestRecord(t, t + 0.5, t + 0.5 + 31 * 0.01, 32) for t in range(5, 15)]
        late = [RequestRecord(t + 0.5, t + 0.9, 16.0 + t / 10, 2) for t in range(5, 15)]
        result = evaluate_trial(records + late, self.plan, Slos(ttft_s=1.0), 2)
        assert not result.passed
        assert result.throughput_ratio < 0.9
        assert "throughput" in result.reason

    def test_errors_and_unfinished_requests_are_misses_and_are_reported(self) -> None:
        records = [RequestRecord(t, t + 0.1, t + 1.0, 32) for t in range(5, 15)]
        records[3] = RequestRecord(8.0, error="HTTP 500: boom")
        result = evaluate_trial(records, self.plan, SLOS, 32)
        assert not result.passed
        assert result.num_errors == 1 and result.first_error == "HTTP 500: boom"
        assert "1 of 10 requests failed (HTTP 500: boom)" in result.reason
        unfinished = [RequestRecord(t, t + 0.1) for t in range(5, 15)]
        result = evaluate_trial(unfinished, self.plan, SLOS, 32)
        assert not result.passed and "unfinished" in result.reason

    @pytest.mark.parametrize(
        ("p", "num_errors", "passed"),
        [(50, 1, True), (50, 5, True), (50, 6, False), (90, 1, True), (90, 2, False),
         (99, 1, False)],
    )  # fmt: skip
    def test_a_failed_request_is_a_miss_within_the_percentile(
        self, p: float, num_errors: int, passed: bool
    ) -> None:
        """Errors are infinite latencies: the trial passes while they fit in the (100 - p)%
        the percentile tolerates, and fails past it, also on a TPOT-only SLO over one-token
        answers, where no latency is checked at all."""
        records = [RequestRecord(t, t + 0.1, t + 0.5, 32) for t in range(5, 15)]
        for k in range(num_errors):
            records[k] = RequestRecord(5.0 + k, error="ClientOSError: reset")
        slos = Slos(ttft_s=1.0, tpot_s=0.1, percentile=p)
        result = evaluate_trial(records, self.plan, slos, 32, min_throughput_ratio=0.4)
        assert (result.passed, result.num_errors) == (passed, num_errors)
        failed = f"{num_errors} of 10 requests failed (ClientOSError: reset)"
        assert (failed in result.reason) == (not passed)
        one_token = [RequestRecord(t, t + 0.1, t + 0.1, 1) for t in range(5, 15)]
        for k in range(num_errors):
            one_token[k] = RequestRecord(5.0 + k, error="ClientOSError: reset")
        tpot_only = Slos(tpot_s=0.1, percentile=p)
        result = evaluate_trial(one_token, self.plan, tpot_only, 1, min_throughput_ratio=0.4)
        assert result.passed == passed and (failed in result.reason) == (not passed)

    def test_an_empty_window_fails(self) -> None:
        result = evaluate_trial([RequestRecord(1.0, 1.1, 1.2, 32)], self.plan, SLOS, 32)
        assert not result.passed and result.num_measured == 0

    def test_the_plan_warms_up_for_a_requests_budget_and_expects_enough_requests(self) -> None:
        sweep = spec(warmup_s=2.0, duration_s=20.0, min_requests=40)
        plan = TrialPlan.make(sweep, out_tick=128, rate=1.0)
        budget = 1.0 + 127 * 0.1  # TTFT + 127 gaps at the TPOT SLO
        assert plan.warmup_s == pytest.approx(budget)
        assert plan.duration_s == 40.0  # 40 requests at 1/s
        assert plan.deadline_s == pytest.approx(budget + 40.0 + 2 * budget)
        assert TrialPlan.make(sweep, out_tick=1, rate=10.0).warmup_s == 2.0


def virtual_endpoint(
    capacity: dict[tuple[int, int], float], calls: list[tuple[int, int, float]]
) -> Measure:
    """A fake ``Measure`` in virtual time: a trial passes at rates <= the cell's capacity."""

    async def measure(out_tick: int, in_tick: int, plan: TrialPlan) -> TrialResult:
        calls.append((out_tick, in_tick, plan.rate))
        ok = plan.rate <= capacity[(out_tick, in_tick)]
        return TrialResult(plan.rate, ok, "" if ok else "p99 tpot 1s > 0.1s", 40)

    return measure


CAPACITY = {(32, 128): 12.0, (32, 512): 6.0, (128, 128): 3.0, (128, 512): 0.01}


class TestSweep:
    def test_every_cell_gets_its_capacity_and_the_profile_loads(self) -> None:
        calls: list[tuple[int, int, float]] = []
        sweep = spec()
        cells = asyncio.run(run_sweep(sweep, virtual_endpoint(CAPACITY, calls), SweepState(sweep)))
        assert [(c.out_tick, c.in_tick) for c in cells] == [
            (32, 128),
            (32, 512),
            (128, 128),
            (128, 512),
        ]
        for cell in cells[:3]:
            capacity = CAPACITY[(cell.out_tick, cell.in_tick)]
            assert capacity / 1.05 <= cell.rate <= capacity
        assert (
            cells[3].rate == 0
        )  # 0.01/s is below min_rate and "no rate met the SLO" in cells[3].note
        profile = to_gpu_profile(sweep, cells, created=1000.0)
        assert isinstance(profile, GpuProfile)
        assert profile.tputs[1][1] == 0.0 and profile.tputs[0][0] == cells[0].rate

    def test_a_cell_starts_from_its_row_neighbours_answer(self) -> None:
        calls: list[tuple[int, int, float]] = []
        sweep = spec()
        cells = asyncio.run(run_sweep(sweep, virtual_endpoint(CAPACITY, calls), SweepState(sweep)))
        first_of: dict[tuple[int, int], float] = {}
        for out_tick, in_tick, rate in calls:
            first_of.setdefault((out_tick, in_tick), rate)
        assert first_of[(32, 128)] == sweep.start_rate  # a row's first cell: the flag
        assert first_of[(32, 512)] == cells[0].rate  # then its left neighbour's answer
        assert first_of[(128, 128)] == sweep.start_rate
        assert first_of[(128, 512)] == cells[2].rate
        second = [rate for o, i, rate in calls if (o, i) == (32, 512)]
        assert second[:2] == [cells[0].rate, cells[0].rate / 2]  # fails, halves, passes

    def test_a_cell_whose_requests_are_all_refused_ends_at_once(self) -> None:
        calls: list[int] = []

        async def refuses_long_prompts(out_tick: int, in_tick: int, plan: TrialPlan) -> TrialResult:
            calls.append(in_tick)
            if in_tick < 512:
                return TrialResult(plan.rate, plan.rate <= 5.0, "", 40)
            records = [
                RequestRecord(t, error="HTTP 400: prompt too long", refused=True)
                for t in range(5, 15)
            ]
            return evaluate_trial(records, plan, SLOS, out_tick)

        sweep = spec(out_ticks=(32,), warmup_s=5.0, duration_s=10.0)
        cells = asyncio.run(run_sweep(sweep, refuses_long_prompts, SweepState(sweep)))
        assert calls.count(512) == 1
        assert cells[1].rate == 0.0
        assert cells[1].note == "the endpoint refused these requests: HTTP 400: prompt too long"

    def test_a_rerun_skips_finished_cells_and_a_killed_run_keeps_them(self, tmp_path: Path) -> None:
        path = tmp_path / "sweep.state.json"
        sweep = spec()
        calls: list[tuple[int, int, float]] = []
        endpoint = virtual_endpoint(CAPACITY, calls)

        async def dies_in_the_third_cell(
            out_tick: int, in_tick: int, plan: TrialPlan
        ) -> TrialResult:
            if (out_tick, in_tick) == (128, 128):
                raise KeyboardInterrupt  # Ctrl-C mid-trial
            return await endpoint(out_tick, in_tick, plan)

        with pytest.raises(KeyboardInterrupt):
            asyncio.run(run_sweep(sweep, dies_in_the_third_cell, SweepState(sweep, path)))
        saved = json.loads(path.read_text())
        assert [(c["out_tick"], c["in_tick"]) for c in saved["cells"]] == [(32, 128), (32, 512)]
        assert not list(tmp_path.glob(".sweep.state.json.*"))  # no temporary file left

        calls.clear()
        resumed: list[tuple[int, int]] = []
        cells = asyncio.run(
            run_sweep(
                sweep,
                endpoint,
                SweepState(sweep, path),
                on_cell=lambda c, was_saved: (
                    resumed.append((c.out_tick, c.in_tick)) if was_saved else None
                ),
            )
        )
        assert resumed == [(32, 128), (32, 512)]
        assert {(o, i) for o, i, _ in calls} == {(128, 128), (128, 512)}  # only the rest measured
        assert cells[0].rate == CellResult.from_json(saved["cells"][0]).rate
        assert len(json.loads(path.read_text())["cells"]) == 4

    def test_a_state_from_other_settings_is_refused_naming_them(self, tmp_path: Path) -> None:
        path = tmp_path / "s.json"
        sweep = spec()
        asyncio.run(run_sweep(sweep, virtual_endpoint(CAPACITY, []), SweepState(sweep, path)))
        other = spec(slos=Slos(ttft_s=0.5, tpot_s=0.1, percentile=99))
        with pytest.raises(ProfileFormatError, match=r"other settings \(slos: .*ttft_s.*0\.5"):
            SweepState(other, path)
        # the grid and the cost are not settings: a larger grid reuses matching cells
        bigger = spec(in_ticks=(128, 512, 2048), cost=1.0)
        assert len(SweepState(bigger, path).cells) == 4

    def test_a_corrupt_state_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "s.json"
        path.write_text("{not json")
        with pytest.raises(ProfileFormatError, match="is not JSON"):
            SweepState(spec(), path)

    def test_bad_settings_are_refused(self) -> None:
        with pytest.raises(ProfileFormatError, match="at least one SLO"):
            spec(slos=Slos())
        with pytest.raises(ProfileFormatError, match="strictly increasing"):
            spec(in_ticks=(512, 128))
        with pytest.raises(ProfileFormatError, match="min_rate <= start_rate"):
            spec(start_rate=2000.0)


class VirtualTtftEndpoint:
    """A fake endpoint in virtual time for a TTFT-only SLO and long outputs: a request
    lives ``alone_s`` alone and ``loaded_s`` under load; a trial warmed up for less than
    ``loaded_s`` fails the completion rule (its window's completions lag its arrivals)
    whatever the rate; otherwise it passes at rates <= ``capacity``."""

    def __init__(self, capacity: float, alone_s: float = 30.0, loaded_s: float = 45.0) -> None:
        self.capacity, self.alone_s, self.loaded_s = capacity, alone_s, loaded_s
        self.plans: list[TrialPlan] = []
        self.num_probes = 0
        self.elapsed_s = 0.0  # endpoint seconds the sweep took

    async def probe(self, out_tick: int, in_tick: int) -> float | None:
        self.num_probes += 1
        self.elapsed_s += self.alone_s
        return self.alone_s

    async def measure(self, out_tick: int, in_tick: int, plan: TrialPlan) -> TrialResult:
        self.plans.append(plan)
        self.elapsed_s += plan.warmup_s + plan.duration_s
        if plan.warmup_s < self.loaded_s:
            return TrialResult(plan.rate, False, "throughput 60% of offered < 90%", 40,
                               ttft_s=0.2, mean_e2e_s=self.loaded_s, throughput_ratio=0.6)  # fmt: skip
        if plan.rate <= self.capacity:
            return TrialResult(plan.rate, True, "", 40, ttft_s=0.2, mean_e2e_s=self.loaded_s,
                               throughput_ratio=1.0)  # fmt: skip
        return TrialResult(plan.rate, False, "p50 ttft 5s > 1s", 40, ttft_s=5.0,
                           mean_e2e_s=60.0, throughput_ratio=0.8)  # fmt: skip


class TestLifetimes:
    ttft_only = Slos(ttft_s=1.0, percentile=50)

    def sweep(self, **overrides: object) -> SweepSpec:
        return spec(slos=self.ttft_only, out_ticks=(512,), in_ticks=(128,), **overrides)

    def test_a_probed_lifetime_warms_every_trial_up_for_long_outputs(self) -> None:
        endpoint = VirtualTtftEndpoint(capacity=3.0)
        sweep = self.sweep()
        (cell,) = asyncio.run(
            run_sweep(sweep, endpoint.measure, SweepState(sweep), probe=endpoint.probe)
        )
        assert endpoint.num_probes == 1
        assert all(p.warmup_s == 60.0 for p in endpoint.plans)  # twice the lone 30 s
        assert all(p.deadline_s == p.warmup_s + p.duration_s + 120.0 for p in endpoint.plans)
        rates = [p.rate for p in endpoint.plans]
        assert len(set(rates)) == len(rates)  # no trial repeated
        assert 3.0 / 1.05 <= cell.rate <= 3.0

    def test_without_a_probe_a_trial_that_judged_its_warmup_is_measured_again(self) -> None:
        endpoint = VirtualTtftEndpoint(capacity=3.0)
        sweep = self.sweep()
        (cell,) = asyncio.run(run_sweep(sweep, endpoint.measure, SweepState(sweep)))
        first, second, *rest = endpoint.plans
        assert (first.rate, first.warmup_s) == (1.0, 5.0)  # the TTFT budget only: too short
        assert (second.rate, second.warmup_s) == (1.0, 90.0)  # twice the trial's mean e2e
        assert all(p.warmup_s == 90.0 for p in rest)
        assert 3.0 / 1.05 <= cell.rate <= 3.0  # was 0: every rate failed the 90% rule
        assert [t.passed for t in cell.trials[:2]] == [False, True]

    def test_the_search_stops_halving_once_a_trial_misses_the_slo_while_idle(self) -> None:
        plans: list[TrialPlan] = []
        elapsed = [0.0]

        async def never_fast_enough(out_tick: int, in_tick: int, plan: TrialPlan) -> TrialResult:
            plans.append(plan)
            elapsed[0] += plan.deadline_s
            return TrialResult(plan.rate, False, "p99 ttft 0.5s > 0.1s", 40, ttft_s=0.5,
                               mean_e2e_s=1.0, throughput_ratio=1.0)  # fmt: skip

        sweep = spec(slos=Slos(ttft_s=0.1, e2e_s=5.0), out_ticks=(32,), in_ticks=(128,))
        (cell,) = asyncio.run(run_sweep(sweep, never_fast_enough, SweepState(sweep)))
        # 1/s x 1 s = 1 in flight, 0.5, then 0.25: idle, and still missing: the cell is 0
        assert [p.rate for p in plans] == [1.0, 0.5, 0.25]
        assert cell.rate == 0.0 and "no rate met the SLO" in cell.note
        assert elapsed[0] <= 5 * 60  # endpoint seconds, at the deadlines; was 2,100: 40 s
        # at 1/s doubling to 800 s at 0.05/s, six trials

    def test_a_completion_shortfall_alone_at_low_load_keeps_halving(self) -> None:
        plans: list[TrialPlan] = []

        async def few_requests(out_tick: int, in_tick: int, plan: TrialPlan) -> TrialResult:
            plans.append(plan)
            ok = plan.rate <= 0.1
            return TrialResult(plan.rate, ok, "" if ok else "throughput 85% of offered < 90%",
                               20, ttft_s=0.05, mean_e2e_s=1.0, throughput_ratio=0.85)  # fmt: skip

        sweep = spec(slos=Slos(ttft_s=0.1, e2e_s=5.0), out_ticks=(32,), in_ticks=(128,))
        (cell,) = asyncio.run(run_sweep(sweep, few_requests, SweepState(sweep)))
        assert [p.rate for p in plans][:5] == [1.0, 0.5, 0.25, 0.125, 0.0625]
        assert cell.rate > 0

    def test_a_trials_window_is_capped_at_four_durations(self) -> None:
        sweep = spec(duration_s=20.0, min_requests=40)
        assert TrialPlan.make(sweep, out_tick=32, rate=0.05).duration_s == 80.0  # not 800
        assert TrialPlan.make(sweep, out_tick=32, rate=1.0).duration_s == 40.0
        assert TrialPlan.make(sweep, out_tick=32, rate=10.0).duration_s == 20.0
        longer = TrialPlan.make(sweep, out_tick=32, rate=1.0, lifetime_s=30.0)
        assert (longer.warmup_s, longer.deadline_s) == (30.0, 30.0 + 40.0 + 60.0)
        shorter = TrialPlan.make(sweep, out_tick=128, rate=1.0, lifetime_s=1.0)
        assert shorter.warmup_s == pytest.approx(1.0 + 127 * 0.1)  # the SLO's budget wins


def test_the_aibrix_json_has_their_fields_on_our_ticks() -> None:
    sweep = spec(slos=Slos(ttft_s=1.0, tpot_s=0.1, percentile=99))
    trial = TrialResult(
        4.0, True, "", 40, ttft_s=0.3, tpot_s=0.05, e2e_s=2.0, mean_e2e_s=1.5, mean_ttft_s=0.2
    )
    cells = [
        CellResult(32, 128, 4.0, (trial,)),
        CellResult(32, 512, 2.0),
        CellResult(128, 128, 0.0),
    ]
    data = aibrix_profile(to_gpu_profile(sweep, cells, created=1700000000.0), cells)
    assert data == {
        "gpu": "A100",
        "cost": 3.67,
        "tputs": [[4.0, 2.0], [0.0, 0.0]],
        "indexes": [[32, 128], [128, 512]],
        "created": 1700000000.0,
        "e2e": [[1.5, 0.0], [0.0, 0.0]],
        "ttft": [[0.2, 0.0], [0.0, 0.0]],  # the mean, as AIBrix's (not the p99 0.3)
        "slos": {"percentile": 99, "ttft": 1.0, "tpot": 0.1},
    }
    json.dumps(data)  # plain JSON: no inf, no tuples


# AIBrix's readers of a profile, at vllm-project/aibrix commit cf64e51ba23f (v0.4.0, "SLO-aware
# router with profile support"; unchanged through e3e10f9e4aeb): the Go ModelGPUProfile and
# ModelSLOs json tags in pkg/cache/model_gpu_profile.go, and the optimizer's GPUProfile
# fields in python/aibrix/aibrix/gpu_optimizer/optimizer/types.py (read by
# load_monitor/profile_reader.py's FileProfileReader as GPUProfile(**profile)).
AIBRIX_GO_PROFILE_KEYS = {"gpu", "cost", "tputs", "indexes", "created", "e2e", "ttft", "tpot",
                          "slos"}  # fmt: skip
AIBRIX_GO_SLO_KEYS = {"percentile", "tput", "tt", "e2e", "ttft", "tpat", "tpot"}
AIBRIX_PY_PROFILE_FIELDS = {"gpu", "cost", "tputs", "indexes", "created"}


@pytest.mark.parametrize("percentile", [99.0, 50, 90.0])
def test_the_written_profile_stays_inside_aibrixs_schema(percentile: float) -> None:
    """Every key we write is one AIBrix's readers declare (no "model": Go's and v0.4's
    Python readers would drop it, v0.2-v0.3's GPUProfile dataclass would refuse it), with
    the types they decode: slos.percentile an int (Go's ``int``; 99.0 would not decode),
    matrices of numbers on [out][in]."""
    sweep = spec(slos=Slos(ttft_s=1.0, tpot_s=0.1, e2e_s=30.0, percentile=percentile))
    trial = TrialResult(4.0, True, "", 40, mean_e2e_s=1.5, mean_ttft_s=0.2)
    cells = [CellResult(32, 128, 4.0, (trial,))]
    data = json.loads(json.dumps(aibrix_profile(to_gpu_profile(sweep, cells, 1.0), cells)))
    assert set(data) <= AIBRIX_GO_PROFILE_KEYS
    assert set(data) >= AIBRIX_PY_PROFILE_FIELDS  # what the optimizer itself uses
    assert set(data["slos"]) <= AIBRIX_GO_SLO_KEYS
    assert data["slos"]["percentile"] == percentile
    assert type(data["slos"]["percentile"]) is int
    for key in ("tputs", "e2e", "ttft"):
        assert len(data[key]) == 2 and all(len(row) == 2 for row in data[key])
    fractional = spec(slos=Slos(e2e_s=5.0, percentile=99.9))
    written = aibrix_profile(to_gpu_profile(fractional, []))
    assert written["slos"]["percentile"] == 99.9  # not an integer: kept as it is


def test_the_written_profile_loads_back_through_formats(tmp_path: Path) -> None:
    sweep = spec()
    cells = [CellResult(32, 128, 4.0), CellResult(32, 512, 2.5), CellResult(128, 128, 1.25)]
    profile = to_gpu_profile(sweep, cells, created=1700000000.0)
    path = tmp_path / "A100.json"
    write_json(path, aibrix_profile(profile, cells))
    assert profile.model == "m"
    assert load_profile(path) == dataclasses.replace(profile, model="")  # not written


def test_settings_layer_flags_over_environment_over_file(tmp_path: Path) -> None:
    from control.placement.profile_cli import ProfileSettings
    from shoal.config import load_config
    from shoal.errors import ConfigError

    config = tmp_path / "shoal.toml"
    config.write_text(
        '[profile]\nurl = "http://file"\ngpu = "A10G"\ncost = "1.01"\n'
        'input_ticks = "128,512"\noutput_ticks = "32"\nout = "A10G.json"\ntpot_slo_s = 0.2\n'
    )
    settings = load_config(
        ProfileSettings,
        "profile",
        flags={"tpot_slo_s": "0.1", "config": str(config)},
        environ={"SHOAL_PROFILE_URL": "http://env", "SHOAL_PROFILE_TTFT_SLO_S": "1.5"},
    )
    assert settings.url == "http://env"
    made = settings.spec("m")
    assert made.slos == Slos(ttft_s=1.5, tpot_s=0.1, e2e_s=None, percentile=99.0)
    assert (made.gpu, made.cost, made.in_ticks, made.out_ticks) == ("A10G", 1.01, (128, 512), (32,))
    with pytest.raises(ConfigError, match="needs --out"):
        load_config(ProfileSettings, "profile", flags={"url": "u", "gpu": "g", "cost": "1",
                    "input_ticks": "1", "output_ticks": "1"}, environ={})  # fmt: skip
