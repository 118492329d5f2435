"""The pure parts of the Redis-shared state: the GCRA buckets the limiter falls back to
while Redis is out (the same arithmetic as its Lua script), in virtual time; how a
request's cost maps onto buckets; summing other replicas' counts; URLs in logs."""

from __future__ import annotations

import pytest

from router.shared import _charges, _Limits, _LocalBuckets, _sum_fields, redact_url
from shoal.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_holds_a_periods_budget_then_refills_one_unit_per_interval() -> None:
    clock = Clock()
    buckets = _LocalBuckets(clock)
    charges = _charges(_Limits(user_rpm=6), "p:", "alice", "m", 1)
    assert [buckets.admit(charges) for _ in range(6)] == [None] * 6
    assert buckets.admit(charges) == pytest.approx(10.0)  # one request per 10 s
    clock.now += 9.5
    assert buckets.admit(charges) == pytest.approx(0.5)
    clock.now += 0.5
    assert buckets.admit(charges) is None
    assert buckets.admit(charges) == pytest.approx(10.0)
    clock.now += 3600  # idle: full again, never more than full
    assert [buckets.admit(charges) for _ in range(7)][-2:] == [None, pytest.approx(10.0)]


def test_every_bucket_of_a_request_is_charged_or_none() -> None:
    clock = Clock()
    buckets = _LocalBuckets(clock)
    limits = _Limits(user_rpm=10, user_tpm=100, model_rps=1000)
    assert buckets.admit(_charges(limits, "p:", "alice", "m", 90)) is None
    wait = buckets.admit(_charges(limits, "p:", "alice", "m", 20))  # 110 > 100 tokens
    assert wait == pytest.approx(10 * 60 / 100)  # until 10 tokens refilled
    # the refused request spent no request: 9 more fit the RPM budget
    assert [buckets.admit(_charges(limits, "p:", "alice", "m", 1)) for _ in range(9)] == [None] * 9
    assert buckets.admit(_charges(limits, "p:", "alice", "m", 1)) is not None


def test_costs_are_capped_at_a_bucket_and_a_rate_below_one_still_fits_one() -> None:
    limits = _Limits(user_tpm=1000, model_rps=0.5)
    tpm, rps = _charges(limits, "shoal:router:", "", "tiny", 5000)
    assert tpm.key == "shoal:router:limit:tpm:" and rps.key == "shoal:router:limit:rps:tiny"
    assert tpm.increment_us == tpm.tolerance_us == 60e6  # a whole minute, not never
    assert rps.increment_us == rps.tolerance_us == 2e6  # one request per 2 s
    assert _charges(_Limits(), "p:", "alice", "m", 10) == []
    with pytest.raises(ConfigError, match=">= 0"):
        _Limits(user_rpm=-1)


def test_other_replicas_counts_are_summed_per_engine() -> None:
    flat = ["r1|http://e1:8000", "2 300", "r2|http://e1:8000", "1 5",
            "r2|http://e2:8000", "4 0", "r3|http://e2:8000", "garbage"]  # fmt: skip
    assert _sum_fields(flat) == {"http://e1:8000": (3, 305), "http://e2:8000": (4, 0)}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        (
            "rediss://user:pw@h:6380/1?ssl_ca_certs=/ca",
            "rediss://user:***@h:6380/1?ssl_ca_certs=/ca",
        ),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/r.sock?db=0&password=pw", "unix:///run/r.sock?db=0&password=***"),
    ],
)
def test_passwords_never_reach_a_log_line(url: str, shown: str) -> None:
    assert redact_url(url) == shown
