"""Continuous batching in the simulator: chunked prefill, prefix hits, KV budget,
preemption and LoRA slots, step by step."""

from __future__ import annotations

import random

from sim.blocks import Stored
from sim.profile import StepProfile, StepShape
from sim.scheduler import Request, Scheduler, SchedulerConfig, Status

B = 16


def config(**overrides: int) -> SchedulerConfig:
    values = {
        "num_gpu_blocks": 64,
        "block_size": B,
        "max_num_batched_tokens": 256,
        "max_num_seqs": 8,
        "max_model_len": 1024,
        "max_loras": 1,
        "max_cpu_loras": 1,
    }
    values.update(overrides)
    return SchedulerConfig(**values)  # type: ignore[arg-type]


def request(
    name: str, prompt: list[int], max_tokens: int = 4, lora: tuple[int, str] | None = None
) -> Request:
    return Request(name, prompt, max_tokens, 0.0, lora)


def run_to_end(scheduler: Scheduler) -> list[StepShape]:
    shapes = []
    while scheduler.has_work:
        plan = scheduler.schedule()
        shapes.append(plan.shape)
        scheduler.update(plan, float(len(shapes)))
    return shapes


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    s = Scheduler(config(max_num_batched_tokens=32))
    r = request("a", list(range(100)), max_tokens=3)
    s.add(r)
    shapes = run_to_end(s)
    assert [x.prefill_tokens for x in shapes] == [32, 32, 32, 4, 0, 0]
    assert [x.decode_seqs for x in shapes] == [0, 0, 0, 0, 1, 1]
    assert [x.context_tokens for x in shapes] == [32, 64, 96, 100, 101, 102]
    assert r.status is Status.FINISHED and r.finish_reason == "length" and len(r.output_ids) == 3


def test_a_shared_prefix_is_served_from_cache_in_whole_blocks() -> None:
    s = Scheduler(config())
    prefix = list(range(1000, 1000 + 3 * B + 5))  # 3 full blocks and 5 tokens
    s.add(request("a", [*prefix, 1, 2, 3], max_tokens=1))
    run_to_end(s)
    b = request("b", [*prefix, 7, 8, 9], max_tokens=1)
    s.add(b)
    (shape, *_) = run_to_end(s)
    assert b.num_cached_tokens == 3 * B
    assert shape.prefill_tokens == len(b.prompt_ids) - 3 * B


def test_an_identical_prompt_still_computes_its_last_token() -> None:
    s = Scheduler(config())
    prompt = list(range(4 * B))
    s.add(request("a", prompt, max_tokens=1))
    run_to_end(s)
    again = request("b", prompt, max_tokens=1)
    s.add(again)
    (shape,) = run_to_end(s)
    assert again.num_cached_tokens == 3 * B, "hits stop before the last block (num_tokens - 1)"
    assert shape.prefill_tokens == B


def test_a_request_waits_for_blocks_head_of_line() -> None:
    s = Scheduler(config(num_gpu_blocks=10))
    a = request("a", list(range(8 * B)), max_tokens=2)
    b = request("b", list(range(500, 500 + 4 * B)), max_tokens=2)
    c = request("c", list(range(900, 900 + B)), max_tokens=2)
    for r in (a, b, c):
        s.add(r)
    plan = s.schedule()
    assert [r.request_id for r, _ in plan.scheduled] == ["a"], "b does not fit; c waits behind it"
    assert list(s.waiting) == [b, c]


def test_decode_out_of_blocks_preempts_the_latest_request_which_keeps_its_tokens() -> None:
    s = Scheduler(config(num_gpu_blocks=9))  # 8 usable
    a = request("a", list(range(4 * B)), max_tokens=20)
    b = request("b", list(range(300, 300 + 4 * B)), max_tokens=20)
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert len(first.scheduled) == 2 and s.pool.num_free == 0
    s.update(first, 1.0)
    second = s.schedule()  # a's token 65 needs a fifth block: b gives its four back
    assert second.preempted == (b,)
    assert [r.request_id for r, _ in second.scheduled] == ["a"]
    assert b.status is Status.WAITING and b.num_computed == 0 and len(b.output_ids) == 1
    assert s.num_preemptions == 1
    run_to_end(s)
    assert b.finish_reason == "length" and len(b.output_ids) == 20


def test_max_num_seqs_bounds_the_batch() -> None:
    s = Scheduler(config(max_num_seqs=2))
    for i in range(3):
        s.add(request(str(i), [i + 1] * 8))
    plan = s.schedule()
    assert len(plan.scheduled) == 2 and len(s.waiting) == 1


def test_max_loras_keeps_a_second_adapter_out_of_the_batch() -> None:
    s = Scheduler(config(max_loras=1, max_cpu_loras=2))
    x = request("x", [1] * 8, lora=(1, "x"))
    y = request("y", [2] * 8, lora=(2, "y"))
    base = request("base", [3] * 8)
    for r in (x, y, base):
        s.add(r)
    plan = s.schedule()
    assert [r.request_id for r, _ in plan.scheduled] == ["x", "base"]
    assert list(s.waiting) == [y], "skipped, keeping its place"
    assert plan.shape.adapters_loaded == 1
    run_to_end(s)
    assert y.finish_reason == "length"


def test_adapters_beyond_max_cpu_loras_are_reloaded() -> None:
    s = Scheduler(config(max_loras=1, max_cpu_loras=1))
    loaded = []
    for i, name in enumerate(["x", "y", "x"]):
        s.add(request(str(i), [i + 1] * 8, max_tokens=1, lora=(1 if name == "x" else 2, name)))
        loaded += [shape.adapters_loaded for shape in run_to_end(s)]
    assert loaded == [1, 1, 1], "x was evicted by y and loaded again"
    s.add(request("3", [9] * 8, max_tokens=1, lora=(1, "x")))
    assert [shape.adapters_loaded for shape in run_to_end(s)] == [0]


def test_an_aborted_request_frees_its_blocks() -> None:
    s = Scheduler(config())
    r = request("a", list(range(3 * B)), max_tokens=50)
    s.add(r)
    s.update(s.schedule(), 1.0)
    assert s.pool.num_free < 63
    s.abort(r)
    assert s.pool.num_free == 63 and r.finish_reason == "abort" and not s.has_work


def test_outputs_are_deterministic_and_stop_at_max_model_len() -> None:
    outputs = []
    for _ in range(2):
        s = Scheduler(config(max_model_len=40))
        r = request("a", list(range(36)), max_tokens=100)
        s.add(r)
        run_to_end(s)
        outputs.append(r.output_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 4


def test_the_profile_prices_a_step_linearly() -> None:
    p = StepProfile(c0_s=1.0, c_prefill_s=0.1, c_decode_s=0.01, c_kv_s=0.001, lora_load_s=5.0)
    assert p.step_s(StepShape(10, 2, 100, 1)) == 1.0 + 1.0 + 0.02 + 0.1 + 5.0
    assert p.scaled(2).step_s(StepShape(10, 0, 0)) == 4.0


def test_a_step_that_preempts_admits_no_waiting_request() -> None:
    """vLLM schedules the waiting queue only when the running pass preempted nothing:
    blocks a preemption just freed must not go to a newcomer (or straight back to the
    request preempted for them) in the same step."""
    rng = random.Random(2)
    s = Scheduler(
        config(
            num_gpu_blocks=12,
            max_num_batched_tokens=64,
            max_model_len=12 * B,
            enable_prefix_caching=False,  # with the cache the same workload preempts less
        )
    )
    pending = [
        request(f"r{i}", [rng.randrange(16, 200) for _ in range(rng.randrange(1, 60))])
        for i in range(12)
    ]
    for r in pending:
        r.max_tokens = rng.randrange(1, 60)
    steps_with_preemption = 0
    now = 0.0
    while pending or s.has_work:
        if pending and rng.random() < 0.5:
            s.add(pending.pop())
        if not s.has_work:
            continue
        waiting = set(s.waiting)
        plan = s.schedule()
        if plan.preempted:
            steps_with_preemption += 1
            assert not [r for r, _ in plan.scheduled if r in waiting or r in plan.preempted]
        now += 1.0
        s.update(plan, now)
    assert steps_with_preemption > 0, "the workload must preempt to test anything"
    assert s.pool.num_free == s.pool.num_usable


def test_a_prefix_computed_in_this_step_is_already_a_hit_for_a_request_behind_it() -> None:
    """vLLM caches a request's full blocks when it allocates them for the step (so before
    they are computed: the step's forward pass writes them before any attention reads
    them), and a request admitted later in the same schedule() hits them. Two identical
    prompts arriving together compute the shared blocks once."""
    s = Scheduler(config())
    prompt = list(range(100, 100 + 4 * B + 8))
    a, b = request("a", prompt), request("b", prompt)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [n for _, n in plan.scheduled] == [4 * B + 8, 8]
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 4 * B)
    assert b.block_ids[:4] == a.block_ids[:4]
    stored = [e for e in s.pool.take_events() if isinstance(e, Stored)]
    assert sum(len(e.block_hashes) for e in stored) == 4, "each block stored once"
