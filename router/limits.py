"""Rate limits: per-user requests and tokens per minute, per-model requests per second.

Each limit is a token bucket (``TokenBucket``, a pure class with the time passed in): it
holds at most ``capacity`` (one minute's worth for RPM/TPM, one second's for RPS, so a
burst of a full period is allowed after an idle one) and refills continuously at
``rate`` per second. A request costs 1 from the user's RPM and the model's RPS bucket and
``prompt + max_tokens`` from the user's TPM bucket (capped at the capacity, so one
oversized request can still pass on a full bucket instead of never).

Invariant: ``admit`` takes from every bucket or from none: it first asks each bucket how
long until it could pay, and answers the longest wait (the Retry-After) without taking
anything when one cannot pay now. A limit of 0 is off.

The identity is the request's user (header ``x-user``, the body's ``user`` or the API
key's user from the map ``load_api_keys`` reads); anonymous requests share the user
``""``. Several router replicas share buckets through Redis (``router/shared.py``'s
``RedisLimiter``, same Protocol). Rejected: fixed one-minute windows (a client can spend
two minutes' budget across a window boundary).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from shoal.errors import ConfigError

__all__ = ["InMemoryLimiter", "Limiter", "TokenBucket", "load_api_keys"]


class Limiter(Protocol):
    async def admit(self, user: str, model: str, tokens: int) -> float | None: ...

    async def close(self) -> None: ...


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; starts full."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        assert capacity > 0 and rate > 0, f"bucket needs capacity and rate > 0: {capacity}, {rate}"
        self.capacity, self.rate = capacity, rate
        self.level, self.stamp = capacity, now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait_s(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` can be paid (0 = now)."""
        self._refill(now)
        cost = min(cost, self.capacity)
        return 0.0 if self.level >= cost else (cost - self.level) / self.rate

    def take(self, cost: float, now: float) -> None:
        self._refill(now)
        self.level -= min(cost, self.capacity)


class InMemoryLimiter:
    """This process's buckets (one router replica)."""

    def __init__(
        self,
        *,
        user_rpm: float = 0,
        user_tpm: float = 0,
        model_rps: float = 0,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = 100_000,
    ) -> None:
        self._user_rpm, self._user_tpm, self._model_rps = user_rpm, user_tpm, model_rps
        self._clock = clock
        self._max_buckets = max_buckets
        self._buckets: dict[tuple[str, str], TokenBucket] = {}

    def _bucket(self, kind: str, key: str, capacity: float, period_s: float) -> TokenBucket:
        bucket = self._buckets.get((kind, key))
        if bucket is None:
            if len(self._buckets) >= self._max_buckets:  # bounded memory: forget full ones
                now = self._clock()
                for old in [k for k, b in self._buckets.items() if b.wait_s(b.capacity, now) == 0]:
                    del self._buckets[old]
            bucket = TokenBucket(capacity, capacity / period_s, self._clock())
            self._buckets[(kind, key)] = bucket
        return bucket

    def admit_nowait(self, user: str, model: str, tokens: int) -> float | None:
        now = self._clock()
        charges: list[tuple[TokenBucket, float]] = []
        if self._user_rpm:
            charges.append((self._bucket("rpm", user, self._user_rpm, 60.0), 1.0))
        if self._user_tpm:
            charges.append((self._bucket("tpm", user, self._user_tpm, 60.0), float(tokens)))
        if self._model_rps:
            charges.append((self._bucket("rps", model, self._model_rps, 1.0), 1.0))
        wait = max((bucket.wait_s(cost, now) for bucket, cost in charges), default=0.0)
        if wait > 0:
            return wait
        for bucket, cost in charges:
            bucket.take(cost, now)
        return None

    async def admit(self, user: str, model: str, tokens: int) -> float | None:
        return self.admit_nowait(user, model, tokens)

    async def close(self) -> None:
        self._buckets.clear()


def load_api_keys(path: str | Path) -> dict[str, str]:
    """API key -> user, from a JSON object or from ``KEY USER`` lines (``#`` comments)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --api-keys file {path}: {exc.strerror}") from None
    if text.lstrip().startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--api-keys file {path} is not valid JSON: {exc}") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in document.items()):
            raise ConfigError(f"--api-keys file {path}: keys and users must be strings")
        return dict(document)
    keys: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ConfigError(f"--api-keys file {path} line {number}: expected 'KEY USER'")
        keys[parts[0]] = parts[1]
    return keys
