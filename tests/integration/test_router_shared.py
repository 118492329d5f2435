"""Router replicas sharing in-flight counts and rate limits through a real redis-server.

Each test starts its own ``redis-server`` (no persistence, loopback and a unix socket) and
stops it in ``finally``; replicas are ``RedisLedger``/``RedisLimiter`` instances, and a
crashed replica is a real process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from router.shared import RedisLedger, RedisLimiter
from shoal.errors import ConfigError
from tests.integration.conftest import ENV, free_port
from tests.integration.redis_server import RedisProcess, running_redis, start_redis, stop_redis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    with running_redis(tmp_path) as server:
        yield server


async def _until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return False


# -- in-flight counts ---------------------------------------------------------------


def test_two_replicas_see_each_others_in_flight_counts(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a = await RedisLedger.connect(redis_server.url, refresh_interval_s=0.01)
        # built as the router builds it: synchronously, started by its first refresh
        b = RedisLedger(redis_server.unix_url, refresh_interval_s=0.01)
        try:
            await a.acquire("e1", 100)
            await a.acquire("e1", 200)
            await b.acquire("e1", 50)
            await b.acquire("e2", 7)
            # each replica's own counts are exact at once, before any sync
            assert a.snapshot() == {"e1": (2, 300)}

            async def both_see(expected: dict[str, tuple[int, int]]) -> bool:
                await a.refresh()
                await b.refresh()
                return dict(a.snapshot()) == expected and dict(b.snapshot()) == expected

            assert await _until(lambda: both_see({"e1": (3, 350), "e2": (1, 7)})), (
                a.snapshot(), b.snapshot())  # fmt: skip
            assert a.statistics().replicas == 2

            await a.first_token("e1", 100)  # prompt of the first request is done
            await b.release("e2", 7)  # finished before its first token
            await a.release("e1", 0)
            assert await _until(lambda: both_see({"e1": (2, 250)})), (a.snapshot(), b.snapshot())
            assert not a.statistics().degraded and a.statistics().redis_failures == 0
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


_CRASHING_REPLICA = """
import asyncio, sys
from router.shared import RedisLedger

async def main():
    ledger = await RedisLedger.connect(sys.argv[1], ttl_s=float(sys.argv[2]))
    for _ in range(3):
        await ledger.acquire("e1", 40)
    await ledger.refresh()
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_a_crashed_replicas_counts_expire(redis_server: RedisProcess) -> None:
    ttl_s = 1.0
    replica = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_REPLICA, redis_server.url, str(ttl_s)],
        env=ENV, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert replica.stdout is not None
        assert replica.stdout.readline().strip() == "ready"

        async def main() -> None:
            b = await RedisLedger.connect(redis_server.url, refresh_interval_s=0.01, ttl_s=ttl_s)
            try:
                await b.acquire("e1", 1)

                async def sees(expected: dict[str, tuple[int, int]]) -> bool:
                    await b.refresh()
                    return dict(b.snapshot()) == expected

                # alive: its heartbeat keeps its counts well past one ttl
                await asyncio.sleep(ttl_s * 1.5)
                assert await sees({"e1": (4, 121)}), b.snapshot()
                assert b.statistics().replicas == 2
                replica.send_signal(signal.SIGKILL)
                replica.wait(timeout=10)
                killed_at = time.monotonic()
                assert await _until(lambda: sees({"e1": (1, 1)}), timeout=ttl_s + 3), b.snapshot()
                assert time.monotonic() - killed_at > ttl_s * 0.5  # expired, not dropped at once
                assert b.statistics().replicas == 1
            finally:
                await b.close()

        asyncio.run(main())
    finally:
        if replica.poll() is None:
            replica.kill()
        replica.wait(timeout=10)
        if replica.stdout is not None:
            replica.stdout.close()


def test_a_closed_replica_withdraws_its_counts_at_once(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a = await RedisLedger.connect(redis_server.url, refresh_interval_s=0.01, ttl_s=30)
        b = await RedisLedger.connect(redis_server.url, refresh_interval_s=0.01, ttl_s=30)
        try:
            await a.acquire("e1", 10)

            async def b_sees(expected: dict[str, tuple[int, int]]) -> bool:
                await b.refresh()
                return dict(b.snapshot()) == expected

            assert await _until(lambda: b_sees({"e1": (1, 10)}))
            await a.close()
            assert await _until(lambda: b_sees({}), timeout=2), b.snapshot()
        finally:
            await b.close()

    asyncio.run(main())


# -- rate limits --------------------------------------------------------------------


def test_two_limiters_hold_the_exact_request_budget(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a = await RedisLimiter.connect(redis_server.url, user_rpm=10)
        b = await RedisLimiter.connect(redis_server.unix_url, user_rpm=10)
        try:
            results = await asyncio.gather(
                *(limiter.admit("alice", "tiny", 1) for _ in range(15) for limiter in (a, b))
            )
            admitted = [r for r in results if r is None]
            refused = [r for r in results if r is not None]
            assert len(admitted) == 10
            # the bucket refills one request every 6 s
            assert all(0 < r <= 6.0 for r in refused), refused
            # another user has a budget of their own; anonymous requests share one
            assert await a.admit("bob", "tiny", 1) is None
            anonymous = [await (a, b)[i % 2].admit("", "tiny", 1) for i in range(12)]
            assert anonymous.count(None) == 10 and anonymous[-1] is not None
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_a_request_refused_for_tokens_spends_no_request(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a = await RedisLimiter.connect(redis_server.url, user_rpm=10, user_tpm=1000)
        b = await RedisLimiter.connect(redis_server.url, user_rpm=10, user_tpm=1000)
        try:
            assert await a.admit("alice", "tiny", 900) is None
            wait = await b.admit("alice", "tiny", 200)  # 1100 > 1000 tokens
            assert wait is not None and 0 < wait <= 60 * 100 / 1000 + 0.01, wait
            # 9 more requests fit the RPM budget (the refused one spent nothing) and the
            # TPM budget (900 + 9 x 10 = 990); the 11th request does not
            results = [await (a if i % 2 else b).admit("alice", "tiny", 10) for i in range(10)]
            assert results[:9] == [None] * 9 and results[9] is not None, results
            # more tokens than a whole minute's budget cost the whole bucket, not never
            assert await a.admit("carol", "tiny", 1500) is None
            wait = await b.admit("carol", "tiny", 1)
            assert wait is not None and 0 < wait <= 0.06 + 0.01, wait
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


def test_model_rps_is_shared(redis_server: RedisProcess) -> None:
    async def main() -> None:
        a = await RedisLimiter.connect(redis_server.url, model_rps=5)
        b = await RedisLimiter.connect(redis_server.url, model_rps=5)
        try:
            results = await asyncio.gather(
                *(limiter.admit(f"user{i}", "tiny", 1) for i in range(6) for limiter in (a, b))
            )
            assert sum(r is None for r in results) == 5
            assert all(0 < r <= 0.2 for r in results if r is not None)
            assert await a.admit("user0", "other-model", 1) is None
        finally:
            await a.close()
            await b.close()

    asyncio.run(main())


# -- Redis failures -----------------------------------------------------------------


def test_redis_killed_mid_run_degrades_to_the_local_view(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    restarted: list[RedisProcess] = []
    try:

        async def main() -> None:
            a = await RedisLedger.connect(server.url, refresh_interval_s=0.01, retry_s=0.2)
            b = await RedisLedger.connect(server.url, refresh_interval_s=0.01, retry_s=0.2)
            limiter = await RedisLimiter.connect(server.url, user_rpm=3, retry_s=0.2)
            try:
                await a.acquire("e1", 5)
                await b.acquire("e1", 6)

                async def a_sees(expected: dict[str, tuple[int, int]]) -> bool:
                    await a.refresh()
                    return dict(a.snapshot()) == expected

                assert await _until(lambda: a_sees({"e1": (2, 11)}))
                assert await limiter.admit("alice", "tiny", 1) is None

                stop_redis(server)  # SIGKILL: no goodbye to any client

                # nothing raises; the ledger falls back to this replica's own counts
                await a.acquire("e2", 3)
                assert await _until(lambda: a_sees({"e1": (1, 5), "e2": (1, 3)}))
                stats = a.statistics()
                assert stats.degraded and stats.redis_failures >= 1 and stats.replicas == 1
                # the limiter falls back to local buckets (this replica's view of the budget)
                local = [await limiter.admit("alice", "tiny", 1) for _ in range(4)]
                assert local[:3] == [None, None, None] and local[3] is not None, local
                assert limiter.statistics().degraded
                await a.release("e2", 3)
                assert a.snapshot() == {"e1": (1, 5)}

                # Redis back on the same port: sharing resumes after the retry interval
                restarted.append(start_redis(tmp_path, server.port))
                assert await _until(lambda: a_sees({"e1": (2, 11)}), timeout=5), a.snapshot()
                assert not a.statistics().degraded
            finally:
                await a.close()  # bounded and quiet, whether Redis is up or not
                await b.close()
                await limiter.close()

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        for process in [server, *restarted]:
            stop_redis(process)


def test_a_wrong_password_is_a_config_error_at_start(tmp_path: Path) -> None:
    with running_redis(tmp_path, password="s3cret-pw") as server:

        async def main() -> None:
            wrong = f"redis://:not-it@127.0.0.1:{server.port}/0"
            with pytest.raises(ConfigError, match="refused the credentials") as info:
                await RedisLedger.connect(wrong)
            assert "not-it" not in str(info.value)  # the password is never echoed
            with pytest.raises(ConfigError, match="refused the credentials"):
                await RedisLimiter.connect(f"redis://127.0.0.1:{server.port}/0")
            ledger = await RedisLedger.connect(server.url)  # the right one works
            await ledger.close()

        asyncio.run(main())


def test_no_redis_at_the_url_is_a_config_error_at_start() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="no Redis answers"):
            await RedisLedger.connect(f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(ConfigError, match="not a Redis URL"):
            await RedisLedger.connect("http://127.0.0.1:1/")

    asyncio.run(main())


def test_tls_and_a_password_come_through_the_url(tmp_path: Path) -> None:
    with running_redis(tmp_path, password="pw-tls", tls=True) as server:

        async def main() -> None:
            a = await RedisLedger.connect(server.tls_url, refresh_interval_s=0.01)
            b = await RedisLedger.connect(server.url, refresh_interval_s=0.01)  # plain port
            limiter = await RedisLimiter.connect(server.tls_url, user_rpm=1)
            try:
                await a.acquire("e1", 9)

                async def b_sees() -> bool:
                    await b.refresh()
                    return dict(b.snapshot()) == {"e1": (1, 9)}

                assert await _until(b_sees)
                assert await limiter.admit("alice", "m", 1) is None
                assert await limiter.admit("alice", "m", 1) is not None
            finally:
                await a.close()
                await b.close()
                await limiter.close()
            # a server certificate no trusted CA signed is refused, and said so at start
            untrusted = server.tls_url.partition("?")[0]
            with pytest.raises(ConfigError, match=r"TLS with Redis .*\?ssl_ca_certs=") as info:
                await RedisLedger.connect(untrusted)
            assert "pw-tls" not in str(info.value)

        asyncio.run(main())
