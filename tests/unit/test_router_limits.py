"""Per-user RPM/TPM and per-model RPS as token buckets, with an injected clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from router.limits import InMemoryLimiter, TokenBucket, load_api_keys
from shoal.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_refills_continuously_up_to_its_capacity() -> None:
    bucket = TokenBucket(capacity=60, rate=1.0, now=0.0)
    assert bucket.wait_s(60, 0.0) == 0
    bucket.take(60, 0.0)
    assert bucket.wait_s(1, 0.0) == 1.0
    assert bucket.wait_s(1, 0.5) == 0.5
    assert bucket.wait_s(1, 1.0) == 0
    assert bucket.wait_s(60, 1000.0) == 0  # capped: no more than a full bucket
    bucket.take(60, 1000.0)
    assert bucket.wait_s(2, 1000.0) == 2.0


def test_user_rpm_admits_a_minutes_worth_then_says_when_to_retry() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(user_rpm=3, clock=clock)
    assert [limiter.admit_nowait("alice", "m", 10) for _ in range(3)] == [None, None, None]
    assert limiter.admit_nowait("alice", "m", 10) == pytest.approx(20.0)
    assert limiter.admit_nowait("bob", "m", 10) is None  # users are separate
    clock.now = 20.0
    assert limiter.admit_nowait("alice", "m", 10) is None


def test_user_tpm_counts_tokens_and_an_oversized_request_passes_a_full_bucket() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(user_tpm=600, clock=clock)
    assert limiter.admit_nowait("u", "m", 5000) is None  # capped at the capacity
    assert limiter.admit_nowait("u", "m", 10) == pytest.approx(1.0)  # 10 tokens at 10/s
    clock.now = 1.0
    assert limiter.admit_nowait("u", "m", 10) is None


def test_model_rps_is_per_model() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(model_rps=2, clock=clock)
    assert limiter.admit_nowait("a", "m1", 1) is None
    assert limiter.admit_nowait("b", "m1", 1) is None
    assert limiter.admit_nowait("c", "m1", 1) == pytest.approx(0.5)
    assert limiter.admit_nowait("c", "m2", 1) is None


def test_a_refusal_takes_from_no_bucket() -> None:
    clock = Clock()
    limiter = InMemoryLimiter(user_rpm=10, model_rps=1, clock=clock)
    assert limiter.admit_nowait("u", "m", 1) is None
    for _ in range(5):
        assert limiter.admit_nowait("u", "m", 1) is not None  # model RPS refuses
    clock.now = 1.0
    # the user's RPM bucket paid only once: 9 left
    assert [limiter.admit_nowait("u", f"m{i}", 1) for i in range(9)] == [None] * 9
    assert limiter.admit_nowait("u", "m-last", 1) is not None


def test_zero_limits_are_off() -> None:
    limiter = InMemoryLimiter()
    assert all(asyncio.run(limiter.admit("u", "m", 10**9)) is None for _ in range(100))


def test_api_keys_load_from_json_or_lines(tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text('{"sk-1": "alice", "sk-2": "bob"}')
    assert load_api_keys(tmp_path / "k.json") == {"sk-1": "alice", "sk-2": "bob"}
    (tmp_path / "k.txt").write_text("# keys\nsk-1 alice\n\nsk-2   bob  # the second\n")
    assert load_api_keys(tmp_path / "k.txt") == {"sk-1": "alice", "sk-2": "bob"}
    (tmp_path / "bad.txt").write_text("sk-1\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_api_keys(tmp_path / "bad.txt")
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_keys(tmp_path / "missing")
