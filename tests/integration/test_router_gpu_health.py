"""The router stops sending to engines on an unhealthy GPU (issue 15), through a real
router process, simulated engines listed in a discovery file with their GPUs, and a
stand-in health watcher: an aiohttp server answering ``GET /v1/gpus`` with the
``NodeHealth`` document the test sets (``test_router_gpu_health_watch.py`` drives the
real ``shoal health watch``). Where requests went is read from the engines' own
``vllm:request_success`` counters."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from control.health.types import GpuHealth, NodeHealth, Problem, Remedy, Severity
from router.server import RouterProcess, running_router
from shoal.processes import shoal_env
from sim.process import SimEngineProcess, running_sim_engine
from tests.integration.conftest import free_port, wait_until

MODEL = "sim-7b"
INTERVAL_S = 0.2  # the router's --gpu-health-interval-s: a report lives 3 x 0.2 s unconfirmed
FAST = {"health_interval_s": 0.2, "metrics_interval_s": 0.2, "models_interval_s": 0.5,
        "discovery_interval_s": 0.2, "gpu_health_interval_s": INTERVAL_S}  # fmt: skip
XID79 = Problem("xid", Severity.CRITICAL, "XID 79: GPU has fallen off the bus", Remedy.DRAIN_NODE)


def report(sick: tuple[int, ...] = ()) -> bytes:
    gpus = tuple(GpuHealth(i, f"GPU-{i}", (XID79,) if i in sick else ()) for i in range(2))
    return json.dumps(NodeHealth("node-a", time.time(), gpus).to_json()).encode()  # fresh


TOKEN = "watcher-s3cret"


class StandInWatcher:
    """``GET /v1/gpus`` -> ``body`` (200), as ``shoal health watch`` serves it; with its
    ``--auth-token-file``, 401 without ``Authorization: Bearer TOKEN``."""

    def __init__(self, token: str = "") -> None:
        self.port = free_port()
        self.body = report()
        self.reads = 0
        self.token = token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _gpus(self, request: web.Request) -> web.Response:
        if self.token and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "a bearer token is required"}, status=401)
        self.reads += 1
        return web.Response(body=self.body, content_type="application/json")


@contextlib.contextmanager
def stand_in_watcher(token: str = "") -> Iterator[tuple[StandInWatcher, Any]]:
    """The watcher, and a function that stops it (a watcher that dies)."""
    watcher = StandInWatcher(token)
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/gpus", watcher._gpus)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", watcher.port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)

    try:
        yield watcher, stop
    finally:
        stop()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def served(engine: SimEngineProcess) -> int:
    """Requests the engine itself finished (its ``vllm:request_success`` counters)."""
    with urllib.request.urlopen(engine.url + "/metrics", timeout=5) as reply:
        text = reply.read().decode()
    total = 0.0
    for line in text.splitlines():
        if re.match(r"^vllm:request_success_total\{", line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def engines_view(router: RouterProcess) -> dict[str, dict[str, Any]]:
    rows = json.loads(router.request("GET", "/router/engines")[2])["engines"]
    return {row["url"]: row for row in rows}


def send(router: RouterProcess, count: int) -> list[str]:
    """``count`` completions one after another; the engine that answered each."""
    answered = []
    for _ in range(count):
        status, headers, body = router.request(
            "POST", "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        )
        assert status == 200, body
        answered.append(headers["x-shoal-engine"])
    return answered


def metric(router: RouterProcess, name: str) -> float:
    text = router.request("GET", "/metrics")[2].decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} missing"
    return float(found.group(1))


@contextlib.contextmanager
def fleet(
    tmp_path: Path, watcher_url: str, **flags: Any
) -> Iterator[tuple[RouterProcess, SimEngineProcess, SimEngineProcess]]:
    """Two engines on node-a/gpu0 and node-a/gpu1 (the discovery file's ``gpus``) behind a
    round-robin router polling ``watcher_url``."""
    listing = tmp_path / "engines.json"
    with running_sim_engine(free_port(), time_scale=10.0) as e0, running_sim_engine(
        free_port(), time_scale=10.0
    ) as e1:  # fmt: skip
        listing.write_text(json.dumps([
            {"url": e0.url, "gpus": ["node-a/gpu0"]},
            {"url": e1.url, "gpus": ["node-a/gpu1"]},
        ]))  # fmt: skip
        settings = {"strategy": "round-robin", "discovery": "file", "discovery_file": listing,
                    "gpu_health": watcher_url, **FAST, **flags}  # fmt: skip
        with running_router(free_port(), **settings) as router:
            assert wait_until(lambda: sum(r["healthy"] for r in engines_view(router).values()) == 2)
            yield router, e0, e1


def test_an_engine_on_an_unhealthy_gpu_gets_no_requests_until_the_gpu_recovers(
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "watcher-token"
    token_file.write_text(TOKEN + "\n")
    with stand_in_watcher(TOKEN) as (watcher, _), fleet(
        tmp_path, watcher.url, gpu_health_token_file=token_file
    ) as (router, e0, e1):  # fmt: skip
        assert wait_until(lambda: watcher.reads >= 2)  # the router sends the bearer token
        assert sorted(send(router, 4)) == sorted([e0.url, e1.url] * 2)  # round robin
        watcher.body = report(sick=(1,))
        assert wait_until(lambda: not engines_view(router)[e1.url]["gpu_healthy"]), router.log()
        view = engines_view(router)[e1.url]
        assert view["healthy"] and view["unhealthy_gpus"] == ["node-a/gpu1"]
        assert metric(router, "shoal_router_engines_gpu_unhealthy") == 1.0
        before = served(e0), served(e1)
        assert send(router, 10) == [e0.url] * 10
        assert (served(e0) - before[0], served(e1) - before[1]) == (10, 0)
        assert f"engine {e1.url}: GPU node-a/gpu1 unhealthy" in router.log()
        table = subprocess.run([sys.executable, "-m", "shoal", "router", "engines", "--url",
                                router.url], capture_output=True, text=True, timeout=30,
                               env=shoal_env())  # fmt: skip
        rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
        assert "unhealthy: node-a/gpu1" in rows[e1.url] and " ok " in rows[e0.url], table

        watcher.body = report()  # the GPU is cleared: traffic returns
        assert wait_until(lambda: engines_view(router)[e1.url]["gpu_healthy"])
        before = served(e0), served(e1)
        assert sorted(send(router, 6)) == sorted([e0.url, e1.url] * 3)
        assert (served(e0) - before[0], served(e1) - before[1]) == (3, 3)
        assert metric(router, "shoal_router_engines_gpu_unhealthy") == 0.0
        assert metric(router, 'shoal_router_gpu_health_polls_total{result="ok"}') >= 3


def test_a_malformed_answer_keeps_the_last_state_and_a_dead_watcher_takes_no_engine_out(
    tmp_path: Path,
) -> None:
    """A malformed answer is an unreadable watcher: the last good report stays for 3
    intervals (here 1 s each), then it is forgotten like a dead watcher's."""
    with stand_in_watcher() as (watcher, stop), fleet(
        tmp_path, watcher.url, gpu_health_interval_s=1.0
    ) as (router, e0, e1):  # fmt: skip
        watcher.body = report(sick=(1,))
        assert wait_until(lambda: not engines_view(router)[e1.url]["gpu_healthy"])
        watcher.body = b'{"node": "node-a", "gpus": [{"index": "one"}]}'
        reads = watcher.reads
        assert wait_until(lambda: watcher.reads >= reads + 2)  # 2 malformed polls, < 3 intervals
        assert not engines_view(router)[e1.url]["gpu_healthy"]  # the last good report stays
        assert send(router, 4) == [e0.url] * 4
        text = router.request("GET", "/metrics")[2].decode()
        assert re.search(r'shoal_router_gpu_health_polls_total\{result="malformed"\} [1-9]', text)

        watcher.body = report(sick=(1,))
        reads = watcher.reads
        assert wait_until(lambda: watcher.reads > reads)
        stop()  # the watcher dies while gpu1 is sick: unknown is not sick
        assert not engines_view(router)[e1.url]["gpu_healthy"]
        assert wait_until(lambda: engines_view(router)[e1.url]["gpu_healthy"], 10), router.log()
        assert sorted(send(router, 4)) == sorted([e0.url, e1.url] * 2)
        assert "unknown is not sick" in router.log()


def test_every_engine_on_unhealthy_gpus_is_what_no_healthy_engine_gives(tmp_path: Path) -> None:
    """Dynamic discovery holds a request (as for scale from zero) until a GPU recovers; with
    a hold of 0 s the router answers 503 at once."""
    with stand_in_watcher() as (watcher, _), fleet(tmp_path, watcher.url) as (router, e0, e1):
        watcher.body = report(sick=(0, 1))
        assert wait_until(lambda: json.loads(router.request("GET", "/health")[2])[
            "healthy_engines"] == 0)  # fmt: skip

        async def held_then_answered() -> tuple[int, dict[str, str]]:
            pending = asyncio.create_task(asyncio.to_thread(
                router.request, "POST", "/v1/completions",
                {"model": MODEL, "prompt": "hello", "max_tokens": 2}, 30.0,
            ))  # fmt: skip
            held = await asyncio.to_thread(
                wait_until,
                lambda: json.loads(router.request("GET", "/health")[2])["held_requests"] == 1,
            )
            assert held, router.log()
            assert not pending.done()
            watcher.body = report(sick=(1,))
            status, headers, _ = await pending
            return status, headers

        status, headers = asyncio.run(held_then_answered())
        assert status == 200 and headers["x-shoal-engine"] == e0.url

    with stand_in_watcher() as (watcher, _), fleet(
        tmp_path, watcher.url, hold_timeout_s=0
    ) as (router, e0, e1):  # fmt: skip
        watcher.body = report(sick=(0, 1))
        assert wait_until(lambda: router.request("GET", "/health")[0] == 503)
        status, headers, body = router.request(
            "POST", "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 2}
        )
        assert status == 503 and "Retry-After" in headers, body
        assert (served(e0), served(e1)) == (0, 0)
