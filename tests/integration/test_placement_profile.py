"""``shoal profile`` against a simulated engine process: it finds the engine's capacity.

Ground truth comes from the simulator's own scheduler (``sim.scheduler``) driven on
virtual time with the same step profile, no sockets: Poisson arrivals over 200 simulated
seconds per rate, each request schedulable ``c_request`` after it arrives and steps
chained back to back as ``sim.engine`` runs them; the capacity is the highest rate (bisected
to 0.5%) whose median TPOT over the window meets the SLO with >= 90% of the arrivals
completed in it. ``control.autoscale.capacity`` is not used: it models mean latencies to
~20-30%, too loose for a 10% check.

Why these numbers: the cell (256-token prompts, 16 output tokens) binds on TPOT (others'
prefills landing in a request's decode steps), which a client measures over 15 token gaps,
so the 1-3 ms of HTTP and scheduling jitter per request on a busy 2-core machine (times
``time_scale``) moves it by well under the SLO's 150 ms; the TTFT SLO is loose for the same
reason. ``time_scale`` 5 keeps steps (20+ ms simulated) 4+ ms of wall time, above the
simulator's timer resolution, and the load at capacity near 60 requests (1,000 streamed
chunks) per wall second, which one core serves (the engine falls behind its model by 1-1.5%
of its step time). Measured once on
this machine: the same sweep at time scale 2 (113 s), 5 (46 s) and 10 (24 s) found the same
rate, 12.34/s; at 10 the engine lagged 2.3% of its step time and the median TTFT at low
load read 40 ms longer, the start of the HTTP layer showing through. The median is used
because a trial of ~250 requests pins it down to a few percent, where the 99th percentile
of 250 requests is their third slowest (a unit test checks the percentile arithmetic). A
second cell asks for prompts beyond the engine's ``max_model_len``: every request is
refused, and the cell is 0 after one trial, saying why.

On a busy machine (2 cores shared with other test runs): the sweep took 46 s here, the
limit on it is 300 s, a hang guard only (it is killed, and the engine stopped, past it).
The engine's lag behind its model (``shoal_sim_lag_seconds_total``) matters only through
the capacity it lowers, so it is not a check of its own: the capacity must be within 10%;
when it is not and the engine lagged more than 5% of its step time, the machine could not
run the model in real time and the test skips naming the lag (a profiler bug shows as a
miss with the engine keeping up, and fails). The lag is printed either way.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from control.placement.loadgen import HttpLoad
from control.placement.types import Slos
from sim.process import running_sim_engine
from sim.profile import StepProfile
from sim.scheduler import Request, Scheduler, SchedulerConfig
from tests.integration.conftest import ENV, free_port

pytestmark = pytest.mark.integration

PROFILE = StepProfile(c0_s=0.02, c_prefill_s=2e-4, c_decode_s=1e-3, c_kv_s=0.0, c_request_s=0.005)
LIMITS = SchedulerConfig(num_gpu_blocks=8192, block_size=16, max_num_batched_tokens=2048)
IN_TICK, OUT_TICK = 256, 16
SLOS = Slos(ttft_s=2.0, tpot_s=0.15, percentile=50)
TIME_SCALE = 5.0
MAX_MODEL_LEN = 1024
TOO_LONG = 2048  # a second cell whose prompts the engine refuses (> max_model_len)


def _virtual_latencies(rate: float, seconds: float, warmup: float) -> tuple[list[float], float]:
    """(TPOT of each request arriving after ``warmup``, share of them completed within the
    window) for Poisson arrivals at ``rate`` on the scheduler in virtual time."""
    rng = random.Random(7)
    arrivals: list[float] = []
    t = rng.expovariate(rate)
    while t < warmup + seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    requests = [
        Request(f"r{k}", [rng.randrange(100, 8000) for _ in range(IN_TICK)], OUT_TICK, a)
        for k, a in enumerate(arrivals)
    ]
    scheduler = Scheduler(LIMITS)
    first: dict[int, float] = {}
    finish: dict[int, float] = {}
    now, admitted = 0.0, 0
    while admitted < len(requests) or scheduler.has_work:
        while admitted < len(requests) and arrivals[admitted] + PROFILE.c_request_s <= now:
            scheduler.add(requests[admitted])
            admitted += 1
        if not scheduler.has_work:
            now = arrivals[admitted] + PROFILE.c_request_s
            continue
        plan = scheduler.schedule()
        now += PROFILE.step_s(plan.shape)
        result = scheduler.update(plan, now)
        for request, _ in result.sampled:
            first.setdefault(id(request), now)
        for request in result.finished:
            finish[id(request)] = now
    measured = [r for r in requests if r.arrival_s >= warmup]
    tpots = [(finish[id(r)] - first[id(r)]) / (OUT_TICK - 1) for r in measured]
    done = sum(1 for r in requests if warmup <= finish[id(r)] < warmup + seconds)
    return tpots, done / len(measured)


def _meets_slo(rate: float) -> bool:
    tpots, completed = _virtual_latencies(rate, seconds=200.0, warmup=20.0)
    median = sorted(tpots)[math.ceil(0.5 * len(tpots)) - 1]
    assert SLOS.tpot_s is not None
    return median <= SLOS.tpot_s and completed >= 0.9


def _ground_truth() -> float:
    """Arithmetic bisection on [1, 32] req/s (not the profiler's geometric grid) to 0.5%."""
    low, high = 1.0, 32.0
    assert _meets_slo(low) and not _meets_slo(high), "the capacity is inside the bracket"
    while high / low > 1.005:
        middle = (low + high) / 2
        low, high = (middle, high) if _meets_slo(middle) else (low, middle)
    return low


def _profile_command(url: str, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shoal",
        "profile",
        "--url",
        url,
        "--gpu",
        "SIM",
        "--cost",
        "1.5",
        "--input-ticks",
        f"{IN_TICK},{TOO_LONG}",
        "--output-ticks",
        str(OUT_TICK),
        "--ttft-slo-s",
        str(SLOS.ttft_s),
        "--tpot-slo-s",
        str(SLOS.tpot_s),
        "--percentile",
        str(SLOS.percentile),
        "--out",
        str(out),
        "--time-scale",
        str(TIME_SCALE),
        "--start-rate",
        "4",
        "--json",
        *extra,
    ]


def test_the_profiler_finds_a_simulated_engines_capacity_within_ten_percent(
    tmp_path: Path,
) -> None:
    truth = _ground_truth()
    out = tmp_path / "SIM.json"
    with running_sim_engine(
        free_port(), profile=PROFILE, time_scale=TIME_SCALE, max_model_len=MAX_MODEL_LEN
    ) as engine:
        done = subprocess.run(
            _profile_command(engine.url, out),
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        lag = engine.metric("shoal_sim_lag_seconds_total")
        steps = engine.metric("shoal_sim_step_seconds_total")
        alone = asyncio.run(_probe(engine.url))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    measured = report["cells"][0]["rate"]
    summary = (
        f"capacity {measured:.3f}/s, truth {truth:.3f}/s; engine lag {lag:.2f} s of "
        f"{steps:.0f} s of steps ({lag / max(steps, 1e-9):.1%})"
    )
    print(summary)
    if abs(measured / truth - 1) > 0.10 and lag > 0.05 * steps:
        pytest.skip(f"the engine fell behind its model (too busy a machine to judge): {summary}")
    assert abs(measured / truth - 1) <= 0.10, (summary, report)
    refused = report["cells"][1]
    assert refused["rate"] == 0 and refused["num_trials"] == 1
    assert refused["note"].startswith("the endpoint refused these requests: HTTP 400")
    assert "maximum context length is 1024" in refused["note"]
    # a lone request (the probe a TTFT-only sweep starts each cell with) lives what the
    # model says: 5 ms admission, a 71 ms prefill step, 15 decode steps of 21 ms = 0.39 s
    assert alone is not None and 0.35 <= alone <= 1.5, alone
    written = json.loads(out.read_text())
    assert written["tputs"] == [[measured, 0.0]]
    assert written["indexes"] == [[OUT_TICK], [IN_TICK, TOO_LONG]]
    assert written["gpu"] == "SIM" and written["cost"] == 1.5
    assert written["slos"] == {"percentile": 50, "ttft": 2.0, "tpot": 0.15}


async def _probe(url: str) -> float | None:
    async with HttpLoad(url, "", SLOS, time_scale=TIME_SCALE) as load:
        load.model = (await load.models())[0]
        return await load.probe(OUT_TICK, IN_TICK)


def test_an_endpoint_that_is_down_is_named_with_exit_code_3(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run(
        _profile_command(url, tmp_path / "x.json"),
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done.stderr
    assert url in done.stderr and "cannot reach" in done.stderr
    assert not (tmp_path / "x.json").exists()
