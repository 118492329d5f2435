"""HealthFeed against real ``shoal health watch`` processes: faults seen, a killed watcher
kept until stale and then forgotten (unknown is not sick), a watcher answering garbage or
too much kept at its last good answer, bearer tokens, a ``dns+http://`` name."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from control.health.client import MAX_REPORT_BYTES, HealthFeed
from control.health.mockfile import Injection, inject
from tests.integration.test_health_watch import WatcherProcess, start_watcher

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WatcherProcess]]:
    tmp = tmp_path_factory.mktemp("watchers")
    watchers: list[WatcherProcess] = []
    try:
        for node in ("node-a", "node-b"):
            watchers.append(start_watcher(tmp, node, interval_s=0.3))
        yield watchers
    finally:
        for w in watchers:
            w.stop()


async def until(feed: HealthFeed, predicate: Callable[[], bool], timeout: float = 15) -> None:
    async with asyncio.timeout(timeout):
        while True:
            await feed.poll()
            if predicate():
                return
            await asyncio.sleep(0.05)


def test_faults_on_two_watchers_are_the_unhealthy_gpus(two: list[WatcherProcess]) -> None:
    a, b = two
    feed = HealthFeed([a.url, b.url + "/v1/gpus/"], interval_s=0.3, clock=Clock())

    async def body() -> None:
        try:
            await feed.poll()
            assert {r.node for r in feed.reports().values()} == {"node-a", "node-b"}
            assert feed.unhealthy_gpus() == frozenset()
            inject(b.mock, Injection("temperature", 0, 99))
            await until(feed, lambda: feed.unhealthy_gpus() == {"node-b/gpu0"})
            inject(b.mock, Injection("clear", 0))
            await until(feed, lambda: feed.unhealthy_gpus() == frozenset())
        finally:
            await feed.close()

    asyncio.run(body())
    assert feed.statistics().failures == 0


def test_a_killed_watcher_is_kept_until_stale_then_forgotten(tmp_path: Path) -> None:
    clock = Clock()
    watcher = start_watcher(tmp_path, "node-k", interval_s=0.3)
    feed = HealthFeed([watcher.url], interval_s=1.0, clock=clock)  # stale after 3 s
    try:

        async def body() -> None:
            try:
                inject(watcher.mock, Injection("xid", 1, 79))
                await until(feed, lambda: feed.unhealthy_gpus() == {"node-k/gpu1"})
                watcher.proc.kill()
                watcher.proc.wait(10)
                clock.now += 2.0
                await feed.poll()  # refused: the last good answer stands
                assert feed.unhealthy_gpus() == {"node-k/gpu1"}
                assert feed.statistics().failures == 1
                clock.now += 1.5  # 3.5 s since the last answer
                await feed.poll()
                assert feed.reports() == {} and feed.unhealthy_gpus() == frozenset()
            finally:
                await feed.close()

        asyncio.run(body())
    finally:
        watcher.stop()


def test_a_dns_name_polls_every_address_it_resolves_to(tmp_path: Path) -> None:
    """``dns+http://localhost:PORT``: 127.0.0.1 (the watcher) and, where the host has
    IPv6, ::1 (nothing listens there: a failed read that changes nothing)."""
    watcher = start_watcher(tmp_path, "node-d", interval_s=0.3)
    port = watcher.url.rpartition(":")[2]
    feed = HealthFeed([f"dns+http://localhost:{port}"], interval_s=0.3, clock=Clock())
    try:

        async def body() -> None:
            try:
                inject(watcher.mock, Injection("xid", 0, 79))
                await until(feed, lambda: feed.unhealthy_gpus() == {"node-d/gpu0"})
                assert f"http://127.0.0.1:{port}" in feed.reports()
                assert {r.node for r in feed.reports().values()} == {"node-d"}
            finally:
                await feed.close()

        asyncio.run(body())
    finally:
        watcher.stop()


@asynccontextmanager
async def stand_in(answers: list[tuple[int, bytes]]) -> AsyncIterator[str]:
    """A 'watcher' answering ``answers`` in turn (the last one for ever)."""

    async def reply(request: web.Request) -> web.Response:
        status, body = answers.pop(0) if len(answers) > 1 else answers[0]
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/gpus", reply)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def report(node: str, sick_gpu: int, at: float | None = None) -> bytes:
    problem = {"check": "ecc", "severity": "critical", "detail": "dbe", "remedy": "reset_gpu"}
    doc: dict[str, Any] = {
        "node": node, "time": at if at is not None else time.time(), "healthy": False,
        "problems": [],
        "gpus": [{"index": sick_gpu, "uuid": "GPU-x", "healthy": False, "problems": [problem]}],
    }  # fmt: skip
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "bad",
    [
        (200, b"<html>not json</html>"),
        (200, b'{"node": "a/b", "gpus": []}'),  # parses, but not a NodeHealth
        (200, b'{"node": "n", "gpus": [{"index": -1}]}'),
        (200, b" " * (MAX_REPORT_BYTES + 1)),  # over the cap
        (500, b"{}"),
        # a wrong-typed severity was a TypeError that got out of poll()
        (
            200,
            b'{"node": "n", "gpus": [{"index": 0, "problems": [{"check": "x", "severity": []}]}]}',
        ),
        (200, b"[" * 100_000),  # nested past the parser's recursion limit
        (200, report("node-g", 3, at=1.0)),  # checked long ago: the watcher is stuck
    ],
    ids=["not-json", "bad-node", "bad-gpu", "over-cap", "500", "typed", "deep", "old"],
)
def test_a_garbage_answer_is_a_failure_keeping_the_last_good_one(
    two: list[WatcherProcess], bad: tuple[int, bytes]
) -> None:
    clock = Clock()

    async def body() -> None:
        async with stand_in([(200, report("node-g", 3)), bad]) as url:
            feed = HealthFeed([url, two[0].url], interval_s=1.0, clock=clock)
            try:
                await feed.poll()
                assert feed.unhealthy_gpus() == {"node-g/gpu3"}
                clock.now += 2.0
                await feed.poll()
                assert feed.unhealthy_gpus() == {"node-g/gpu3"}
                assert feed.statistics().failures == 1
                assert {r.node for r in feed.reports().values()} == {"node-g", "node-a"}
                clock.now += 2.0  # 4 s since node-g's good answer; node-a answered now
                await feed.poll()
                assert {r.node for r in feed.reports().values()} == {"node-a"}
            finally:
                await feed.close()

    asyncio.run(body())


def test_a_token_protected_watcher_needs_the_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    watcher = start_watcher(
        tmp_path, "node-t", args=["--auth-token-file", str(token_file)], wait=False
    )
    try:

        async def body() -> None:
            good = HealthFeed([watcher.url], token="tok", interval_s=0.3, clock=Clock())
            bad = HealthFeed([watcher.url], token="nope", interval_s=0.3, clock=Clock())
            try:
                await until(good, lambda: bool(good.reports()), timeout=30)
                await bad.poll()
                assert bad.reports() == {} and bad.statistics().failures == 1
            finally:
                await good.close()
                await bad.close()

        asyncio.run(body())
    finally:
        watcher.stop()
