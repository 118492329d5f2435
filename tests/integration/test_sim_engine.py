"""Simulated engines as processes: prefix hits shorten TTFT in simulated time, LoRA
adapters load, list, unload and share the batch under ``max_loras``, faults fire."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from sim.faults import DIE_EXIT_CODE
from sim.process import SimEngineProcess, running_sim_engine, start_sim_engine
from sim.profile import StepProfile
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

# Easy numbers: a step is 10 ms plus 4 ms per prefill token (simulated).
SLOW_PREFILL = StepProfile(c0_s=0.01, c_prefill_s=0.004, c_decode_s=0.0, c_kv_s=0.0)


def metric(engine: SimEngineProcess, name: str, **labels: str) -> float:
    """One sample's value from /metrics (labels other than those given are ignored)."""
    for line in engine.get("/metrics").splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"{name} {labels} not in /metrics")


def complete(engine: SimEngineProcess, body: dict[str, Any], timeout: float = 10) -> dict[str, Any]:
    status, raw = engine.request("POST", "/v1/completions", body, timeout=timeout)
    assert status == 200, raw
    return dict(json.loads(raw))


def test_a_prefix_hit_shortens_ttft_by_the_prefill_it_skips() -> None:
    with running_sim_engine(free_port(), profile=SLOW_PREFILL, time_scale=10) as engine:
        prompt = list(range(100, 356))  # 256 tokens: 16 blocks of 16
        complete(engine, {"prompt": prompt, "max_tokens": 1})
        cold = metric(engine, "vllm:time_to_first_token_seconds_sum")
        complete(engine, {"prompt": prompt, "max_tokens": 1})
        warm = metric(engine, "vllm:time_to_first_token_seconds_sum") - cold
        assert metric(engine, "vllm:prefix_cache_queries_total") == 512
        assert metric(engine, "vllm:prefix_cache_hits_total") == 240  # 15 blocks: not the last
        # The model: cold = 10 ms + 256 * 4 ms, warm = 10 ms + 16 * 4 ms; TTFT can only be
        # later than the model (the host's lag), never earlier.
        assert cold >= 1.034 - 1e-9 and warm >= 0.074 - 1e-9
        assert warm < cold / 3


def lora_engine(**flags: Any) -> Any:
    profile = StepProfile(c0_s=0.05, c_prefill_s=0.0, c_decode_s=0.0, c_kv_s=0.0)
    return running_sim_engine(
        free_port(), served_model_name="base", enable_lora=True, profile=profile, **flags
    )


def stream_in_thread(engine: SimEngineProcess, model: str, max_tokens: int) -> threading.Thread:
    def run() -> None:
        body = {"model": model, "prompt": [1, 2, 3], "max_tokens": max_tokens, "stream": True}
        req = urllib.request.Request(
            engine.url + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as reply:
            assert reply.read().decode().endswith("data: [DONE]\n\n")

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_adapters_load_list_serve_and_unload_like_vllms() -> None:
    with lora_engine(lora_modules=["pre=/adapters/pre"]) as engine:
        load = {"lora_name": "a", "lora_path": "/adapters/a"}
        status, text = engine.request("POST", "/v1/load_lora_adapter", load)
        assert (status, text) == (200, b"Success: LoRA adapter 'a' added successfully.")
        status, again = engine.request("POST", "/v1/load_lora_adapter", load)
        assert status == 400 and json.loads(again)["error"]["type"] == "InvalidUserInput"
        status, base = engine.request(
            "POST", "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "/x"}
        )
        assert status == 400 and "conflicts" in json.loads(base)["error"]["message"]

        cards = {c["id"]: c for c in json.loads(engine.get("/v1/models"))["data"]}
        assert set(cards) == {"base", "pre", "a"}
        assert (cards["a"]["parent"], cards["a"]["root"]) == ("base", "/adapters/a")
        assert cards["base"]["parent"] is None

        assert complete(engine, {"model": "a", "prompt": [1], "max_tokens": 1})["model"] == "a"
        status, _ = engine.request("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert status == 200
        status, gone = engine.request("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})
        assert status == 404 and json.loads(gone)["error"]["type"] == "NotFoundError"
        status, odd = engine.request("POST", "/v1/unload_lora_adapter", {"lora_name": ["a"]})
        assert status == 400 and json.loads(odd)["error"]["type"] == "InvalidUserInput"
        status, unknown = engine.request("POST", "/v1/completions", {"model": "a", "prompt": "x"})
        assert status == 404 and json.loads(unknown)["error"]["param"] == "model"


@pytest.mark.parametrize(("max_loras", "most_running"), [(1, 1), (2, 2)])
def test_max_loras_bounds_the_adapters_in_one_batch(max_loras: int, most_running: int) -> None:
    with lora_engine(max_loras=max_loras, max_cpu_loras=2) as engine:
        for name in ("x", "y"):
            engine.request(
                "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": f"/a/{name}"}
            )
        threads = [stream_in_thread(engine, name, 12) for name in ("x", "y")]
        seen: set[float] = set()
        lora_labels = set()
        deferred_seen = False
        try:
            while any(t.is_alive() for t in threads):  # each request: 12 steps of 50 ms
                seen.add(metric(engine, "vllm:num_requests_running"))
                deferred_seen |= (
                    metric(engine, "vllm:num_requests_waiting_by_reason", reason="deferred") == 1
                )
                lora_labels.add(latest_lora_info(engine.get("/metrics"))["running"])
        finally:
            for thread in threads:
                thread.join(timeout=30)
        assert max(seen) == most_running
        assert ("x,y" in lora_labels) == (max_loras == 2)
        if max_loras == 1:  # y waited for a LoRA slot, not for capacity, at some point
            assert deferred_seen
        assert metric(engine, "vllm:request_success_total", finished_reason="length") == 2
        # As vLLM's: every combination seen stays, stamped when last current; the latest
        # (the highest stamp) is the engine's state now.
        text = engine.get("/metrics")
        assert len(re.findall(r"^vllm:lora_requests_info\{", text, re.M)) >= 2
        assert latest_lora_info(text) == {"running": "", "waiting": ""}


def latest_lora_info(text: str) -> dict[str, str]:
    """The adapters running and waiting in ``vllm:lora_requests_info``'s latest series."""
    series = []
    for labels, value in re.findall(r"^vllm:lora_requests_info\{(.*)\} (\S+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        series.append(
            (float(value), found["running_lora_adapters"], found["waiting_lora_adapters"])
        )
    _, running, waiting = max(series)
    return {"running": running, "waiting": waiting}


@pytest.fixture(scope="module")
def faulty() -> Any:
    profile = StepProfile(c0_s=0.01, c_prefill_s=0.0, c_decode_s=0.0, c_kv_s=0.0)
    with running_sim_engine(free_port(), profile=profile, time_scale=10) as engine:
        yield engine


def test_fail_next_answers_500s_with_vllms_error_then_recovers(faulty: SimEngineProcess) -> None:
    assert faulty.set_faults(fail_next=2)["fail_next"] == 2
    for _ in range(2):
        status, raw = faulty.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
        error = json.loads(raw)["error"]
        assert status == 500 and (error["type"], error["code"]) == ("InternalServerError", 500)
    complete(faulty, {"prompt": "x", "max_tokens": 1})
    assert metric(faulty, "shoal_sim_faults_total", kind="fail") == 2


def test_slowdown_multiplies_the_step_time(faulty: SimEngineProcess) -> None:
    before = metric(faulty, "vllm:e2e_request_latency_seconds_sum")
    faulty.set_faults(slowdown=5.0)
    try:
        complete(faulty, {"prompt": [1], "max_tokens": 3})
    finally:
        faulty.set_faults(slowdown=1.0)
    assert metric(faulty, "vllm:e2e_request_latency_seconds_sum") - before >= 3 * 0.05 - 1e-9


def test_hang_requests_keeps_health_up_and_hang_all_takes_it_down(faulty: SimEngineProcess) -> None:
    faulty.set_faults(hang="requests")
    try:
        with pytest.raises((TimeoutError, socket.timeout, urllib.error.URLError)):
            faulty.request("POST", "/v1/completions", {"prompt": "x"}, timeout=0.5)
        assert faulty.healthy()
        faulty.set_faults(hang="all")
        assert not faulty.healthy(timeout=0.5)
    finally:
        faulty.set_faults(hang="off")
    assert faulty.healthy()
    complete(faulty, {"prompt": "x", "max_tokens": 1})


def test_die_close_drops_the_stream_after_k_chunks(faulty: SimEngineProcess) -> None:
    faulty.set_faults(die_after_chunks=2)
    conn = http.client.HTTPConnection("127.0.0.1", faulty.port, timeout=10)
    body = json.dumps({"prompt": [1, 2], "max_tokens": 10, "stream": True})
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    reply = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead) as raised:
        reply.read()
    received = raised.value.partial
    assert received.count(b"data: ") == 2 and b"[DONE]" not in received
    conn.close()
    assert complete(faulty, {"prompt": "x", "max_tokens": 2})["usage"]["completion_tokens"] == 2


def test_the_fault_api_rejects_bad_values(faulty: SimEngineProcess) -> None:
    status, raw = faulty.request("POST", "/sim/faults", {"hang": "sometimes"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "hang"
    status, raw = faulty.request("POST", "/sim/faults", {"explode": True})
    assert status == 400


def test_die_exit_ends_the_process_mid_stream_from_a_start_flag(tmp_path: Any) -> None:
    engine = start_sim_engine(
        free_port(),
        fault_die_after_chunks=1,
        fault_die_mode="exit",
        log_path=tmp_path / "engine.log",
    )
    try:
        body = {"prompt": [1, 2], "max_tokens": 50, "stream": True}
        req = urllib.request.Request(
            engine.url + "/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        errors = (http.client.IncompleteRead, ConnectionError, urllib.error.URLError)
        with pytest.raises(errors), urllib.request.urlopen(req, timeout=10) as reply:
            reply.read()
        assert engine.process.wait(timeout=10) == DIE_EXIT_CODE
    finally:
        engine.stop()


# A 0.5 s API server (simulated), one 10 ms step per token.
SLOW_ADMISSION = StepProfile(
    c0_s=0.01, c_prefill_s=0.0, c_decode_s=0.0, c_kv_s=0.0, c_request_s=0.5
)


def test_finished_request_stats_mean_what_vllms_do() -> None:
    """Queue time runs from the engine core's QUEUED event (after the API server's part),
    TTFT and e2e from the HTTP arrival; a one-token answer has a TPOT of 0; n, max_tokens,
    prefill KV and max generation tokens are observed per finished request."""
    with running_sim_engine(free_port(), profile=SLOW_ADMISSION, time_scale=10) as engine:
        prompt = list(range(100, 164))  # 4 blocks of 16
        complete(engine, {"prompt": prompt, "max_tokens": 1})
        complete(engine, {"prompt": prompt, "max_tokens": 1})  # 3 blocks hit
        assert metric(engine, "vllm:time_to_first_token_seconds_sum") >= 2 * 0.51 - 1e-9
        assert metric(engine, "vllm:request_queue_time_seconds_sum") < 0.2
        assert metric(engine, "vllm:request_time_per_output_token_seconds_count") == 2
        assert metric(engine, "vllm:request_params_max_tokens_sum") == 2
        assert metric(engine, "vllm:request_params_n_count") == 2
        assert metric(engine, "vllm:request_max_num_generation_tokens_sum") == 2
        assert metric(engine, "vllm:request_prefill_kv_computed_tokens_sum") == 64 + 16
        hits = metric(engine, "vllm:prefix_cache_hits_total")
        assert hits == 48
        assert metric(engine, "vllm:prompt_tokens_cached_by_source_total", source="device") == hits


def series_names(text: str) -> set[str]:
    """The vLLM families a /metrics text declares (``_total``/``_created`` dropped)."""
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE vllm:")}
    return {n.removesuffix("_total").removesuffix("_created") for n in names}


# The features a simulated engine has not (sim/metrics.py's docstring).
NOT_SIMULATED = {
    "vllm:admission_rejections",
    "vllm:estimated_flops_per_gpu",
    "vllm:estimated_read_bytes_per_gpu",
    "vllm:estimated_write_bytes_per_gpu",
    "vllm:mm_cache_hits",
    "vllm:mm_cache_queries",
    "vllm:engine_sleep_state",
}


def test_every_series_of_the_real_engine_is_there_but_for_features_not_simulated() -> None:
    """``data/vllm_cpu_metrics.txt``: /metrics of the project's CPU ``vllm serve`` (0.32)
    after six completions."""
    real = series_names((Path(__file__).parent / "data/vllm_cpu_metrics.txt").read_text())
    with running_sim_engine(free_port(), time_scale=10) as engine:
        sim = series_names(engine.get("/metrics"))
    assert real - sim == NOT_SIMULATED


def test_without_prefix_caching_no_prefix_cache_query_is_counted() -> None:
    """vLLM counts queries only for requests that looked the cache up
    (``KVCacheManager.record_prefix_cache_stats``): none without prefix caching."""
    with running_sim_engine(free_port(), time_scale=10, no_enable_prefix_caching=True) as engine:
        complete(engine, {"prompt": list(range(100, 164)), "max_tokens": 1})
        complete(engine, {"prompt": list(range(100, 164)), "max_tokens": 1})
        assert metric(engine, "vllm:prompt_tokens_total") == 128
        assert metric(engine, "vllm:prefix_cache_queries_total") == 0
        assert metric(engine, "vllm:prefix_cache_hits_total") == 0


def test_iteration_tokens_count_what_each_output_batch_carries() -> None:
    """vLLM observes vllm:iteration_tokens_total once per engine step that produced output,
    as the prompt tokens computed for requests whose first token it carries plus the tokens
    generated: a 300-token prompt prefilled in 3 chunks, then 2 more tokens, is 3
    observations summing to 303 (the captured CPU engine: 6 requests of 52 prompt tokens
    and 28 generated, 28 observations summing to 80)."""
    with running_sim_engine(free_port(), time_scale=10, max_num_batched_tokens=128) as engine:
        complete(engine, {"prompt": list(range(100, 400)), "max_tokens": 3})
        assert metric(engine, "vllm:iteration_tokens_total_count") == 3
        assert metric(engine, "vllm:iteration_tokens_total_sum") == 303
