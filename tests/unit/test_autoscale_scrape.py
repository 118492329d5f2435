"""Scrape parsing and rates (pure): vLLM's names onto the canonical metrics, unknown never zero."""

from __future__ import annotations

import pytest

from control.autoscale.scrape import (
    engine_values,
    parse_engine,
    parse_router,
    router_values,
)
from control.autoscale.types import (
    GENERATION_TOKENS_PER_S,
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_PER_S,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    TTFT_MEAN_S,
)


def engine_text(
    *,
    kv: float = 0.5,
    kv_name: str = "vllm:kv_cache_usage_perc",
    waiting: float = 3,
    running: float = 7,
    prompt: float = 1000,
    generation: float = 500,
    success: tuple[float, float] = (10, 2),
    ttft_sum: float = 4.0,
    ttft_count: float = 10,
    engines: int = 1,
) -> str:
    lines = [
        f"# TYPE {kv_name} gauge",
        *(f'{kv_name}{{engine="{e}",model_name="m"}} {kv}' for e in range(engines)),
        "# TYPE vllm:num_requests_waiting gauge",
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}',
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}',
        "# TYPE vllm:prompt_tokens counter",
        f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}',
        'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e9',
        "# TYPE vllm:generation_tokens counter",
        f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {generation}',
        "# TYPE vllm:request_success counter",
        f'vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} '
        f"{success[0]}",
        f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} '
        f"{success[1]}",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="1.0",model_name="m"}} '
        f"{ttft_count}",
        f'vllm:time_to_first_token_seconds_bucket{{engine="0",le="+Inf",model_name="m"}} '
        f"{ttft_count}",
        f'vllm:time_to_first_token_seconds_count{{engine="0",model_name="m"}} {ttft_count}',
        f'vllm:time_to_first_token_seconds_sum{{engine="0",model_name="m"}} {ttft_sum}',
    ]
    return "\n".join(lines) + "\n"


def test_gauges_map_to_canonical_names_and_first_scrape_has_no_rates() -> None:
    values = engine_values(None, parse_engine(engine_text(), at_s=0.0))
    assert values == {KV_CACHE_USAGE: 0.5, REQUESTS_WAITING: 3, REQUESTS_RUNNING: 7}


def test_legacy_kv_name_is_kv_cache_usage_too() -> None:
    text = engine_text(kv=0.25, kv_name="vllm:gpu_cache_usage_perc")
    assert engine_values(None, parse_engine(text, 0.0))[KV_CACHE_USAGE] == 0.25


def test_new_kv_name_wins_when_both_are_exported() -> None:
    text = (
        engine_text(kv=0.9)
        + engine_text(kv=0.1, kv_name="vllm:gpu_cache_usage_perc").split(
            "# TYPE vllm:num_requests_waiting"
        )[0]
    )
    assert parse_engine(text, 0.0).gauges[KV_CACHE_USAGE] == 0.9


def test_labels_are_summed_over() -> None:
    reading = parse_engine(engine_text(kv=0.25, engines=2), 0.0)
    assert reading.gauges[KV_CACHE_USAGE] == 0.5
    assert reading.counters["vllm:request_success_total"] == 12


def test_rates_are_counter_deltas_over_the_time_between_scrapes() -> None:
    first = parse_engine(engine_text(), at_s=10.0)
    second = parse_engine(
        engine_text(prompt=1400, generation=700, success=(14, 4), ttft_sum=7.0, ttft_count=16),
        at_s=12.0,
    )
    values = engine_values(first, second)
    assert values[PROMPT_TOKENS_PER_S] == 200
    assert values[GENERATION_TOKENS_PER_S] == 100
    assert values[REQUESTS_PER_S] == 3
    assert values[TTFT_MEAN_S] == pytest.approx(0.5)


def test_no_first_token_in_the_interval_leaves_ttft_unknown() -> None:
    first = parse_engine(engine_text(), at_s=0.0)
    values = engine_values(first, parse_engine(engine_text(), at_s=1.0))
    assert TTFT_MEAN_S not in values
    assert values[PROMPT_TOKENS_PER_S] == 0


def test_a_counter_reset_is_unknown_not_negative() -> None:
    first = parse_engine(engine_text(prompt=1000), at_s=0.0)
    values = engine_values(first, parse_engine(engine_text(prompt=10), at_s=1.0))
    assert PROMPT_TOKENS_PER_S not in values
    assert values[GENERATION_TOKENS_PER_S] == 0


def test_missing_series_are_absent_not_zero() -> None:
    text = '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine="0"} 2\n'
    assert engine_values(None, parse_engine(text, 0.0)) == {REQUESTS_WAITING: 2}


def test_malformed_text_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse_engine("vllm:num_requests_waiting{engine= 2 3 x\n", 0.0)


ROUTER = """\
# TYPE shoal_router_arrivals counter
shoal_router_arrivals_total{model="a"} 100
shoal_router_arrivals_total{model="b"} 50
# TYPE shoal_router_in_flight gauge
shoal_router_in_flight{model="a"} 6
shoal_router_in_flight{model="b"} 1
# TYPE shoal_router_held_requests gauge
shoal_router_held_requests{model="a"} 2
"""


def test_router_values_are_for_the_model() -> None:
    first = parse_router(ROUTER, 0.0, model="a")
    second = parse_router(ROUTER.replace(" 100", " 130"), 2.0, model="a")
    assert router_values(first, second) == {
        ROUTER_IN_FLIGHT: 6,
        ROUTER_HELD: 2,
        ROUTER_ARRIVALS_PER_S: 15,
    }


def test_router_without_a_model_sums_every_model_and_misses_nothing_it_lacks() -> None:
    reading = parse_router(ROUTER, 0.0)
    assert router_values(None, reading) == {ROUTER_IN_FLIGHT: 7, ROUTER_HELD: 2}
    assert router_values(None, parse_router(ROUTER, 0.0, model="c")) == {}


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf"])
def test_a_non_finite_engine_value_is_unknown_not_kept(bad: str) -> None:
    first = parse_engine(engine_text(kv=float(bad), prompt=1000, engines=2), 0.0)
    second = parse_engine(engine_text(kv=float(bad), prompt=float(bad), waiting=5), 2.0)
    values = engine_values(first, second)
    assert KV_CACHE_USAGE not in values  # one engine label's NaN: the whole sum is unknown
    assert PROMPT_TOKENS_PER_S not in values
    assert values[REQUESTS_WAITING] == 5
    assert values[GENERATION_TOKENS_PER_S] == 0


@pytest.mark.parametrize("bad", ["NaN", "+Inf"])
def test_a_non_finite_router_value_is_unknown_not_kept(bad: str) -> None:
    text = ROUTER.replace('in_flight{model="b"} 1', f'in_flight{{model="b"}} {bad}')
    first = parse_router(text, 0.0)
    second = parse_router(text.replace(" 100", f" {bad}"), 2.0)
    assert router_values(first, second) == {ROUTER_HELD: 2}


def test_a_rate_that_overflows_is_unknown() -> None:
    first = parse_engine(engine_text(prompt=-1.7e308), 0.0)
    second = parse_engine(engine_text(prompt=1.7e308), 1.0)
    assert PROMPT_TOKENS_PER_S not in engine_values(first, second)
