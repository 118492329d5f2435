"""The engine loop in simulated time, in process: however far the time scale runs ahead of
the wall clock (or the host behind it), each request's timeline stays ordered and every
token of every request is delivered."""

from __future__ import annotations

import asyncio
import random

import pytest

from sim.engine import Engine, SimClock
from sim.metrics import SimMetrics
from sim.profile import DEFAULT_PROFILE
from sim.scheduler import Request, SchedulerConfig


async def run_burst(scale: float) -> tuple[list[Request], list[list[float]]]:
    config = SchedulerConfig(
        num_gpu_blocks=120, max_num_batched_tokens=256, max_num_seqs=16, max_model_len=1024
    )
    metrics = SimMetrics("t", 1024, None, {"block_size": "16"})
    engine = Engine(config, DEFAULT_PROFILE, metrics, clock=SimClock(scale))
    loop = asyncio.create_task(engine.run())
    rng = random.Random(3)

    async def one(i: int) -> tuple[Request, list[float]]:
        await asyncio.sleep(rng.random() * 0.02)
        prompt = [rng.randrange(16, 30000) for _ in range(rng.randrange(1, 300))]
        handle = engine.submit(f"r{i}", prompt, rng.randrange(1, 60))
        stamps = []
        while True:
            out = await handle.queue.get()
            stamps.append(engine.clock.now())
            if out.finish_reason is not None:
                return handle.request, stamps

    try:
        done = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(60))), 30)
    finally:
        loop.cancel()
    assert engine.scheduler.pool.usage == 0 and not engine.scheduler.has_work
    return [r for r, _ in done], [s for _, s in done]


@pytest.mark.parametrize("scale", [1.0, 1000.0, 1e6])
def test_timelines_stay_ordered_at_any_time_scale(scale: float) -> None:
    requests, stamps = asyncio.run(run_burst(scale))
    for request, seen in zip(requests, stamps, strict=True):
        assert len(request.output_ids) == request.max_tokens == len(seen)
        assert request.first_scheduled_s is not None and request.first_token_s is not None
        assert request.arrival_s <= request.ready_s <= request.first_scheduled_s
        assert request.first_scheduled_s < request.first_token_s
        assert seen == sorted(seen)


def test_n_fans_out_into_children_observed_once_as_a_parent() -> None:
    async def run() -> tuple[list[str], list[int], SimMetrics]:
        config = SchedulerConfig(
            num_gpu_blocks=120, max_num_batched_tokens=256, max_num_seqs=16, max_model_len=1024
        )
        metrics = SimMetrics("t", 1024, None, {"block_size": "16"})
        engine = Engine(config, DEFAULT_PROFILE, metrics, clock=SimClock(1000.0))
        loop = asyncio.create_task(engine.run())
        try:
            handles = engine.submit_group("p", list(range(20, 60)), 4, 3, first_index=3)
            queue = handles[0].queue
            assert all(h.queue is queue for h in handles)
            seen: list[int] = []
            while seen.count(-1) < 3:
                out = await asyncio.wait_for(queue.get(), 10)
                seen.append(out.index)
                if out.finish_reason is not None:
                    seen.append(-1)
        finally:
            loop.cancel()
        return [h.request.request_id for h in handles], seen, metrics

    ids, seen, metrics = asyncio.run(run())
    assert ids == ["0_p", "1_p", "2_p"]
    assert sorted(i for i in seen if i >= 0) == [3] * 4 + [4] * 4 + [5] * 4
    n_param = metrics.registry.get_sample_value(
        "vllm:request_params_n_sum", {"model_name": "t", "engine": "0"}
    )
    count = metrics.registry.get_sample_value(
        "vllm:request_params_n_count", {"model_name": "t", "engine": "0"}
    )
    assert (n_param, count) == (3, 1)
    hits = metrics.registry.get_sample_value(
        "vllm:prefix_cache_hits_total", {"model_name": "t", "engine": "0"}
    )
    assert hits == 2 * 32  # the later children find the first one's two full blocks of 16
