"""The capacity model (control/autoscale/capacity.py): hand-computed bounds, then the
engine simulator's own scheduler run at 0.9x and 1.5x the computed rate."""

from __future__ import annotations

import random

import pytest

from control.autoscale.capacity import EngineLimits, Slo, TokenMix, capacity, capacity_rps
from sim.profile import DEFAULT_PROFILE, StepProfile
from sim.scheduler import Request, Scheduler, SchedulerConfig

# c0 10 ms per step, 1 ms per decoding sequence, nothing else: a = (O - 1) * 1 ms.
DECODE_ONLY = StepProfile(c0_s=0.01, c_prefill_s=0.0, c_decode_s=1e-3, c_kv_s=0.0)
SHORT = TokenMix(16, 11)  # both exact grid points: the bucket is the mix itself


def test_tpot_bound_without_prefill_is_the_mean_step() -> None:
    # a = 10 decodes * 1 ms = 0.01 s; t(r) = 0.01 / (1 - 0.01 r) <= 0.02  =>  r <= 50.
    cap = capacity(DECODE_ONLY, SHORT, Slo(ttft_s=1.0, tpot_s=0.02))
    assert cap.limit == "tpot"
    assert cap.rps == pytest.approx(50.0)
    assert cap.step_s == pytest.approx(0.02) and cap.tpot_s == pytest.approx(0.02)
    assert cap.num_running == pytest.approx(50 * 0.02 * 11)  # Little: r * t * (1 + 10 steps)
    assert cap.concurrency_at(cap.rps) == pytest.approx(cap.num_running)
    assert cap.saturation_rps == pytest.approx(100.0)
    assert cap.ttft_s == pytest.approx(1.5 * 0.02)  # half a step waiting, one step prefilling


def test_ttft_bound_counts_the_own_prefill_and_the_wait_behind_others() -> None:
    profile = StepProfile(c0_s=0.01, c_prefill_s=1e-4, c_decode_s=1e-3, c_kv_s=0.0)
    cap = capacity(profile, TokenMix(1024, 2), Slo(ttft_s=0.2, tpot_s=1.0))
    assert cap.limit == "ttft"
    own = 1024 * 1e-4  # the prompt's own prefill: 102.4 ms
    a = own + 1 * 1e-3  # plus one decode
    r = cap.rps
    step = 0.01 / (1 - r * a)
    wait = r * own**2 / (2 * (1 - r * a))  # M/G/1 behind the other prompts
    assert 1.5 * step + own + wait == pytest.approx(0.2)
    assert cap.ttft_s == pytest.approx(0.2)
    # by hand: at r = 5.386, 1.5 * 0.0339 + 0.1024 + 0.0638 = 0.2 (the plain mean-field
    # answer without the wait, (1 - 0.01 / 0.065) / a, would be 8.2)
    assert r == pytest.approx(5.386, abs=1e-3)


def test_prefill_spilling_into_decodes_raises_the_tpot() -> None:
    profile = StepProfile(c0_s=0.01, c_prefill_s=1e-4, c_decode_s=1e-3, c_kv_s=0.0)
    cap = capacity(profile, TokenMix(256, 11), Slo(ttft_s=10.0, tpot_s=0.05))
    assert cap.limit == "tpot"
    own, a, r = 256 * 1e-4, 256 * 1e-4 + 10 * 1e-3, cap.rps
    step = 0.01 / (1 - r * a)
    wait = r * own**2 / (2 * (1 - r * a))
    assert step + r * own * (own + wait) / ((1 - r * a) * 10) == pytest.approx(0.05)


def test_max_num_seqs_bounds_the_running_batch_with_a_poisson_margin() -> None:
    cap = capacity(DECODE_ONLY, SHORT, Slo(1.0, 0.02), EngineLimits(max_num_seqs=4))
    running = ((17**0.5 - 1) / 2) ** 2  # L + sqrt(L) = 4
    assert cap.limit == "max-num-seqs"
    assert cap.num_running == pytest.approx(running)
    assert cap.rps == pytest.approx(running / (11 * 0.01 + running * 0.01))


def test_kv_blocks_bound_the_running_batch() -> None:
    limits = EngineLimits(num_gpu_blocks=10, block_size=16)
    cap = capacity(DECODE_ONLY, SHORT, Slo(1.0, 0.02), limits)
    seqs = 9 / ((16 + 11 / 2) / 16 + 1)  # blocks less the null one, at the mean context
    running = (((1 + 4 * seqs) ** 0.5 - 1) / 2) ** 2
    assert cap.limit == "kv-blocks"
    assert cap.rps == pytest.approx(running / (11 * 0.01 + running * 0.01))


def test_token_budget_bounds_prefill_plus_decode_tokens() -> None:
    limits = EngineLimits(max_num_batched_tokens=64)
    mix = TokenMix(64, 11)  # 64 + 10 tokens a request computes in all
    cap = capacity(DECODE_ONLY, mix, Slo(10.0, 0.02), limits)
    assert cap.limit == "token-budget"
    assert cap.rps == pytest.approx(64 / (74 * 0.01 + 64 * 0.01))


def test_unattainable_slo_is_zero_with_the_saturation_rate_kept() -> None:
    cap = capacity(DECODE_ONLY, SHORT, Slo(ttft_s=1.0, tpot_s=0.009))  # c0 alone is 10 ms
    assert (cap.rps, cap.limit) == (0.0, "tpot-unattainable")
    assert cap.saturation_rps == pytest.approx(100.0)
    slow = StepProfile(c0_s=0.01, c_prefill_s=1e-3, c_decode_s=0.0, c_kv_s=0.0)
    cap = capacity(slow, TokenMix(1024, 4), Slo(ttft_s=0.5, tpot_s=1.0))  # prefill 1.02 s
    assert (cap.rps, cap.limit) == (0.0, "ttft-unattainable")


def test_longer_prompts_or_outputs_lower_the_capacity() -> None:
    slo = Slo(1.0, 0.05)
    rates = [capacity_rps(DEFAULT_PROFILE, TokenMix(p, 128), slo) for p in (128, 512, 2048)]
    assert rates[0] > rates[1] > rates[2] > 0
    rates = [capacity_rps(DEFAULT_PROFILE, TokenMix(512, o), slo) for o in (32, 128, 512)]
    assert rates[0] > rates[1] > rates[2] > 0


def test_buckets_round_up_within_a_sixteenth_octave_and_are_cached() -> None:
    mix = TokenMix(1000, 100)
    bucket = mix.bucketed()
    assert 1000 <= bucket.prompt_tokens < 1000 * 2 ** (1 / 16)
    assert 100 <= bucket.output_tokens < 100 * 2 ** (1 / 16)
    assert TokenMix(512, 7).bucketed() == TokenMix(512, 7)
    slo = Slo(1.0, 0.05)
    assert capacity(DEFAULT_PROFILE, mix, slo) is capacity(
        DEFAULT_PROFILE, TokenMix(1001, 101), slo
    )
    # the bucket is never optimistic: the exact mix serves at least as much
    assert capacity_rps(DEFAULT_PROFILE, bucket, slo) <= capacity_rps(
        DEFAULT_PROFILE, TokenMix(990, 99), slo
    )


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="prompt_tokens"):
        TokenMix(0, 10)
    with pytest.raises(ValueError, match="SLO"):
        Slo(0.0, 0.1)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineLimits(max_num_seqs=0)


# -- against the engine simulator's scheduler ---------------------------------------------


def replay(
    profile: StepProfile, mix: TokenMix, rps: float, limits: EngineLimits, *, seed: int = 1
) -> tuple[float, float]:
    """Mean TTFT and mean TPOT of Poisson arrivals at ``rps`` for 60 simulated seconds
    through ``sim.scheduler`` priced by ``profile`` (the engine's loop, without sockets);
    the first 20% of requests are warm-up."""
    rng = random.Random(seed)
    config = SchedulerConfig(
        num_gpu_blocks=limits.num_gpu_blocks,
        block_size=limits.block_size,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_num_seqs=limits.max_num_seqs,
        max_model_len=100_000,
        enable_prefix_caching=False,
    )
    scheduler = Scheduler(config)
    arrivals: list[Request] = []
    at = rng.expovariate(rps)
    while at < 60.0:
        prompt = [rng.randrange(32000) for _ in range(int(mix.prompt_tokens))]
        arrivals.append(Request(f"r{len(arrivals)}", prompt, int(mix.output_tokens), at))
        at += rng.expovariate(rps)
    now, next_arrival, finished = 0.0, 0, []
    while next_arrival < len(arrivals) or scheduler.has_work:
        while (
            next_arrival < len(arrivals)
            and arrivals[next_arrival].arrival_s + profile.c_request_s <= now
        ):
            scheduler.add(arrivals[next_arrival])
            next_arrival += 1
        if not scheduler.has_work:
            now = arrivals[next_arrival].arrival_s + profile.c_request_s
            continue
        plan = scheduler.schedule()
        now += profile.step_s(plan.shape)
        finished += [(request, now) for request in scheduler.update(plan, now).finished]
    measured = [(r, end) for r, end in finished if r.arrival_s >= 12.0]
    assert measured and all(r.first_token_s is not None for r, _ in measured)
    ttft = [r.first_token_s - r.arrival_s for r, _ in measured]  # type: ignore[operator]
    tpot = [(end - r.first_token_s) / (r.max_tokens - 1) for r, end in measured]  # type: ignore[operator]
    return sum(ttft) / len(ttft), sum(tpot) / len(tpot)


@pytest.mark.parametrize(
    ("mix", "slo", "limits", "limit"),
    [
        (TokenMix(512, 128), Slo(1.0, 0.05), EngineLimits(), "tpot"),
        (TokenMix(3000, 32), Slo(1.0, 0.05), EngineLimits(), "tpot"),  # prefill-heavy
        (TokenMix(1024, 64), Slo(0.3, 0.1), EngineLimits(), "ttft"),
        (TokenMix(512, 128), Slo(1.0, 0.05), EngineLimits(num_gpu_blocks=256), "kv-blocks"),
        (TokenMix(256, 256), Slo(1.0, 0.05), EngineLimits(max_num_seqs=32), "max-num-seqs"),
    ],
)
def test_the_scheduler_meets_the_slo_below_capacity_and_misses_it_above(
    mix: TokenMix, slo: Slo, limits: EngineLimits, limit: str
) -> None:
    cap = capacity(DEFAULT_PROFILE, mix, slo, limits)
    assert cap.limit == limit
    ttft, tpot = replay(DEFAULT_PROFILE, mix, 0.9 * cap.rps, limits)
    assert ttft <= slo.ttft_s and tpot <= slo.tpot_s, (ttft, tpot)
    ttft, tpot = replay(DEFAULT_PROFILE, mix, 1.5 * cap.rps, limits)
    assert ttft > slo.ttft_s or tpot > slo.tpot_s, (ttft, tpot)
