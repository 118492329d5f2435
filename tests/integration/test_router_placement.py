"""The slo strategy following a placement plan through a real router (issue 14): two
simulated engines of GPU types A and B (discovery file), a stand-in planner serving a
fixed plan that sends the small cell's traffic to B and every other cell to A; the
engines' own request counts say where requests went. With the planner gone, the router
drops the plan and still serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from router.server import RouterProcess, running_router
from sim.process import SimEngineProcess, running_sim_engine
from tests.integration.conftest import free_port, wait_until
from tests.integration.test_router_hold import MODEL, metric

TOKEN = "planner-token"
# cells [out][in] on out ticks (64, 1024) and in ticks (128, 4096): (0, 0) = max_tokens
# <= 64 and prompt <= 128 tokens -> B; everything else -> A
PLAN = {
    "gpus": {"A": 1, "B": 1},
    "cost": 4.68,
    "status": "optimal",
    "solve_s": 0.01,
    "assignment": {"A": [[0.0, 1.0], [1.0, 1.0]], "B": [[1.0, 0.0], [0.0, 0.0]]},
    "indexes": [[64, 1024], [128, 4096]],
    "model": MODEL,
    "created": 1_700_000_000.0,
}


class Planner:
    """``GET /v1/plan`` with a bearer token, as ``shoal placement run`` serves it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.num_gets = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _plan(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "a bearer token is required"}, status=401)
        self.num_gets += 1
        return web.json_response(PLAN)

    def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/plan", self._plan)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._thread = None
        assert self._runner is not None
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()


@contextlib.contextmanager
def planner() -> Iterator[Planner]:
    server = Planner()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def finished(engine: SimEngineProcess) -> float:
    """Requests the engine itself finished (its vllm:request_success_total, all reasons)."""
    text = engine.get("/metrics")
    found = re.findall(r"^vllm:request_success_total\{.*\} (\S+)$", text, re.MULTILINE)
    return sum(float(value) for value in found)


def placement(router: RouterProcess) -> Any:
    return json.loads(router.request("GET", "/router/engines")[2])["placement"]


def complete(router: RouterProcess, prompt_tokens: int, max_tokens: int) -> str:
    status, headers, body = router.request(
        "POST", "/v1/completions",
        {"model": MODEL, "prompt": [7] * prompt_tokens, "max_tokens": max_tokens},
    )  # fmt: skip
    assert status == 200, body
    return headers["x-shoal-engine"]


def test_a_cells_requests_all_land_on_the_gpu_type_the_plan_gives_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    listing = tmp_path / "engines.json"
    with running_sim_engine(free_port(), time_scale=20.0) as a, running_sim_engine(
        free_port(), time_scale=20.0
    ) as b, planner() as plans:  # fmt: skip
        listing.write_text(json.dumps([{"url": a.url, "gpu_type": "A"},
                                       {"url": b.url, "gpu_type": "B"}]))  # fmt: skip
        with running_router(
            free_port(), strategy="slo", discovery="file", discovery_file=listing,
            placement_url=plans.url, placement_token_file=token_file,
            placement_interval_s=1.0, health_interval_s=0.2,  # stale after 3 s: no flake
        ) as router:  # fmt: skip
            assert wait_until(lambda: placement(router)["plan"], timeout=10), router.log()
            assert placement(router)["gpu_types"] == ["A", "B"]
            rows = json.loads(router.request("GET", "/router/engines")[2])["engines"]
            assert {row["url"]: row["gpu_type"] for row in rows} == {a.url: "A", b.url: "B"}
            before = finished(a), finished(b)
            small = [complete(router, 50, 16) for _ in range(20)]  # cell (0, 0)
            assert small == [b.url] * 20
            assert (finished(a) - before[0], finished(b) - before[1]) == (0, 20)
            large = [complete(router, 1000, 16) for _ in range(10)]  # cell (0, 1)
            long = [complete(router, 50, 200) for _ in range(10)]  # cell (1, 0)
            assert large == long == [a.url] * 10
            assert (finished(a) - before[0], finished(b) - before[1]) == (20, 20)
            outcomes = "shoal_router_placement_decisions_total"
            assert metric(router, outcomes, outcome="plan") == 40

            plans.stop()  # the planner goes away: no plan after the next (failed) poll
            assert wait_until(lambda: not placement(router)["plan"], timeout=10)
            assert placement(router)["num_failures"] >= 1
            served = [complete(router, 50, 16) for _ in range(10)]
            assert set(served) <= {a.url, b.url} and len(served) == 10
            assert "no placement plan from" in router.log()
            assert metric(router, outcomes, outcome="no_plan") >= 10
