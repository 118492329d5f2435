"""Engine /metrics -> EngineMetrics: vLLM's names (current and legacy), interval means,
rates, LoRA adapters, and staleness as unknown."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from router.scrape import MetricsScraper, parse_scrape
from sim.metrics import SimMetrics

# the shape a vLLM v1 engine with two data-parallel ranks exports (abridged)
VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="tiny"} 3.0
vllm:num_requests_running{engine="1",model_name="tiny"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="tiny"} 4.0
vllm:num_requests_waiting{engine="1",model_name="tiny"} 0.0
vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.25
vllm:prompt_tokens_total{engine="0",model_name="tiny"} 1000.0
vllm:generation_tokens_total{engine="0",model_name="tiny"} 50.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.001",model_name="tiny"} 0.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 10.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="tiny"} 10.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="tiny"} 2.0
vllm:request_time_per_output_token_seconds_count{engine="0",model_name="tiny"} 10.0
vllm:request_time_per_output_token_seconds_sum{engine="0",model_name="tiny"} 0.5
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a1",waiting_lora_adapters=""} 1.7e+09
vllm:lora_requests_info{max_lora="2",running_lora_adapters="a2,a3",waiting_lora_adapters="a4"} 1.8e+09
vllm:cache_config_info{block_size="16",engine="0"} 1.0
"""

LEGACY_TEXT = """\
vllm:num_requests_running{model_name="old"} 1.0
vllm:gpu_cache_usage_perc{model_name="old"} 0.5
vllm:time_per_output_token_seconds_count{model_name="old"} 4.0
vllm:time_per_output_token_seconds_sum{model_name="old"} 0.4
"""


def later(text: str, **changes: float) -> str:
    lines = []
    for line in text.splitlines():
        name = line.split("{", 1)[0]
        key = name.removeprefix("vllm:")
        changed = key in changes and 'engine="0"' in line
        lines.append(line.rsplit(" ", 1)[0] + f" {changes[key]}" if changed else line)
    return "\n".join(lines) + "\n"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gauges_are_summed_over_label_sets_and_loras_come_from_the_newest_sample() -> None:
    sample = parse_scrape(VLLM_TEXT, at=1.0)
    assert sample.values["running"] == 5.0
    assert sample.values["waiting"] == 4.0
    assert sample.values["kv"] == 0.25
    assert sample.loras == frozenset({"a2", "a3", "a4"})


def test_one_scrape_gives_gauges_and_no_interval_figures() -> None:
    clock = Clock()
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    scraper.record("e", VLLM_TEXT)
    metrics = scraper.metrics("e")
    assert metrics is not None
    assert (metrics.num_running, metrics.num_waiting, metrics.kv_cache_usage) == (5.0, 4.0, 0.25)
    assert metrics.ttft_mean_s is None and metrics.tpot_mean_s is None
    assert metrics.prompt_tokens_per_s is None and metrics.generation_tokens_per_s is None
    assert metrics.age_s == 0.0


def test_two_scrapes_give_interval_means_and_rates() -> None:
    clock = Clock()
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    scraper.record("e", VLLM_TEXT)
    clock.now += 2.0
    scraper.record(
        "e",
        later(
            VLLM_TEXT,
            prompt_tokens_total=1400.0,
            generation_tokens_total=90.0,
            time_to_first_token_seconds_count=14.0,
            time_to_first_token_seconds_sum=3.0,
            request_time_per_output_token_seconds_count=12.0,
            request_time_per_output_token_seconds_sum=0.7,
        ),
    )
    metrics = scraper.metrics("e")
    assert metrics is not None
    assert metrics.ttft_mean_s == pytest.approx(0.25)  # 1 s over 4 requests
    assert metrics.tpot_mean_s == pytest.approx(0.1)
    assert metrics.prompt_tokens_per_s == pytest.approx(200.0)
    assert metrics.generation_tokens_per_s == pytest.approx(20.0)


def test_an_interval_without_finished_requests_has_no_mean() -> None:
    clock = Clock()
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    scraper.record("e", VLLM_TEXT)
    clock.now += 1.0
    scraper.record("e", VLLM_TEXT)
    metrics = scraper.metrics("e")
    assert metrics is not None
    assert metrics.ttft_mean_s is None
    assert metrics.prompt_tokens_per_s == 0.0


def test_a_counter_that_went_down_restarts_the_difference() -> None:
    clock = Clock()
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    scraper.record("e", VLLM_TEXT)
    clock.now += 1.0
    scraper.record("e", later(VLLM_TEXT, prompt_tokens_total=3.0))  # the engine restarted
    metrics = scraper.metrics("e")
    assert metrics is not None
    assert metrics.prompt_tokens_per_s is None


def test_legacy_names_are_read() -> None:
    clock = Clock()
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    scraper.record("e", LEGACY_TEXT)
    clock.now += 1.0
    scraper.record("e", LEGACY_TEXT.replace("count{model_name=\"old\"} 4.0", 'count{model_name="old"} 6.0')
                   .replace('sum{model_name="old"} 0.4', 'sum{model_name="old"} 0.6'))  # fmt: skip
    metrics = scraper.metrics("e")
    assert metrics is not None
    assert metrics.kv_cache_usage == 0.5
    assert metrics.tpot_mean_s == pytest.approx(0.1)


def test_stale_metrics_are_unknown_never_zeros() -> None:
    clock = Clock()
    scraper = MetricsScraper(timeout_s=1, stale_s=5, clock=clock)
    assert scraper.metrics("e") is None  # never scraped
    scraper.record("e", VLLM_TEXT)
    clock.now += 4.9
    fresh = scraper.metrics("e")
    assert fresh is not None and fresh.age_s == pytest.approx(4.9)
    clock.now += 0.2
    assert scraper.metrics("e") is None
    assert scraper.age_s("e") == pytest.approx(5.1)


def test_the_simulators_exposition_is_read() -> None:
    sim = SimMetrics("sim-7b", 4096, 2, {"block_size": "16"})
    sim.lora_info(["ad1"], ["ad2"], now=5.0)
    sample = parse_scrape(generate_latest(sim.registry).decode(), at=0.0)
    assert sample.values["running"] == 0.0
    assert sample.values["waiting"] == 0.0
    assert sample.values["kv"] == 0.0
    assert {"prompt", "generation", "ttft_count", "tpot_count"} <= set(sample.values)
    assert sample.loras == frozenset({"ad1", "ad2"})
