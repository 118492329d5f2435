"""LoRA adapters on demand through a real router (issue 14): a simulated engine with
``--enable-lora`` and a stand-in LoRA manager that, on ``POST /v1/wake``, loads a
registered adapter into the engine through vLLM's ``/v1/load_lora_adapter`` (a moment
later, as a real load takes time) and answers 202, or 404 for a name it does not know.
A request for the adapter is held, then routed; an unknown name is a 404 at once, not
after the hold timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from router.server import RouterProcess, running_router
from sim.process import SimEngineProcess, running_sim_engine
from tests.integration.conftest import free_port
from tests.integration.test_router_hold import MODEL, metric

TOKEN = "lora-manager-token"
ADAPTER = "sql-lora"
LOAD_DELAY_S = 0.3
HOLD_TIMEOUT_S = 20.0


class LoraManager:
    """``POST /v1/wake {"model"}`` as ``shoal lora serve`` answers it, loading through the
    engine's runtime API."""

    def __init__(self, engine: SimEngineProcess, adapter_dir: Path) -> None:
        self.engine = engine
        self.adapter_dir = adapter_dir
        self.port = free_port()
        self.wakes: list[tuple[float, str]] = []
        self.loads: list[int] = []  # the engine's status for each load
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _load_later(self, name: str) -> None:
        await asyncio.sleep(LOAD_DELAY_S)
        body = {"lora_name": name, "lora_path": str(self.adapter_dir)}
        async with aiohttp.ClientSession() as session, session.post(
            self.engine.url + "/v1/load_lora_adapter", json=body
        ) as reply:  # fmt: skip
            await reply.read()
            self.loads.append(reply.status)

    async def _wake(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.json_response({"error": "a bearer token is required"}, status=401)
        model = str((await request.json()).get("model", ""))
        self.wakes.append((time.monotonic(), model))
        if model != ADAPTER:
            return web.json_response({"error": f"{model!r} is not a registered adapter"},
                                     status=404)  # fmt: skip
        if not self.loads and not self._tasks:  # one load, however often it is asked
            task = asyncio.create_task(self._load_later(model))
            self._tasks.add(task)
        return web.json_response({"engines": [self.engine.url]}, status=202)

    def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/wake", self._wake)
        self._runner = web.AppRunner(app)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        for task in self._tasks:
            task.cancel()
        assert self._runner is not None
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def models_woken(self) -> list[str]:
        return [model for _, model in self.wakes]


@contextlib.contextmanager
def lora_fleet(tmp_path: Path) -> Iterator[tuple[SimEngineProcess, LoraManager, RouterProcess]]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    adapter_dir = tmp_path / "adapters" / ADAPTER
    adapter_dir.mkdir(parents=True)
    with running_sim_engine(free_port(), time_scale=20.0, enable_lora=True,
                            max_loras=2) as engine:  # fmt: skip
        manager = LoraManager(engine, adapter_dir)
        manager.start()
        try:
            # the pool's own models poll is far away: only the hold's 0.5 s re-poll finds it
            with running_router(
                free_port(), engines=[engine.url], lora_url=manager.url,
                lora_token_file=token_file, models_interval_s=120,
                hold_timeout_s=HOLD_TIMEOUT_S, strategy="lora-affinity",
            ) as router:  # fmt: skip
                yield engine, manager, router
        finally:
            manager.stop()


def ask(router: RouterProcess, model: str) -> tuple[int, dict[str, str], Any, float]:
    started = time.monotonic()
    status, headers, body = router.request(
        "POST", "/v1/completions", {"model": model, "prompt": "SELECT", "max_tokens": 4},
        timeout=HOLD_TIMEOUT_S + 10,
    )  # fmt: skip
    return status, headers, json.loads(body), time.monotonic() - started


def test_a_request_for_an_adapter_no_engine_has_is_held_until_the_manager_loads_it(
    tmp_path: Path,
) -> None:
    with lora_fleet(tmp_path) as (engine, manager, router):
        assert ADAPTER not in engine.get("/v1/models")
        status, headers, body, waited = ask(router, ADAPTER)
        assert status == 200, (body, router.log())
        assert headers["x-shoal-engine"] == engine.url and body["model"] == ADAPTER
        assert waited >= LOAD_DELAY_S  # held while the adapter loaded
        assert manager.loads == [200] and set(manager.models_woken()) == {ADAPTER}
        assert ADAPTER in engine.get("/v1/models")
        assert metric(router, "shoal_router_held_seconds_count") == 1
        assert metric(router, "shoal_router_held_requests", model=ADAPTER) == 0
        # now that the engine lists it: routed at once, no new wake
        wakes = len(manager.wakes)
        status, _, _, _ = ask(router, ADAPTER)
        assert status == 200 and len(manager.wakes) == wakes
        assert metric(router, "shoal_router_held_seconds_count") == 1
        status, _, _, _ = ask(router, MODEL)  # the base model is never held
        assert status == 200 and len(manager.wakes) == wakes


def test_a_name_the_manager_does_not_know_is_a_404_at_once(tmp_path: Path) -> None:
    with lora_fleet(tmp_path) as (_engine, manager, router):
        status, _, body, waited = ask(router, "no-such-lora")
        assert status == 404, (body, router.log())
        assert body["error"]["message"] == "The model `no-such-lora` does not exist."
        assert waited < 5.0  # the manager's answer, not the 20 s hold timeout
        assert manager.models_woken() == ["no-such-lora"]
        status, _, _, waited = ask(router, "no-such-lora")  # within a second: not asked again
        assert status == 404 and waited < 1.0 and manager.models_woken() == ["no-such-lora"]
        assert metric(router, "shoal_router_held_requests", model="no-such-lora") == 0
