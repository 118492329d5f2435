"""Bodies Shoal reads from engines and wake targets: whole up to a cap, refused above.

A stand-in server streams its answers in 8 KiB chunks with a pause between them, so the
router's reader meets a body spread over many network reads (what a real engine's
``/v1/models`` listing thousands of adapters looks like), over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from router.config import RouterSettings
from router.engines import MODELS_MAX_BYTES, EnginePool, parse_engines
from router.wake import WAKE_MAX_BYTES, HttpWaker
from shoal.bodies import read_capped
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

_CHUNK = 8 << 10


def models_body(num_adapters: int, pad: int = 0) -> bytes:
    cards = [{"id": "base", "object": "model"}]
    cards += [
        {"id": f"lora-{k}", "object": "model", "parent": "base", "pad": "x" * pad}
        for k in range(num_adapters)
    ]
    return json.dumps({"object": "list", "data": cards}).encode()


def streamed(body: bytes, status: int = 200) -> Callable[[web.Request], object]:
    async def handler(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse(status=status)  # chunked: no Content-Length to trust
        reply.content_type = "application/json"
        await reply.prepare(request)
        for at in range(0, len(body), _CHUNK):
            await reply.write(body[at : at + _CHUNK])
            await asyncio.sleep(0.001)
        await reply.write_eof()
        return reply

    return handler


@asynccontextmanager
async def serving(
    routes: dict[tuple[str, str], Callable[[web.Request], object]],
) -> AsyncIterator[str]:
    app = web.Application()
    for (method, path), handler in routes.items():
        app.router.add_route(method, path, handler)  # type: ignore[arg-type]
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def test_a_body_spread_over_many_reads_is_read_whole_and_one_over_the_cap_is_refused() -> None:
    body = models_body(3000)  # ~170 KB in ~21 chunks
    assert len(body) > 20 * _CHUNK

    async def run() -> tuple[bytes | None, bytes | None]:
        routes = {("GET", "/v1/models"): streamed(body)}
        async with serving(routes) as url, aiohttp.ClientSession() as session:
            async with session.get(url + "/v1/models") as reply:
                whole = await read_capped(reply, len(body))
            async with session.get(url + "/v1/models") as reply:
                over = await read_capped(reply, len(body) - 1)
        return whole, over

    whole, over = asyncio.run(run())
    assert whole == body
    assert over is None


def test_the_pool_lists_thousands_of_adapters_and_an_oversized_listing_fails_the_poll(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listing = models_body(3000)
    huge = models_body(2000, pad=2100)  # ~4.3 MB
    assert len(huge) > MODELS_MAX_BYTES

    async def run() -> tuple[frozenset[str], frozenset[str]]:
        answers = [listing, huge]

        async def models(request: web.Request) -> web.StreamResponse:
            handler = streamed(answers.pop(0))
            return await handler(request)  # type: ignore[no-any-return,misc]

        async with serving({("GET", "/v1/models"): models}) as url:
            settings = RouterSettings(engines=url)
            pool = EnginePool(parse_engines(settings.engines), settings)
            async with aiohttp.ClientSession() as session:
                pool._session = session  # polled directly: no background loops
                await pool.poll_models(url)
                first = pool._engines[url].models
                await pool.poll_models(url)
                second = pool._engines[url].models
        return first, second

    with caplog.at_level(logging.WARNING, logger="shoal.router.engines"):
        first, second = asyncio.run(run())
    assert len(first) == 3001 and "lora-2999" in first
    assert second == first  # the failed poll keeps what the engine listed before
    assert any("is over 4194304 bytes; poll failed" in r.getMessage() for r in caplog.records)


def test_a_wake_answered_with_an_oversized_body_is_a_failed_wake() -> None:
    async def run() -> tuple[int, int]:
        routes = {("POST", "/v1/wake"): streamed(b" " * (WAKE_MAX_BYTES + 1), status=202)}
        async with serving(routes) as url, aiohttp.ClientSession() as session:
            waker = HttpWaker(url, lambda: ["m"], interval_s=60.0)
            waker.start(session)
            try:
                waker.notify()
                for _ in range(500):
                    if waker.num_failed or waker.num_sent:
                        break
                    await asyncio.sleep(0.01)
            finally:
                await waker.close()
        return waker.num_sent, waker.num_failed

    assert asyncio.run(run()) == (0, 1)


def metrics_body(padding_series: int) -> bytes:
    """A vLLM-like /metrics whose KV-cache line comes after ``padding_series`` others (a
    cut body loses it)."""
    lines = ["# TYPE shoal_padding gauge"]
    lines += [f'shoal_padding{{series="{k:06d}"}} 1.0' for k in range(padding_series)]
    lines += [
        "# TYPE vllm:kv_cache_usage_perc gauge",
        'vllm:kv_cache_usage_perc{model_name="m"} 0.625',
        "# TYPE vllm:num_requests_running gauge",
        'vllm:num_requests_running{model_name="m"} 3.0',
    ]
    return ("\n".join(lines) + "\n").encode()


def test_engine_metrics_spread_over_many_reads_are_scraped_whole() -> None:
    # the autoscaler read one buffered piece (content.read(n)): a 300 KB /metrics lost its
    # tail, and with it the KV-cache usage a policy scales on
    from control.autoscale.scrape import Scraper
    from control.autoscale.types import KV_CACHE_USAGE
    from router.scrape import MetricsScraper

    body = metrics_body(9000)
    assert len(body) > 30 * _CHUNK

    async def run() -> tuple[float | None, float | None, float | None]:
        async with serving({("GET", "/metrics"): streamed(body)}) as url:
            scraper = Scraper(timeout_s=5.0)
            try:
                (sample,) = await scraper.scrape([url])
            finally:
                await scraper.close()
            small = Scraper(timeout_s=5.0, max_body_bytes=len(body) - 1)
            try:
                (refused,) = await small.scrape([url])
            finally:
                await small.close()
            router_scraper = MetricsScraper(timeout_s=5.0, stale_s=60.0)
            async with aiohttp.ClientSession() as session:
                assert await router_scraper.scrape_one(session, "e", url)
            seen = router_scraper.metrics("e")
        return (
            sample.values.get(KV_CACHE_USAGE) if sample.ok else None,
            None if refused.ok else -1.0,
            None if seen is None else seen.kv_cache_usage,
        )

    autoscale_kv, refused, router_kv = asyncio.run(run())
    assert autoscale_kv == 0.625
    assert refused == -1.0  # over the cap: a failed scrape (unknown), never a cut reading
    assert router_kv == 0.625
