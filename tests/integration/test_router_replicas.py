"""Two router processes sharing one real redis-server (``--redis``) agree (issue 12:
"several router replicas agree"): each one's ``/router/engines`` counts the requests the
other has in flight, and a per-user RPM budget holds across both."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from router.server import RouterProcess, running_router
from sim.process import SimEngineProcess, start_sim_engine
from tests.integration.conftest import free_port, wait_until
from tests.integration.redis_server import RedisProcess, running_redis

MODEL = "sim-7b"
FAST = {"health_interval_s": 0.2, "metrics_interval_s": 0.2, "models_interval_s": 0.5}


@contextlib.contextmanager
def fleet(
    tmp_path: Path, **router_flags: Any
) -> Iterator[tuple[RedisProcess, list[SimEngineProcess], list[RouterProcess]]]:
    engines: list[SimEngineProcess] = []
    with running_redis(tmp_path) as redis, contextlib.ExitStack() as stack:
        try:
            for _ in range(2):
                engines.append(start_sim_engine(free_port(), time_scale=1.0))
            urls = [engine.url for engine in engines]
            flags = {"strategy": "least-request", "redis": redis.url, **FAST, **router_flags}
            routers = [
                stack.enter_context(running_router(free_port(), engines=urls, **flags))
                for _ in range(2)
            ]
            yield redis, engines, routers
        finally:
            stack.close()  # routers before the engines and Redis they use
            for engine in engines:
                engine.stop()


def in_flight(router: RouterProcess) -> dict[str, int]:
    body = json.loads(router.request("GET", "/router/engines")[2])
    return {row["url"]: int(row["in_flight"]) for row in body["engines"]}


def test_each_replica_counts_the_others_requests_in_flight(tmp_path: Path) -> None:
    with fleet(tmp_path) as (_redis, engines, routers):
        idle = {engine.url: 0 for engine in engines}
        assert all(in_flight(r) == idle for r in routers)
        for router in routers:  # each replica's /metrics says it shares a healthy Redis
            # (with the other replica once a sync ran after both started)
            assert wait_until(
                lambda r=router: (
                    "shoal_router_replicas 2.0" in r.request("GET", "/metrics")[2].decode()
                ),
                timeout=10,
            )
            text = router.request("GET", "/metrics")[2].decode()
            assert 'shoal_router_shared_state_degraded{part="ledger"} 0.0' in text

        async def main() -> None:
            async with aiohttp.ClientSession() as session:
                replies = []
                # 3 long streams through router 0, 2 through router 1; each has its first
                # chunk before the counts are read
                for index, router in enumerate([routers[0]] * 3 + [routers[1]] * 2):
                    reply = await session.post(
                        router.url + "/v1/completions",
                        json={"model": MODEL, "prompt": f"request {index} " * 20,
                              "max_tokens": 2000, "stream": True},
                        headers={"x-user": f"user{index}"},
                    )  # fmt: skip
                    assert reply.status == 200, await reply.text()
                    await reply.content.readany()
                    replies.append(reply)

                def agreed(total: int) -> bool:
                    views = [in_flight(r) for r in routers]
                    return views[0] == views[1] and sum(views[0].values()) == total

                assert await asyncio.to_thread(wait_until, lambda: agreed(5), 10), [
                    in_flight(r) for r in routers
                ]
                for reply in replies:
                    reply.close()  # the client hangs up: the requests end
                assert await asyncio.to_thread(wait_until, lambda: agreed(0), 10), [
                    in_flight(r) for r in routers
                ]

        asyncio.run(main())


def test_a_per_user_rpm_holds_across_both_replicas(tmp_path: Path) -> None:
    with fleet(tmp_path, user_rpm=4) as (_redis, _engines, routers):
        body = {"model": MODEL, "prompt": "hello", "max_tokens": 1}
        answers = [
            routers[i % 2].request("POST", "/v1/completions", body, headers={"x-user": "alice"})
            for i in range(7)
        ]
        statuses = [status for status, _headers, _body in answers]
        assert statuses.count(200) == 4 and statuses.count(429) == 3, statuses
        assert statuses[:4] == [200] * 4
        for status, headers, _ in answers:
            if status == 429:
                assert 1 <= int(headers["Retry-After"]) <= 15  # one request per 15 s refills
        # another user's budget is untouched, on either replica
        for router in routers:
            status = router.request("POST", "/v1/completions", body, headers={"x-user": "bob"})[0]
            assert status == 200


pytestmark = pytest.mark.timeout(120)
