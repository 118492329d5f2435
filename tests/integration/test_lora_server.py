"""The manager's HTTP endpoint in process over a real socket, with in-memory engines:
a failed removal and a bug both answer JSON errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from control.lora.server import make_app
from tests.unit.test_lora_manager import A, Fleet


async def against_server(fleet: Fleet, check: Callable[[str], Awaitable[None]]) -> None:
    runner = web.AppRunner(make_app(fleet.manager))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        await check(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def test_a_removal_an_engine_refuses_is_502_and_keeps_the_adapter(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), adapters=("x",))
    fleet.traffic.now = {"x": 1.0}

    async def check(url: str) -> None:
        await fleet.manager.run_round()
        fleet.api.down.add(A)
        fleet.clock.now += 5
        async with aiohttp.ClientSession() as session:
            async with session.delete(url + "/v1/adapters/x") as reply:
                assert reply.status == 502
                assert A in (await reply.json())["error"]
            async with session.get(url + "/v1/adapters") as reply:
                assert [a["name"] for a in (await reply.json())["adapters"]] == ["x"]

    asyncio.run(against_server(fleet, check))


def test_a_bug_answers_a_json_500(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, urls=(A,), adapters=("x",))

    async def broken(name: str) -> list[str]:
        raise RuntimeError("a bug")

    fleet.manager.wake = broken  # type: ignore[method-assign]

    async def check(url: str) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(url + "/v1/wake", json={"model": "x"}) as reply,
        ):
            assert reply.status == 500
            assert (await reply.json())["error"] == "internal error: RuntimeError: a bug"

    asyncio.run(against_server(fleet, check))
