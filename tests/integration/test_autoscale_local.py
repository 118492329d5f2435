"""The local actuator with real simulated engines (``shoal sim engine`` processes): start,
readiness, the discovery file, replacement of a dead engine, drain before stop; and the whole
loop (controller + scraper + router following the file) scaling up under a load step and
back down without failing a request."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import ClassVar

import aiohttp
import pytest

from control.autoscale.actuators.local import LocalActuator
from control.autoscale.controller import Controller
from control.autoscale.policies.base import clamp
from control.autoscale.scrape import Scraper
from control.autoscale.types import (
    GENERATION_TOKENS_PER_S,
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_PER_S,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    TTFT_MEAN_S,
    Decision,
    PolicySpec,
    ScaleInput,
)
from router.server import running_router
from sim.process import running_sim_engine
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

ENGINE = f"{sys.executable} -m shoal sim engine --port {{port}} --max-num-seqs 2"


def listed(path: Path) -> list[str]:
    return [entry["url"] for entry in json.loads(path.read_text())]


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"not within {timeout_s} s: {what}")


async def healthy(url: str) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=1)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url + "/health") as r,
        ):
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


def test_engines_start_publish_get_replaced_and_drain(tmp_path: Path) -> None:
    discovery = tmp_path / "engines.json"

    async def main() -> None:
        actuator = LocalActuator(
            ENGINE, discovery_file=discovery, drain_s=2.0, workdir=tmp_path, ready_timeout_s=30
        )
        try:
            assert listed(discovery) == []  # there from the start, for the router
            await actuator.scale(2)
            first = await actuator.state()
            assert first.spec == 2 and first.ready + first.pending == 2

            async def two_ready() -> bool:
                return (await actuator.state()).ready == 2

            await until(two_ready, 30, "two engines ready")
            state = await actuator.state()
            assert sorted(listed(discovery)) == sorted(state.endpoints)

            # An engine that dies is noticed and replaced: spec stays 2.
            victim = state.endpoints[0]
            pid = next(e.process.pid for e in actuator._engines if e.url == victim)
            os.killpg(pid, signal.SIGKILL)
            await asyncio.sleep(0.3)
            replaced = await actuator.state()
            assert victim not in replaced.endpoints and victim not in listed(discovery)
            assert replaced.ready + replaced.pending == 2
            await until(two_ready, 30, "the replacement ready")

            # Scale down: out of the file at once, still serving during the drain, then gone.
            before = (await actuator.state()).endpoints
            asked = time.monotonic()
            await actuator.scale(1)
            remaining = listed(discovery)
            assert len(remaining) == 1
            (leaving,) = set(before) - set(remaining)
            assert actuator.num_draining == 1
            assert await healthy(leaving)  # draining, not stopped

            async def drained() -> bool:
                return actuator.num_draining == 0

            await until(drained, 15, "the drained engine stopped")
            assert time.monotonic() - asked >= 2.0  # not before its drain
            assert not await healthy(leaving)
            assert (await actuator.state()).ready == 1
        finally:
            await actuator.close()
        assert listed(discovery) == []
        assert all(e.process.poll() is not None for e in actuator._engines)

    asyncio.run(main())
    logs = sorted(p.name for p in tmp_path.glob("engine-*.log"))
    assert len(logs) == 3  # two, and the replacement


class Load:
    """desired = ceil((running + waiting) / 4), in [min, max]; unknown holds."""

    name: ClassVar[str] = "load"

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec

    def decide(self, observation: ScaleInput) -> Decision:
        running = observation.total(REQUESTS_RUNNING)
        waiting = observation.total(REQUESTS_WAITING)
        if running is None or waiting is None:
            return Decision(observation.spec_replicas, None, "unknown: hold")
        recommendation = math.ceil((running + waiting) / 4)
        desired, bound = clamp(recommendation, self.spec)
        return Decision(desired, recommendation, f"load {running + waiting}", bounds=bound)


def test_a_load_step_scales_up_through_the_router_and_back_down(tmp_path: Path) -> None:
    discovery = tmp_path / "engines.json"
    actuator = LocalActuator(
        ENGINE, discovery_file=discovery, drain_s=3.0, workdir=tmp_path, ready_timeout_s=30
    )
    with running_router(
        free_port(),
        wait_healthy=False,
        discovery="file",
        discovery_file=discovery,
        discovery_interval_s=0.5,
        health_interval_s=0.5,
        strategy="least-request",
    ) as router:
        statuses: list[int] = []
        ready_seen: list[int] = []

        async def main() -> None:
            scraper = Scraper(timeout_s=1.0, router_url=router.url)
            controller = Controller(
                Load(PolicySpec(targets=(), min_replicas=1, max_replicas=3)),
                actuator, scraper, interval_s=0.5, min_replicas=1,
            )  # fmt: skip
            await actuator.scale(1)
            stop = asyncio.Event()
            loop_task = asyncio.create_task(controller.run(stop))
            try:
                await until(lambda: _router_healthy(router.url), 30, "router sees an engine")
                load_stop = asyncio.Event()
                clients = [
                    asyncio.create_task(_client(router.url, load_stop, statuses)) for _ in range(12)
                ]

                async def scaled_up() -> bool:
                    if controller.last_state is not None:
                        ready_seen.append(controller.last_state.ready)
                    return controller.last_state is not None and controller.last_state.ready == 3

                await until(scaled_up, 60, "three engines ready under load")
                await asyncio.sleep(2.0)  # the new engines take requests via the router
                load_stop.set()
                await asyncio.gather(*clients)

                async def scaled_down() -> bool:
                    state = controller.last_state
                    return state is not None and state.spec == 1 and actuator.num_draining == 0

                await until(scaled_down, 60, "back to one engine after the load")
                assert len(listed(discovery)) == 1
            finally:
                stop.set()
                await loop_task
                await scraper.close()
                await actuator.close()

        asyncio.run(main())
    assert statuses and set(statuses) == {200}, f"failed requests: {statuses}"
    assert max(ready_seen) == 3


async def _router_healthy(url: str) -> bool:
    return await healthy(url)


async def _client(url: str, stop: asyncio.Event, statuses: list[int]) -> None:
    body = {"model": "sim-7b", "prompt": "a load step " * 20, "max_tokens": 48}
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            async with session.post(url + "/v1/completions", json=body) as reply:
                await reply.read()
                statuses.append(reply.status)


def test_scraping_simulated_engines_gives_canonical_values_and_unknown_on_failure() -> None:
    with (
        running_sim_engine(free_port(), time_scale=10) as healthy_engine,
        running_sim_engine(free_port(), time_scale=10) as hung_engine,
    ):
        dead = f"http://127.0.0.1:{free_port()}"
        urls = [healthy_engine.url, hung_engine.url, dead]

        async def main() -> None:
            scraper = Scraper(timeout_s=0.5)
            try:
                first = await scraper.scrape(urls)
                assert first[0].ok and KV_CACHE_USAGE in first[0].values
                assert PROMPT_TOKENS_PER_S not in first[0].values  # no rate from one scrape
                assert first[1].ok and not first[2].ok and first[2].values == {}
                hung_engine.set_faults(hang="all")  # /metrics hangs: unknown, not idle
                body = {"model": "sim-7b", "prompt": "hello " * 30, "max_tokens": 8}
                for _ in range(3):
                    status, _ = await asyncio.to_thread(
                        healthy_engine.request, "POST", "/v1/completions", body
                    )
                    assert status == 200
                started = time.monotonic()
                second = await scraper.scrape(urls)
                assert time.monotonic() - started < 2.0  # bounded by the per-scrape timeout
                values = second[0].values
                assert values[PROMPT_TOKENS_PER_S] > 0 and values[GENERATION_TOKENS_PER_S] > 0
                assert values[REQUESTS_PER_S] > 0 and values[TTFT_MEAN_S] > 0
                assert values[REQUESTS_RUNNING] == 0
                assert not second[1].ok and not second[2].ok
                assert scraper.num_failures == 3
            finally:
                hung_engine.set_faults(hang="off")
                await scraper.close()

        asyncio.run(main())


def test_oversized_failing_and_malformed_metrics_are_unknown() -> None:
    from aiohttp import web

    good = '# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{engine="0"} 3\n'
    bodies = {
        "/big/metrics": web.Response(text=good + "#" * 70_000 + "\n"),
        "/error/metrics": web.Response(status=500, text="boom"),
        "/garbled/metrics": web.Response(text="vllm:num_requests_waiting{engine= 2 x\n"),
        "/good/metrics": web.Response(text=good),
    }

    async def handler(request: web.Request) -> web.Response:
        return bodies[request.path]

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/{name}/metrics", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        scraper = Scraper(timeout_s=1.0, max_body_bytes=65_536)
        try:
            base = f"http://127.0.0.1:{port}"
            samples = await scraper.scrape(
                [f"{base}/{n}" for n in ("big", "error", "garbled", "good")]
            )
        finally:
            await scraper.close()
            await runner.cleanup()
        assert [s.ok for s in samples] == [False, False, False, True]
        assert samples[3].values == {REQUESTS_WAITING: 3}
        assert all(s.values == {} for s in samples[:3])

    asyncio.run(main())


def test_a_command_that_keeps_failing_is_restarted_with_backoff(tmp_path: Path) -> None:
    async def main() -> None:
        actuator = LocalActuator("sh -c 'exit 3' {port}", workdir=tmp_path)
        try:
            await actuator.scale(1)
            deadline = time.monotonic() + 3.5
            while time.monotonic() < deadline:
                state = await actuator.state()
                assert state.spec == 1 and state.ready == 0
                await asyncio.sleep(0.05)
        finally:
            await actuator.close()

    asyncio.run(main())
    # Restarts after 1 s and 2 s (the next is due at 7 s), not one per round.
    assert 2 <= len(list(tmp_path.glob("engine-*.log"))) <= 3


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for init to reap it counts)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def test_an_engine_whose_leader_died_takes_its_children_with_it(tmp_path: Path) -> None:
    # the leader starts a child in its own group (as vLLM's API server starts EngineCore)
    # and dies; the child would keep the port and the GPU
    child_file = tmp_path / "child.pid"
    command = f"sh -c 'sleep 600 & echo $! > {child_file}; exit 1' {{port}}"
    child = 0

    async def main() -> None:
        nonlocal child
        actuator = LocalActuator(command, workdir=tmp_path / "work")
        try:
            await actuator.scale(1)
            engine = actuator._engines[0]
            deadline = time.monotonic() + 10
            while not (child_file.exists() and child_file.read_text().strip()):
                assert time.monotonic() < deadline, "the leader never started its child"
                await asyncio.sleep(0.05)
            child = int(child_file.read_text())
            await asyncio.to_thread(engine.process.wait, 10)
            assert not _gone(child)
            state = await actuator.state()  # notices the dead leader
            assert state.ready == 0 and engine not in actuator._engines
            deadline = time.monotonic() + 5
            while not _gone(child):
                assert time.monotonic() < deadline, f"the child {child} outlived its leader"
                await asyncio.sleep(0.05)
        finally:
            await actuator.close()
            if child and not _gone(child):
                os.kill(child, signal.SIGKILL)

    asyncio.run(main())


def test_scale_honours_the_crash_loop_backoff(tmp_path: Path) -> None:
    async def main() -> None:
        actuator = LocalActuator("sh -c 'exit 3' {port}", workdir=tmp_path)
        try:
            await actuator.scale(1)
            await asyncio.to_thread(actuator._engines[0].process.wait, 10)
            await actuator.state()  # the failure: the next start is 1 s away
            await actuator.scale(0)
            await actuator.scale(3)  # asking again does not skip the backoff
            state = await actuator.state()
            assert (state.spec, state.ready, state.pending) == (3, 0, 0)
            assert len(list(tmp_path.glob("engine-*.log"))) == 1
        finally:
            await actuator.close()

    asyncio.run(main())


HANGING_ENGINE = """\
import http.server, os, sys, time
flag = sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        while os.path.exists(flag):  # hung: alive, accepting, never answering
            time.sleep(0.05)
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


def test_a_ready_engine_that_hangs_leaves_the_file_and_is_replaced(tmp_path: Path) -> None:
    script = tmp_path / "engine.py"
    script.write_text(HANGING_ENGINE)
    flag = tmp_path / "hang"
    discovery = tmp_path / "engines.json"

    async def main() -> None:
        actuator = LocalActuator(
            f"{sys.executable} {script} {{port}} {flag}", discovery_file=discovery,
            workdir=tmp_path / "work", health_timeout_s=0.3, kill_grace_s=2.0,
        )  # fmt: skip
        try:
            await actuator.scale(1)

            async def ready() -> bool:
                return (await actuator.state()).ready == 1

            await until(ready, 20, "the engine ready")
            (first,) = actuator._engines
            assert listed(discovery) == [first.url]
            flag.touch()
            for _ in range(2):  # one or two failed checks: a blip, still listed
                assert (await actuator.state()).ready == 1
                assert listed(discovery) == [first.url]
            state = await actuator.state()  # the third: hung, replaced
            assert (state.spec, state.ready, state.pending) == (1, 0, 1)
            assert listed(discovery) == []
            assert first not in actuator._engines
            await asyncio.to_thread(first.process.wait, 10)  # its group was stopped
            flag.unlink()
            await until(ready, 20, "the replacement ready")
            assert listed(discovery) != [first.url] and len(listed(discovery)) == 1
        finally:
            flag.unlink(missing_ok=True)
            await actuator.close()

    asyncio.run(main())
