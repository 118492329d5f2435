"""The LoRA manager as a real process against simulated engines with --enable-lora.

Engines are ``shoal sim engine`` processes (``--max-loras 2``, and ``--budget 2`` for the
manager: an idle engine exports no ``vllm:lora_requests_info`` sample to read it from),
listed in a discovery file the test rewrites to scale out; traffic comes from a real
router's arrivals counter.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shoal.processes import shoal_env
from sim.process import SimEngineProcess, running_sim_engine, start_sim_engine
from tests.integration.conftest import free_port, wait_until
from tests.integration.lora_process import LoraProcess, running_lora_manager, write_discovery
from tests.unit.lora_factories import write_adapter

BASE = "llama"
ENGINE: dict[str, Any] = {"model": BASE, "enable_lora": True, "max_loras": 2, "max_cpu_loras": 2}


def adapters(engine: SimEngineProcess) -> set[str]:
    cards = json.loads(engine.get("/v1/models"))["data"]
    return {c["id"] for c in cards if c.get("parent") == BASE}


def register(manager: LoraProcess, tmp_path: Path, *names: str) -> None:
    for name in names:
        folder = write_adapter(tmp_path / "src" / name)
        body = {"name": name, "base_model": BASE, "source": str(folder)}
        status, answer = manager.request("POST", "/v1/adapters", body)
        assert status == 201, answer


@pytest.fixture
def engine_a() -> Iterator[SimEngineProcess]:
    with running_sim_engine(free_port(), **ENGINE) as engine:
        yield engine


@pytest.fixture
def discovery(tmp_path: Path, engine_a: SimEngineProcess) -> Path:
    path = tmp_path / "engines.json"
    write_discovery(path, [engine_a.url])
    return path


def manager_flags(discovery: Path, **more: Any) -> dict[str, Any]:
    flags = {"discovery": "file", "discovery_file": discovery, "interval_s": 0.3,
             "idle_unload_s": 60, "retry_base_s": 0.3, "retry_max_s": 1.0, "budget": 2}  # fmt: skip
    return {**flags, **more}


def cli(manager: LoraProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "lora", *args, "--url", manager.url],
        capture_output=True, text=True, env=shoal_env(), timeout=30,
    )  # fmt: skip


def test_load_unload_through_the_api_within_the_budget(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    with running_lora_manager(tmp_path, **manager_flags(discovery)) as manager:
        register(manager, tmp_path, "x", "y", "z")
        for name in ("x", "y"):
            status, answer = manager.request("POST", f"/v1/adapters/{name}/load", {})
            assert (status, answer) == (200, {"engines": [engine_a.url]})
        assert adapters(engine_a) == {"x", "y"}
        # budget 2 (the engine's --max-loras), both pinned: no room for z
        status, answer = manager.request("POST", "/v1/adapters/z/load", {})
        assert status == 503, answer
        assert adapters(engine_a) == {"x", "y"}
        unloaded = cli(manager, "unload", "x")
        assert unloaded.returncode == 0, unloaded.stderr
        assert f"x unloaded from {engine_a.url}" in unloaded.stdout
        loaded = cli(manager, "load", "z", "--engine", engine_a.url, "--json")
        assert loaded.returncode == 0, loaded.stderr
        assert json.loads(loaded.stdout) == {"engines": [engine_a.url]}
        assert adapters(engine_a) == {"y", "z"}
        listed = cli(manager, "list", "--json")
        by_name = {a["name"]: a for a in json.loads(listed.stdout)["adapters"]}
        assert by_name["z"]["engines"] == [engine_a.url]
        assert by_name["x"]["engines"] == []
        assert cli(manager, "load", "nope").returncode == 1
        assert manager.metric("shoal_lora_adapters_loaded", engine=engine_a.url) == 2
        assert manager.metric("shoal_lora_loads_total", reason="manual") == 3
    down = cli(manager, "status")
    assert down.returncode == 3, down.stderr


def test_registry_survives_a_restart_and_the_token_guards_the_api(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    with running_lora_manager(tmp_path, **manager_flags(discovery)) as manager:
        register(manager, tmp_path, "x")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    flags = manager_flags(discovery, auth_token_file=token)
    with running_lora_manager(tmp_path, **flags) as manager:
        assert manager.request("GET", "/metrics")[0] == 200  # open, for Prometheus
        assert manager.request("POST", "/v1/wake", {"model": "x"})[0] == 401
        assert manager.request("GET", "/status")[0] == 401
        manager.token = "s3cret"
        status, answer = manager.request("GET", "/v1/adapters")
        assert status == 200
        assert [a["name"] for a in answer["adapters"]] == ["x"]
        assert manager.request("POST", "/v1/wake", {"model": "x"})[0] == 202


def test_wake_loads_on_demand_and_unknown_is_404(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    # idle after 1 s, wakes counted as traffic over a 2 s window: the wake alone keeps x
    # past the idle time, and only while the window holds it
    flags = manager_flags(discovery, idle_unload_s=1, rate_window_s=2)
    with running_lora_manager(tmp_path, **flags) as manager:
        register(manager, tmp_path, "x")
        assert adapters(engine_a) == set()
        woken_at = time.monotonic()
        status, answer = manager.request("POST", "/v1/wake", {"model": "x"})
        assert (status, answer) == (202, {"engines": [engine_a.url]})
        assert adapters(engine_a) == {"x"}
        status, answer = manager.request("POST", "/v1/wake", {"model": "nope"})
        assert status == 404 and "nope" in answer["error"]
        # rounds every 0.3 s: were the wake not traffic, x would be idle (unloaded) by 1.3 s
        time.sleep(max(0.0, woken_at + 1.6 - time.monotonic()))
        assert adapters(engine_a) == {"x"}, manager.log()
        assert wait_until(lambda: adapters(engine_a) == set(), timeout=15), manager.log()
        assert time.monotonic() - woken_at >= 2.0  # not before the window let go of it
        assert manager.metric("shoal_lora_unloads_total", reason="idle") == 1
        assert manager.metric("shoal_lora_wakes_total", result="loaded") == 1
        assert manager.metric("shoal_lora_wakes_total", result="unknown") == 1


def test_injected_load_failures_are_retried(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    with running_lora_manager(tmp_path, **manager_flags(discovery)) as manager:
        register(manager, tmp_path, "x")
        engine_a.set_faults(fail_lora_loads=2)
        status, answer = manager.request("POST", "/v1/wake", {"model": "x"})
        assert status == 502 and "fail_lora_loads" in answer["error"], answer
        # the wake made x active: rounds retry with backoff until the engine takes it
        assert wait_until(lambda: adapters(engine_a) == {"x"}, timeout=10), manager.log()
        assert manager.metric("shoal_lora_load_failures_total") == 2
        assert engine_a.set_faults()["fail_lora_loads"] == 0


def test_restarted_engine_gets_its_adapters_back(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    with running_lora_manager(tmp_path, **manager_flags(discovery)) as manager:
        register(manager, tmp_path, "x", "y")
        for name in ("x", "y"):
            assert manager.request("POST", "/v1/wake", {"model": name})[0] == 202
        assert adapters(engine_a) == {"x", "y"}
        time.sleep(0.5)  # a round records where x and y are
        engine_a.stop()
        restarted = start_sim_engine(engine_a.port, **ENGINE)
        try:
            # it starts with none (the metric below counts the reloads, not the first loads)
            assert wait_until(lambda: adapters(restarted) == {"x", "y"}, timeout=10), manager.log()
            assert manager.metric("shoal_lora_loads_total", reason="restore") == 2
        finally:
            restarted.stop()


def test_traffic_places_and_scale_out_replicates_the_hot_adapter(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    from router.server import running_router

    router_port = free_port()
    with (
        running_router(router_port, discovery="file", discovery_file=str(discovery)) as router,
        running_lora_manager(
            tmp_path,
            **manager_flags(
                discovery, router_url=f"http://127.0.0.1:{router_port}", replica_rate=2.0
            ),
        ) as manager,
    ):
        register(manager, tmp_path, "hot", "cold")
        stop_at = time.monotonic() + 30

        def send(model: str) -> int:
            body = {"model": model, "prompt": "hi", "max_tokens": 1}
            return int(router.request("POST", "/v1/completions", body, timeout=10)[0])

        # requests for "hot" (404 while no engine lists it) are its traffic: placed
        while time.monotonic() < stop_at and "hot" not in adapters(engine_a):
            send("hot")
            time.sleep(0.05)
        assert adapters(engine_a) == {"hot"}, manager.log()
        with running_sim_engine(free_port(), **ENGINE) as engine_b:
            write_discovery(discovery, [engine_a.url, engine_b.url])
            while time.monotonic() < stop_at and "hot" not in adapters(engine_b):
                send("hot")
                time.sleep(0.05)
            assert adapters(engine_b) == {"hot"}, manager.log()
            assert manager.metric("shoal_lora_loads_total", reason="replicate") >= 1
            assert adapters(engine_a) == {"hot"}  # cold never had traffic


def test_the_router_holds_a_request_while_the_manager_loads_its_adapter(
    tmp_path: Path, engine_a: SimEngineProcess, discovery: Path
) -> None:
    from router.server import running_router

    token = tmp_path / "token"
    token.write_text("lora-token\n")
    # long rounds: only the router's wake can load the adapter in time
    flags = manager_flags(discovery, auth_token_file=token, interval_s=60)
    with running_lora_manager(tmp_path, **flags) as manager:
        manager.token = "lora-token"
        register(manager, tmp_path, "sql")
        with running_router(
            free_port(), engines=[engine_a.url], lora_url=manager.url, lora_token_file=token,
            models_interval_s=120, hold_timeout_s=20, strategy="lora-affinity",
        ) as router:  # fmt: skip

            def ask(model: str) -> tuple[int, Any]:
                body = {"model": model, "prompt": "SELECT", "max_tokens": 2}
                status, _, raw = router.request("POST", "/v1/completions", body, timeout=30)
                return int(status), json.loads(raw)

            status, body = ask("sql")
            assert status == 200 and body["model"] == "sql", (body, router.log())
            assert adapters(engine_a) == {"sql"}
            assert manager.metric("shoal_lora_loads_total", reason="wake") == 1
            started = time.monotonic()
            status, body = ask("unknown-lora")
            assert status == 404 and time.monotonic() - started < 5, body
            assert manager.metric("shoal_lora_wakes_total", result="unknown") == 1
