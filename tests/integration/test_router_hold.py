"""Scale from zero through a real router process (issue 13): with no engine yet, requests
are held, the autoscaler is asked for one, and they are answered once an engine appears in
the discovery file; bounded queue, bounded wait, clients that leave. The autoscaler here
is a stand-in HTTP receiver that records wakes (the controller's own tests drive the real
one: test_autoscale_from_zero.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from router.server import RouterProcess, running_router
from sim.process import running_sim_engine
from tests.integration.conftest import free_port, wait_until

MODEL = "sim-7b"
FAST = {"health_interval_s": 0.2, "metrics_interval_s": 0.2, "models_interval_s": 0.5,
        "discovery_interval_s": 0.2}  # fmt: skip


TOKEN = "s3cret-wake-token"


class WakeReceiver:
    """``POST /v1/wake`` bodies, as the controller's endpoint would receive them (it
    requires ``TOKEN``, as an autoscaler with ``--auth-token-file`` does)."""

    def __init__(self) -> None:
        self.wakes: list[tuple[float, dict[str, Any]]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _wake(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "a bearer token is required"}, status=401)
        self.wakes.append((time.monotonic(), await request.json()))
        return web.json_response({"desired": 1}, status=202)

    def models(self) -> list[str]:
        return [body.get("model", "") for _, body in self.wakes]


@contextlib.contextmanager
def wake_receiver() -> Iterator[WakeReceiver]:
    receiver = WakeReceiver()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/wake", receiver._wake)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", receiver.port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.run_until_complete(runner.cleanup())
        loop.close()


@contextlib.contextmanager
def zero_engine_router(listing: Path, **flags: Any) -> Iterator[RouterProcess]:
    listing.write_text("[]")
    settings = {"strategy": "least-request", "discovery": "file", "discovery_file": listing,
                **FAST, **flags}  # fmt: skip
    with running_router(free_port(), **settings) as router:
        yield router


def completion(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hello there", "max_tokens": 4, **extra}


def metric(router: RouterProcess, name: str, **labels: str) -> float:
    text = router.request("GET", "/metrics", admin=True)[2].decode()
    total = 0.0
    for line in text.splitlines():
        found = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if found and all(f'{k}="{v}"' in (found.group(1) or "") for k, v in labels.items()):
            total += float(found.group(2))
    return total


async def post(
    url: str, body: dict[str, Any], limit_s: float = 30.0
) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.post(
        url, json=body, timeout=aiohttp.ClientTimeout(total=limit_s)
    ) as reply:  # fmt: skip
        return reply.status, dict(reply.headers), await reply.read()


def test_a_request_with_no_engine_is_held_and_answered_once_the_autoscaler_brings_one(
    tmp_path: Path,
) -> None:
    listing = tmp_path / "engines.json"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with wake_receiver() as autoscaler, zero_engine_router(
        listing, autoscaler_url=autoscaler.url, autoscaler_token_file=token_file
    ) as router:  # fmt: skip
        health = json.loads(router.request("GET", "/health")[2])
        assert health["healthy_engines"] == 0  # 200 all the same: requests are held

        async def scenario() -> tuple[tuple[int, dict[str, str], bytes], float]:
            started = time.monotonic()
            pending = asyncio.create_task(post(router.url + "/v1/completions", completion()))
            held = await asyncio.to_thread(
                wait_until, lambda: metric(router, "shoal_router_held_requests", model=MODEL) == 1
            )
            assert held, router.log()
            assert json.loads(router.request("GET", "/health")[2])["held_requests"] == 1
            woken = await asyncio.to_thread(wait_until, lambda: autoscaler.models() != [])
            assert woken and autoscaler.models()[0] == MODEL
            assert not pending.done()
            with running_sim_engine(free_port(), time_scale=10.0) as engine:
                listing.write_text(json.dumps([{"url": engine.url}]))
                reply = await pending
                assert reply[1]["x-shoal-engine"] == engine.url
                return reply, time.monotonic() - started

        (status, _, body), waited = asyncio.run(scenario())
        assert status == 200, body
        assert json.loads(body)["choices"]
        assert waited > 0.2
        assert metric(router, "shoal_router_held_requests", model=MODEL) == 0
        assert metric(router, "shoal_router_arrivals_total", model=MODEL) == 1
        assert metric(router, "shoal_router_held_seconds_count") == 1
        assert metric(router, "shoal_router_in_flight", model=MODEL) == 0
        # while held, the autoscaler is asked again at most once a second per model
        times = [at for at, _ in autoscaler.wakes]
        assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(times))


def test_held_requests_time_out_with_retry_after_and_a_full_queue_refuses_at_once(
    tmp_path: Path,
) -> None:
    listing = tmp_path / "engines.json"
    with zero_engine_router(
        listing, hold_timeout_s=1.5, hold_max_requests=1, retry_after_s=2
    ) as router:  # fmt: skip

        async def scenario() -> list[tuple[int, dict[str, str], bytes]]:
            first = asyncio.create_task(post(router.url + "/v1/completions", completion()))
            assert await asyncio.to_thread(
                wait_until, lambda: metric(router, "shoal_router_held_requests") == 1
            )
            second = await post(router.url + "/v1/completions", completion())
            return [await first, second]

        (status, headers, body), (full_status, full_headers, full_body) = asyncio.run(scenario())
        assert (status, headers["Retry-After"]) == (503, "2")
        assert json.loads(body)["error"]["type"] == "hold_timeout"
        assert (full_status, full_headers["Retry-After"]) == (503, "2")
        error = json.loads(full_body)["error"]
        assert error["type"] == "hold_full" and "already waiting" in error["message"]
        assert metric(router, "shoal_router_rejected_total", reason="hold_timeout") == 1
        assert metric(router, "shoal_router_rejected_total", reason="hold_full") == 1
        assert metric(router, "shoal_router_held_requests") == 0


def test_a_client_that_hangs_up_while_held_leaves_the_queue_and_a_dead_autoscaler_is_not_fatal(
    tmp_path: Path,
) -> None:
    listing = tmp_path / "engines.json"
    nobody = f"http://127.0.0.1:{free_port()}"  # the autoscaler is down
    with zero_engine_router(listing, autoscaler_url=nobody) as router:

        async def leave_while_held() -> None:
            with contextlib.suppress(TimeoutError):
                await post(router.url + "/v1/completions", completion(), limit_s=0.8)

        asyncio.run(leave_while_held())
        assert wait_until(lambda: metric(router, "shoal_router_held_requests") == 0)

        async def served_after_all() -> int:
            pending = asyncio.create_task(post(router.url + "/v1/completions", completion()))
            assert await asyncio.to_thread(
                wait_until, lambda: metric(router, "shoal_router_held_requests") == 1
            )
            with running_sim_engine(free_port(), time_scale=10.0) as engine:
                listing.write_text(json.dumps([{"url": engine.url}]))
                return (await pending)[0]

        assert asyncio.run(served_after_all()) == 200
        assert "cannot ask the autoscaler" in router.log()
        assert router.healthy()


def test_a_saturated_fleet_is_not_held(tmp_path: Path) -> None:
    listing = tmp_path / "engines.json"
    with (
        running_sim_engine(free_port(), time_scale=1.0, fault_slowdown=20.0) as engine,
        zero_engine_router(listing, max_in_flight_per_engine=1) as router,
    ):
        listing.write_text(json.dumps([{"url": engine.url}]))
        assert wait_until(
            lambda: json.loads(router.request("GET", "/health")[2])["healthy_engines"] == 1
        )

        async def two_at_once() -> list[int]:
            long = asyncio.create_task(
                post(router.url + "/v1/completions", completion(max_tokens=20))
            )
            await asyncio.sleep(0.3)
            status = (await post(router.url + "/v1/completions", completion()))[0]
            return [(await long)[0], status]

        assert asyncio.run(two_at_once()) == [200, 429]  # 429 at once: held, it would wait
        assert metric(router, "shoal_router_held_seconds_count") == 0
