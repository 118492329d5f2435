"""State shared by router replicas through Redis: in-flight counts and rate limits.

Invariant: a Redis failure never fails a request. Every call to Redis is bounded
(``timeout_s``, no client-side retries); on a failure this replica logs once per
``log_interval_s``, counts it (``statistics().redis_failures``), falls back to its own
local view and tries Redis again after ``retry_s``. Only ``start``/``connect`` (and a
constructor given a malformed URL) raise, and only ``ConfigError`` (a bad URL, a wrong
password, no Redis there): a replica started with ``--redis`` that could not share would
silently split the fleet's view.

In-flight counts (``RedisLedger``, the ``Ledger`` protocol of ``router/ledger.py``).
The request path does no I/O: ``acquire``/``first_token``/``release`` change this
replica's own exact counts. One Lua script (one round trip, atomic) publishes them and
reads everyone else's::

    shoal:router:{ledger}:replicas   ZSET  replica id -> expiry (ms, Redis clock)
    shoal:router:{ledger}:counts     HASH  "<replica id>|<engine id>" -> "<in flight> <tokens>"

    script(me, ttl, my counts):  ZADD me now+ttl; drop replicas whose expiry passed and
        every field of a replica that is not live; replace my fields; return the others'

It runs from ``refresh()`` (the proxy calls it on a timer or per request; it syncs at
most every ``refresh_interval_s``, never twice at once) and from a background task, soon after
the local counts change and at least every ``ttl_s / 3`` (the heartbeat). A replica that
crashes stops renewing its expiry, and the next script run by any replica drops its
counts: a dead replica's requests stop loading engines after ``ttl_s``. ``snapshot()``
(no I/O) is the last totals of the *other* replicas plus this replica's exact counts, so
a replica's own decisions are never stale about its own requests.

Rate limits (``RedisLimiter``, the ``Limiter`` protocol of ``router/limits.py``): GCRA
(the generic cell rate algorithm, a token bucket stored as one "theoretical arrival time"
per bucket) per user for requests and tokens per minute and per model for requests per
second. Each bucket holds a whole period's budget (a fresh user may spend a minute's
RPM at once, then refills continuously). One Lua script checks every bucket a request
touches against Redis's clock and charges all of them or none, so two replicas together
admit exactly the budget, and a request refused for tokens spends no request. As in
``InMemoryLimiter`` (``router/limits.py``): anonymous requests share the user ``""``, and a
request's cost is capped at its bucket's capacity (a request larger than a minute's TPM
passes on a full bucket instead of never).

Keys are namespaced ``shoal:router:`` (``key_prefix``), and every key a script touches is
declared to it. Written for one Redis server (Debian's ``redis-server``, or a managed
primary); the ledger's two keys share a hash tag, the limiter's keys of one request do
not, so a Redis Cluster would need per-user hash tags first. Password and TLS come
through the URL (``redis://:PASSWORD@host:6379/0``, ``rediss://`` for TLS,
``unix:///path?password=``).

Rejected: a hash per replica expiring through its own key TTL -- summing them
needs a SCAN of the keyspace or keys not declared to the script; HINCRBY per request
(a Redis round trip on every request's path, twice); a sliding-window log of timestamps
for limits (memory per request, and TPM needs weighted entries); fixed windows (twice
the budget across a window boundary).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from shoal.errors import ConfigError

__all__ = [
    "KEY_PREFIX",
    "RedisLedger",
    "RedisLimiter",
    "SharedStats",
    "check_redis",
    "redact_url",
    "redis_client",
]

log = logging.getLogger("shoal." + __name__)

KEY_PREFIX = "shoal:router:"

# What a Redis call can fail with, once translated: the client's errors, a socket error
# below it, and our own bound on the call.
_REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


def redact_url(url: str) -> str:
    """``url`` without its password (in the authority or a ``password=`` query), for logs
    and error messages."""
    password = urlsplit(url).password
    if password:
        url = url.replace(f":{password}@", ":***@", 1)
    return re.sub(r"([?&])password=[^&#]*", r"\1password=***", url)


def redis_client(url: str, *, timeout_s: float = 0.2) -> aioredis.Redis:
    """A client of the Redis at ``url`` (nothing is sent yet): every call bounded by
    ``timeout_s`` (connect and read) and never retried by the client. ``ConfigError`` for a
    URL redis-py cannot parse."""
    try:
        return aioredis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            client_name="shoal-router",
        )
    except ValueError as exc:
        raise ConfigError(
            f"--redis {redact_url(url)!r} is not a Redis URL ({exc}); use "
            "redis://[:PASSWORD@]HOST:PORT/DB, rediss:// for TLS or unix:///PATH"
        ) from None


async def check_redis(client: aioredis.Redis, url: str, *, timeout_s: float = 0.2) -> None:
    """PING; ``ConfigError`` naming the fix when Redis refuses the password (or wants
    one), refuses PING, or does not answer at all."""
    shown = redact_url(url)
    try:
        await asyncio.wait_for(client.ping(), timeout_s * 2)
    except AuthenticationError as exc:
        raise ConfigError(
            f"Redis at {shown} refused the credentials ({exc}); put the right password in the "
            "URL: redis://:PASSWORD@HOST:PORT (or redis://USER:PASSWORD@... with ACLs)"
        ) from None
    except ResponseError as exc:  # e.g. NOPERM for an ACL user without PING
        raise ConfigError(f"Redis at {shown} refused PING ({exc}); check the user's ACL") from None
    except _REDIS_FAILURES as exc:
        if "SSL" in str(exc) or "certificate" in str(exc):
            raise ConfigError(
                f"TLS with Redis at {shown} failed ({exc}); name the CA that signed its "
                "certificate: rediss://...?ssl_ca_certs=/path/ca.crt"
            ) from None
        raise ConfigError(
            f"no Redis answers at {shown} ({type(exc).__name__}: {exc}); start it, or leave "
            "--redis out to keep the router's state in memory (one replica)"
        ) from None


@dataclass(frozen=True, slots=True)
class SharedStats:
    """What a shared-state client has seen of Redis (for ``/metrics`` and tests)."""

    redis_calls: int  # calls that succeeded
    redis_failures: int  # calls that failed (each one served from the local view)
    degraded: bool  # the last call failed: decisions use this replica's view only
    replicas: int  # live router replicas at the last successful ledger sync (this one too)


class _Outage:
    """Failure bookkeeping shared by the ledger and the limiter: count, log once per
    interval, back off before the next try."""

    def __init__(self, what: str, url: str, clock: Callable[[], float], *,
                 retry_s: float, log_interval_s: float) -> None:  # fmt: skip
        self.what = what
        self.url = url
        self.clock = clock
        self.retry_s = retry_s
        self.log_interval_s = log_interval_s
        self.calls = 0
        self.failures = 0
        self.degraded = False
        self.retry_at = -math.inf
        self._logged_at = -math.inf

    def may_try(self) -> bool:
        return self.clock() >= self.retry_at

    def ok(self) -> None:
        self.calls += 1
        if self.degraded:
            log.info("Redis is back: %s is shared again", self.what, extra={"redis": self.url})
        self.degraded = False

    def failed(self, exc: BaseException) -> None:
        self.failures += 1
        self.degraded = True
        now = self.clock()
        self.retry_at = now + self.retry_s
        if now - self._logged_at >= self.log_interval_s:
            self._logged_at = now
            log.warning(
                "Redis failed (%s: %s); %s falls back to this replica's own view "
                "(%d failures so far)", type(exc).__name__, exc, self.what, self.failures,
                extra={"redis": self.url},
            )  # fmt: skip


# -- in-flight counts ---------------------------------------------------------------

_LEDGER_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[2], now + ttl, me)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local live = {}
local num_live = 0
for _, r in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  live[r] = true
  num_live = num_live + 1
end
local out = {}
local fields = redis.call('HGETALL', KEYS[1])
for i = 1, #fields, 2 do
  local f = fields[i]
  local sep = string.find(f, '|', 1, true)
  local r = sep and string.sub(f, 1, sep - 1) or ''
  if r == me or not live[r] then
    redis.call('HDEL', KEYS[1], f)
  else
    out[#out + 1] = f
    out[#out + 1] = fields[i + 1]
  end
end
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], me .. '|' .. ARGV[i], ARGV[i + 1])
end
local keep = ttl * 10
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return {num_live, out}
"""

_LEAVE_SCRIPT = """
redis.call('ZREM', KEYS[2], ARGV[1])
local fields = redis.call('HKEYS', KEYS[1])
local prefix = ARGV[1] .. '|'
for _, f in ipairs(fields) do
  if string.sub(f, 1, #prefix) == prefix then redis.call('HDEL', KEYS[1], f) end
end
return 0
"""


class RedisLedger:
    """In-flight requests and pending prompt tokens per engine, summed over every live
    router replica (see the module docstring).

    ``RedisLedger(url)`` sends nothing; ``await start()`` checks Redis (``ConfigError`` for
    a wrong password or no Redis: call it at startup), syncs once and starts the
    heartbeat. A ledger never started starts its heartbeat at the first ``acquire`` or
    ``refresh``, degrading instead of raising. ``await RedisLedger.connect(url)`` is both steps.
    """

    def __init__(
        self,
        redis: str | aioredis.Redis,
        *,
        url: str = "",
        replica_id: str | None = None,
        key_prefix: str = KEY_PREFIX,
        refresh_interval_s: float = 0.02,
        ttl_s: float = 3.0,
        timeout_s: float = 0.2,
        retry_s: float = 1.0,
        log_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (0 < refresh_interval_s < ttl_s):
            raise ConfigError(
                f"refresh interval {refresh_interval_s}s must be in (0, ttl {ttl_s}s)"
            )
        if isinstance(redis, str):
            url, redis = redis, redis_client(redis, timeout_s=timeout_s)
        self._client = client = redis
        self._url = url
        self.replica_id = replica_id or uuid.uuid4().hex
        assert "|" not in self.replica_id, "a replica id separates fields with '|'"
        tag = f"{key_prefix}{{ledger}}:"  # one hash slot for both keys (Redis Cluster)
        self._keys = [tag + "counts", tag + "replicas"]
        self.refresh_interval_s = refresh_interval_s
        self.ttl_s = ttl_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._outage = _Outage("the in-flight ledger", redact_url(url), clock,
                               retry_s=retry_s, log_interval_s=log_interval_s)  # fmt: skip
        self._sync_script = client.register_script(_LEDGER_SCRIPT)
        self._leave_script = client.register_script(_LEAVE_SCRIPT)
        self._local: dict[str, list[int]] = {}  # engine -> [in flight, pending tokens]
        self._others: dict[str, tuple[int, int]] = {}
        self._num_replicas = 1
        self._synced_at = -math.inf
        self._syncing = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> RedisLedger:
        """A started ledger on the Redis at ``url`` (``ConfigError`` if Redis cannot be
        used, see ``check_redis``)."""
        ledger = cls(url, **kwargs)
        try:
            await ledger.start()
        except ConfigError:
            await ledger._client.aclose()
            raise
        return ledger

    async def start(self) -> None:
        """Check Redis, sync once and start the heartbeat; a second call does nothing."""
        if self._task is not None:
            return
        await check_redis(self._client, self._url, timeout_s=self.timeout_s)
        await self._sync()
        self._start_heartbeat()

    def _start_heartbeat(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    # -- the request path (no I/O) ----------------------------------------------------

    async def acquire(self, engine_id: str, tokens: int) -> None:
        self._start_heartbeat()  # a ledger nobody started shares from its first request
        counts = self._local.setdefault(engine_id, [0, 0])
        counts[0] += 1
        counts[1] += max(0, tokens)
        self._changed.set()

    async def first_token(self, engine_id: str, tokens: int) -> None:
        counts = self._local.get(engine_id)
        if counts is not None:
            counts[1] = max(0, counts[1] - tokens)
            self._changed.set()

    async def release(self, engine_id: str, tokens_pending: int) -> None:
        counts = self._local.get(engine_id)
        if counts is None:
            return
        counts[0] = max(0, counts[0] - 1)
        counts[1] = max(0, counts[1] - tokens_pending)
        if counts == [0, 0]:
            del self._local[engine_id]
        self._changed.set()

    def snapshot(self) -> Mapping[str, tuple[int, int]]:
        """Engine -> (in flight, pending tokens): the other replicas' at the last sync
        plus this replica's own, exact."""
        totals = dict(self._others)
        for engine_id, (num, tokens) in self._local.items():
            other_num, other_tokens = totals.get(engine_id, (0, 0))
            totals[engine_id] = (other_num + num, other_tokens + tokens)
        return totals

    def statistics(self) -> SharedStats:
        o = self._outage
        return SharedStats(o.calls, o.failures, o.degraded, self._num_replicas)

    # -- syncing ----------------------------------------------------------------------

    async def refresh(self) -> None:
        """Pull the other replicas' counts (and push ours) unless that was done less than
        ``refresh_interval_s`` ago, is under way, or Redis is failing (then at once)."""
        self._start_heartbeat()
        if self._syncing or self._clock() - self._synced_at < self.refresh_interval_s:
            return
        await self._sync()

    async def _sync(self) -> None:
        if self._syncing or not self._outage.may_try():
            return
        self._syncing = True
        self._changed.clear()
        mine: list[str] = []
        for engine_id, (num, tokens) in self._local.items():
            mine += [engine_id, f"{num} {tokens}"]
        args: list[str | int] = [self.replica_id, max(1, int(self.ttl_s * 1000)), *mine]
        try:
            num_live, flat = await asyncio.wait_for(
                self._sync_script(keys=self._keys, args=args), self.timeout_s
            )
        except _REDIS_FAILURES as exc:
            self._outage.failed(exc)
            self._others = {}  # the local view: what other replicas do is unknown now
            self._num_replicas = 1
            return
        finally:
            self._syncing = False
            self._synced_at = self._clock()
        self._outage.ok()
        self._others = _sum_fields(flat)
        self._num_replicas = int(num_live)

    async def _keep_alive(self) -> None:
        """Push soon after local changes (at most every ``refresh_interval_s``) and at
        least every ``ttl_s / 3``, so a live replica never expires; while Redis is out,
        only when the next try is due."""
        heartbeat_s = self.ttl_s / 3
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), heartbeat_s)
            await self._sync()
            backoff = self._outage.retry_at - self._clock() if self._outage.degraded else 0.0
            await asyncio.sleep(max(self.refresh_interval_s, backoff))

    async def close(self) -> None:
        """Stop the heartbeat, withdraw this replica's counts (best effort), disconnect."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(*_REDIS_FAILURES):
            await asyncio.wait_for(
                self._leave_script(keys=self._keys, args=[self.replica_id]), self.timeout_s
            )
        await self._client.aclose()


def _sum_fields(flat: list[str]) -> dict[str, tuple[int, int]]:
    """``["<replica>|<engine>", "<n> <tokens>", ...]`` -> engine -> summed counts."""
    totals: dict[str, tuple[int, int]] = {}
    for field, value in zip(flat[::2], flat[1::2], strict=True):
        engine_id = field.partition("|")[2]
        num_text, _, tokens_text = value.partition(" ")
        try:
            num, tokens = int(num_text), int(tokens_text)
        except ValueError:
            continue  # not ours to trust: written by something else under our prefix
        old_num, old_tokens = totals.get(engine_id, (0, 0))
        totals[engine_id] = (old_num + num, old_tokens + tokens)
    return totals


# -- rate limits --------------------------------------------------------------------

_LIMIT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait = 0
local tats = {}
for i, key in ipairs(KEYS) do
  local inc = tonumber(ARGV[2 * i - 1])
  local tau = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local over = tat + inc - now - tau
  if over > wait then wait = over end
  tats[i] = tat + inc
end
if wait > 0 then return math.ceil(wait) end
for i, key in ipairs(KEYS) do
  local ttl = math.ceil((tats[i] - now) / 1000) + 1
  redis.call('SET', key, string.format('%.0f', tats[i]), 'PX', ttl)
end
return 0
"""


@dataclass(frozen=True, slots=True)
class _Limits:
    """Budgets; 0 turns a limit off."""

    user_rpm: int = 0  # requests per minute per user
    user_tpm: int = 0  # tokens (prompt + max_tokens, as the proxy counts) per minute per user
    model_rps: float = 0.0  # requests per second per model

    def __post_init__(self) -> None:
        if self.user_rpm < 0 or self.user_tpm < 0 or self.model_rps < 0:
            raise ConfigError(f"rate limits must be >= 0 (0 = off), got {self}")


@dataclass(frozen=True, slots=True)
class _Charge:
    """One bucket's part of a request: GCRA's increment and tolerance, in microseconds."""

    key: str
    increment_us: float
    tolerance_us: float


def _charges(limits: _Limits, prefix: str, user: str, model: str,
             tokens: int) -> list[_Charge]:  # fmt: skip
    """The buckets a request touches. A bucket of budget B per period P refills one unit
    every P/B and holds max(B, 1) units; a request costs at most a full bucket."""
    out: list[_Charge] = []

    def charge(kind: str, who: str, budget: float, period_s: float, cost: int) -> None:
        unit_us = period_s * 1e6 / budget
        capacity = max(budget, 1.0)  # below 1 per period, one request still fits a bucket
        out.append(
            _Charge(
                f"{prefix}limit:{kind}:{who}", min(cost, capacity) * unit_us, capacity * unit_us
            )
        )

    if limits.user_rpm:
        charge("rpm", user, limits.user_rpm, 60.0, 1)
    if limits.user_tpm:
        charge("tpm", user, limits.user_tpm, 60.0, max(0, tokens))
    if limits.model_rps:
        charge("rps", model, limits.model_rps, 1.0, 1)
    return out


class _LocalBuckets:
    """The same GCRA in this process: the limiter's view while Redis is out."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}

    def admit(self, charges: list[_Charge]) -> float | None:
        now = self._clock() * 1e6
        wait = 0.0
        tats = []
        for c in charges:
            tat = max(self._tats.get(c.key, now), now)
            wait = max(wait, tat + c.increment_us - now - c.tolerance_us)
            tats.append(tat + c.increment_us)
        if wait > 0:
            return wait / 1e6
        for c, tat in zip(charges, tats, strict=True):
            self._tats[c.key] = tat
        if len(self._tats) > 100_000:  # bounded: forget buckets that are full again
            self._tats = {k: t for k, t in self._tats.items() if t > now}
        return None


class RedisLimiter:
    """Per-user RPM/TPM and per-model RPS shared by every replica (module docstring).

    ``admit`` returns None (admitted, charged) or the seconds until the request would be
    admitted (nothing charged).
    """

    def __init__(
        self,
        redis: str | aioredis.Redis,
        *,
        user_rpm: int = 0,
        user_tpm: int = 0,
        model_rps: float = 0.0,
        url: str = "",
        key_prefix: str = KEY_PREFIX,
        timeout_s: float = 0.2,
        retry_s: float = 1.0,
        log_interval_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = _Limits(user_rpm, user_tpm, model_rps)
        if isinstance(redis, str):
            url, redis = redis, redis_client(redis, timeout_s=timeout_s)
        self._client = client = redis
        self._url = url
        self._prefix = key_prefix
        self.timeout_s = timeout_s
        self._outage = _Outage("rate limiting", redact_url(url), clock,
                               retry_s=retry_s, log_interval_s=log_interval_s)  # fmt: skip
        self._script = client.register_script(_LIMIT_SCRIPT)
        self._local = _LocalBuckets(clock)

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> RedisLimiter:
        """A limiter on the Redis at ``url``, checked (``ConfigError``, see ``check_redis``)."""
        limiter = cls(url, **kwargs)
        try:
            await limiter.start()
        except ConfigError:
            await limiter._client.aclose()
            raise
        return limiter

    async def start(self) -> None:
        """Check Redis (call at startup; without it the first ``admit`` finds out, and
        degrades instead of raising)."""
        await check_redis(self._client, self._url, timeout_s=self.timeout_s)

    async def admit(self, user: str, model: str, tokens: int) -> float | None:
        charges = _charges(self.limits, self._prefix, user, model, tokens)
        if not charges:
            return None
        if not self._outage.may_try():
            return self._local.admit(charges)
        args: list[float] = []
        for c in charges:
            args += [c.increment_us, c.tolerance_us]
        try:
            wait_us = await asyncio.wait_for(
                self._script(keys=[c.key for c in charges], args=args), self.timeout_s
            )
        except _REDIS_FAILURES as exc:
            self._outage.failed(exc)
            return self._local.admit(charges)
        self._outage.ok()
        wait_us = int(wait_us)
        return None if wait_us <= 0 else wait_us / 1e6

    def statistics(self) -> SharedStats:
        o = self._outage
        return SharedStats(o.calls, o.failures, o.degraded, 0)

    async def close(self) -> None:
        await self._client.aclose()
