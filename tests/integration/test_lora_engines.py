"""``HttpEngineApi`` against a real aiohttp server that streams its answers in 8 KiB
pieces, as a busy server flushes them: bodies are read whole (until EOF), refused past
the cap."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from control.lora import engines
from control.lora.engines import HttpEngineApi
from control.lora.errors import AnswerTooLarge

NUM_ADAPTERS = 2000


def models_body() -> bytes:
    cards = [{"id": "base", "object": "model", "parent": None}]
    cards += [{"id": f"adapter-{i:04d}", "object": "model", "parent": "base", "root": "/x" * 20}
              for i in range(NUM_ADAPTERS)]  # fmt: skip
    return json.dumps({"object": "list", "data": cards}).encode()


def metrics_body() -> bytes:
    filler = "".join(f'vllm:some_histogram_bucket{{le="{i}"}} {i}\n' for i in range(20000))
    return (filler + 'vllm:lora_requests_info{max_lora="7",running_lora_adapters=""} 1\n').encode()


def streamed(body: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        reply = web.StreamResponse()
        reply.content_type = "application/json"
        await reply.prepare(request)
        for i in range(0, len(body), 8192):
            await reply.write(body[i : i + 8192])
            await asyncio.sleep(0.001)
        await reply.write_eof()
        return reply

    return handler


async def against_engine(check: Callable[[str], Awaitable[None]]) -> None:
    app = web.Application()
    app.router.add_get("/v1/models", streamed(models_body()))
    app.router.add_get("/metrics", streamed(metrics_body()))
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await check(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_a_large_model_list_and_metrics_are_read_whole() -> None:
    assert len(models_body()) > 200_000 and len(metrics_body()) > 500_000

    async def check(url: str) -> None:
        api = HttpEngineApi()
        try:
            for _ in range(3):
                models = await api.models(url, with_budget=True)
                assert models.base_model == "base"
                assert len(models.adapters) == NUM_ADAPTERS
                assert models.max_loras == 7  # the last line of /metrics
        finally:
            await api.close()

    asyncio.run(against_engine(check))


def test_an_answer_over_the_cap_is_a_failed_read(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(engines, "_MAX_BODY", 100_000)

    async def check(url: str) -> None:
        api = HttpEngineApi()
        try:
            with pytest.raises(AnswerTooLarge, match="models: the answer is over 100000 bytes"):
                await api.models(url)
        finally:
            await api.close()

    asyncio.run(against_engine(check))
    assert "over 100000 bytes" in caplog.text
