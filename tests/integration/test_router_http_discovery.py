"""A real router process finding its engines over HTTP (``--discovery http``), as on
Kubernetes where ``shoal engines serve`` runs in another pod: a stand-in fleet (an aiohttp
server answering ``GET /v1/discovery`` with the list the test sets, behind a bearer token)
names two simulated engines. Completions route through both; an engine removed from the
list gets no more requests; a garbage answer keeps the last good list. The same router
polls a stand-in health watcher through ``dns+http://localhost:PORT`` (every address
``localhost`` resolves to)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from router.server import running_router
from sim.process import running_sim_engine
from tests.integration.conftest import free_port, wait_until
from tests.integration.test_router_gpu_health import (
    FAST,
    engines_view,
    report,
    send,
    served,
    stand_in_watcher,
)

TOKEN = "fleet-s3cret"


class StandInFleet:
    """``GET /v1/discovery`` -> ``body`` (200) with ``Authorization: Bearer TOKEN``, else
    401, as ``shoal engines serve --auth-token-file`` answers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.body = b"[]"
        self.reads = 0
        self.refused = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/discovery"

    async def _discovery(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.refused += 1
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        self.reads += 1
        return web.Response(body=self.body, content_type="application/json")

    def serve(self, entries: list[dict[str, Any]]) -> None:
        self.body = json.dumps(entries).encode()


@contextlib.contextmanager
def stand_in_fleet() -> Iterator[StandInFleet]:
    fleet = StandInFleet()
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/v1/discovery", fleet._discovery)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", fleet.port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield fleet
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


def test_the_router_routes_to_the_fleets_list_and_follows_it(tmp_path: Path) -> None:
    token_file = tmp_path / "control-token"
    token_file.write_text(TOKEN + "\n")
    with (
        stand_in_fleet() as fleet,
        stand_in_watcher() as (watcher, _),
        running_sim_engine(free_port(), time_scale=10.0) as e0,
        running_sim_engine(free_port(), time_scale=10.0) as e1,
    ):
        fleet.serve([{"url": e0.url, "gpus": ["node-a/gpu0"]},
                     {"url": e1.url, "gpus": ["node-a/gpu1"], "gpu_type": "H100"}])  # fmt: skip
        settings = {"strategy": "round-robin", "discovery": "http", "engines": [fleet.url],
                    "discovery_token_file": token_file,
                    "gpu_health": f"dns+http://localhost:{watcher.port}", **FAST}  # fmt: skip
        with running_router(free_port(), **settings) as router:
            assert wait_until(lambda: sum(r["healthy"] for r in engines_view(router).values())
                              == 2), router.log()  # fmt: skip
            assert fleet.refused == 0 and fleet.reads >= 1  # the token is sent
            assert sorted(send(router, 4)) == sorted([e0.url, e1.url] * 2)
            assert engines_view(router)[e1.url]["gpus"] == ["node-a/gpu1"]

            # the watcher behind dns+http://localhost: gpu1 sick -> e1 out of rotation
            watcher.body = report(sick=(1,))
            assert wait_until(lambda: not engines_view(router)[e1.url]["gpu_healthy"]), router.log()
            assert send(router, 3) == [e0.url] * 3
            watcher.body = report()
            assert wait_until(lambda: engines_view(router)[e1.url]["gpu_healthy"])

            # the fleet drops e1 (scale down, a failed group): the router follows
            fleet.serve([{"url": e0.url, "gpus": ["node-a/gpu0"]}])
            assert wait_until(lambda: list(engines_view(router)) == [e0.url]), router.log()
            before = served(e1)
            assert send(router, 4) == [e0.url] * 4
            assert served(e1) == before

            # garbage from the fleet: the last good list stays, the failure is logged
            fleet.body = b'{"not": "a list"}'
            reads = fleet.reads
            assert wait_until(lambda: fleet.reads >= reads + 3)
            assert list(engines_view(router)) == [e0.url]
            assert send(router, 2) == [e0.url] * 2
            assert "keeping the last 1 engine(s)" in router.log()
