"""The per-engine circuit breaker, in virtual time."""

from __future__ import annotations

import pytest

from router.engines import BreakerState, CircuitBreaker, EngineSpec, parse_engines
from shoal.errors import ConfigError


def test_it_opens_after_n_consecutive_failures_only() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=5.0)
    breaker.record_failure(0.0)
    breaker.record_failure(0.1)
    breaker.record_success()  # the run of failures is broken
    breaker.record_failure(0.2)
    breaker.record_failure(0.3)
    assert breaker.state(0.3) is BreakerState.CLOSED
    assert breaker.allows(0.3)
    breaker.record_failure(0.4)
    assert breaker.state(0.4) is BreakerState.OPEN
    assert not breaker.allows(0.4)
    assert not breaker.allows(5.39)


def test_after_the_cool_down_one_probe_goes_through() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=5.0)
    breaker.record_failure(10.0)
    assert breaker.state(15.0) is BreakerState.HALF_OPEN
    assert breaker.allows(15.0)
    breaker.on_attempt(15.0)
    assert not breaker.allows(15.1)  # the probe slot is taken
    breaker.record_success()
    assert breaker.state(15.2) is BreakerState.CLOSED
    assert breaker.allows(15.2)


def test_a_failed_probe_opens_it_for_another_cool_down() -> None:
    breaker = CircuitBreaker(failures=3, cooldown_s=2.0)
    for t in (0.0, 0.1, 0.2):
        breaker.record_failure(t)
    breaker.on_attempt(2.5)
    breaker.record_failure(2.6)  # one failure is enough when half-open
    assert breaker.state(2.6) is BreakerState.OPEN
    assert not breaker.allows(4.5)
    assert breaker.allows(4.7)


def test_a_probe_that_never_reports_frees_its_slot_after_a_cool_down() -> None:
    breaker = CircuitBreaker(failures=1, cooldown_s=1.0)
    breaker.record_failure(0.0)
    breaker.on_attempt(1.0)
    assert not breaker.allows(1.5)
    assert breaker.allows(2.0)


def test_engines_parse_with_optional_streams() -> None:
    assert parse_engines("http://a:1, http://b:2/=node1/gpu0,") == [
        EngineSpec("http://a:1"),
        EngineSpec("http://b:2", "node1/gpu0"),
    ]
    assert EngineSpec("http://b:2", "node1/gpu0").node == "node1"


@pytest.mark.parametrize("text", ["a:1", "http://a:1,http://a:1", "http://a:1=gpu0"])
def test_bad_engine_lists_name_the_item(text: str) -> None:
    with pytest.raises(ConfigError, match="--engines"):
        parse_engines(text)
