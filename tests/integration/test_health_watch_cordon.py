"""Cordoning through the official Kubernetes client, unchanged, against a local stand-in for
the API server (as test_autoscale_kubernetes.py does): dry run, apply once, API errors
retried; and a real ``shoal health watch --cordon`` process reaching it by kubeconfig."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client as k8s

from control.health.cordon import Cordoner
from control.health.metrics import HealthMetrics
from control.health.mockfile import Injection, inject
from control.health.types import GpuHealth, NodeHealth, Problem, Remedy, Severity
from tests.integration.conftest import ENV, wait_until
from tests.integration.test_health_watch import gpus, metric, start_watcher

pytestmark = pytest.mark.integration


@dataclass
class ApiServer:
    """The node PATCHes received; ``fail``: statuses to answer, one per request, first."""

    nodes: set[str] = field(default_factory=lambda: {"k8s-a"})
    fail: list[int] = field(default_factory=list)
    patches: list[tuple[str, str, Any]] = field(default_factory=list)  # node, type, body
    port: int = 0


def _status(code: int, message: str) -> web.Response:
    body = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": {404: "NotFound"}.get(code, "InternalError"), "code": code,
    }  # fmt: skip
    return web.json_response(body, status=code)


def make_app(api: ApiServer) -> web.Application:
    async def patch_node(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if api.fail:
            return _status(api.fail.pop(0), f"injected failure on node {name}")
        if name not in api.nodes:
            return _status(404, f'nodes "{name}" not found')
        body = json.loads(await request.read())
        api.patches.append((name, request.content_type, body))
        node = {
            "kind": "Node", "apiVersion": "v1", "metadata": {"name": name},
            "spec": {"unschedulable": bool(body["spec"]["unschedulable"])},
        }  # fmt: skip
        return web.json_response(node)

    app = web.Application()
    app.router.add_patch("/api/v1/nodes/{name}", patch_node)
    return app


@pytest.fixture
def api() -> Iterator[ApiServer]:
    """The stand-in on a free loopback port, served from its own thread's event loop."""
    server = ApiServer()
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    runner = web.AppRunner(make_app(server), access_log=None)

    async def start() -> None:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def client_for(api: ApiServer) -> k8s.ApiClient:
    return k8s.ApiClient(k8s.Configuration(host=f"http://127.0.0.1:{api.port}"))


def health(remedy: Remedy) -> NodeHealth:
    problem = Problem("xid", Severity.CRITICAL, "XID 79: GPU has fallen off the bus", remedy)
    return NodeHealth("node-a", 1.0, (GpuHealth(0, "GPU-0"), GpuHealth(1, "GPU-1", (problem,))))


def cordon_rounds(cordoner: Cordoner, reports: list[NodeHealth]) -> list[str | None]:
    async def body() -> list[str | None]:
        try:
            return [await cordoner.observe(r) for r in reports]
        finally:
            await cordoner.close()

    return asyncio.run(body())


def test_the_dry_run_patches_nothing(api: ApiServer) -> None:
    metrics = HealthMetrics()
    cordoner = Cordoner("k8s-a", apply=False, metrics=metrics, api_client_factory=lambda: client_for(api), after_checks=1)  # fmt: skip
    assert cordon_rounds(cordoner, [health(Remedy.DRAIN_NODE)] * 3) == ["dry_run", None, None]
    assert api.patches == []


def test_apply_waits_for_three_checks_in_a_row_by_default(api: ApiServer) -> None:
    cordoner = Cordoner("k8s-a", apply=True, metrics=HealthMetrics(), api_client_factory=lambda: client_for(api))  # fmt: skip
    reports = (
        [health(Remedy.DRAIN_NODE)] * 2
        + [health(Remedy.RESET_GPU)]
        + [health(Remedy.DRAIN_NODE)] * 4
    )
    assert cordon_rounds(cordoner, reports) == [None, None, None, None, None, "applied", None]
    assert len(api.patches) == 1


def test_apply_patches_the_node_unschedulable_once(api: ApiServer) -> None:
    metrics = HealthMetrics()
    cordoner = Cordoner("k8s-a", apply=True, metrics=metrics, api_client_factory=lambda: client_for(api), after_checks=1)  # fmt: skip
    reports = [health(Remedy.RESET_GPU), health(Remedy.DRAIN_NODE), health(Remedy.DRAIN_NODE)]
    assert cordon_rounds(cordoner, reports) == [None, "applied", None]
    assert len(api.patches) == 1
    node, content_type, body = api.patches[0]
    assert node == "k8s-a" and body == {"spec": {"unschedulable": True}}
    assert content_type in ("application/strategic-merge-patch+json", "application/merge-patch+json")  # fmt: skip
    get = metrics.registry.get_sample_value
    assert get("shoal_gpu_cordon_actions_total", {"result": "applied"}) == 1.0


def test_api_errors_are_counted_and_retried_next_round(api: ApiServer) -> None:
    metrics = HealthMetrics()
    api.fail = [500, 403]
    cordoner = Cordoner("k8s-a", apply=True, metrics=metrics, api_client_factory=lambda: client_for(api), after_checks=1)  # fmt: skip
    results = cordon_rounds(cordoner, [health(Remedy.DRAIN_NODE)] * 4)
    assert results == ["error", "error", "applied", None]
    assert len(api.patches) == 1
    get = metrics.registry.get_sample_value
    assert get("shoal_gpu_cordon_actions_total", {"result": "error"}) == 2.0

    unknown = Cordoner("k8s-zz", apply=True, metrics=metrics, api_client_factory=lambda: client_for(api), after_checks=1)  # fmt: skip
    assert cordon_rounds(unknown, [health(Remedy.DRAIN_NODE)] * 2) == ["error", "error"]


def test_no_api_server_is_an_error_not_a_crash(api: ApiServer) -> None:
    cordoner = Cordoner(
        "k8s-a",
        apply=True,
        after_checks=1,
        metrics=HealthMetrics(),
        api_client_factory=lambda: k8s.ApiClient(k8s.Configuration(host="http://127.0.0.1:1")),
        connect_timeout_s=1.0,
        read_timeout_s=1.0,
    )
    assert cordon_rounds(cordoner, [health(Remedy.DRAIN_NODE)]) == ["error"]


def kubeconfig(tmp_path: Path, api: ApiServer) -> dict[str, str]:
    """An environment whose kubeconfig points at the stand-in (and no in-cluster config)."""
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "stand-in",
        "clusters": [{"name": "stand-in", "cluster": {"server": f"http://127.0.0.1:{api.port}"}}],
        "users": [{"name": "watcher", "user": {"token": "t"}}],
        "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "watcher"}}],
    }))  # fmt: skip
    env = {k: v for k, v in ENV.items() if not k.startswith("KUBERNETES_")}
    return {**env, "KUBECONFIG": str(path), "NODE_NAME": "k8s-a"}


@pytest.mark.parametrize("apply", [False, True])
def test_a_watcher_process_cordons_its_node_on_xid_79(
    api: ApiServer, tmp_path: Path, apply: bool
) -> None:
    args = ["--cordon", "--cordon-apply"] if apply else ["--cordon"]
    watcher = start_watcher(tmp_path, "node-a", args=args, env=kubeconfig(tmp_path, api))
    try:
        inject(watcher.mock, Injection("xid", 1, 79))
        result = "applied" if apply else "dry_run"
        assert wait_until(
            lambda: metric(watcher, "shoal_gpu_cordon_actions_total", result=result) == 1.0,
            timeout=20,
        ), watcher.log.read_text()
        report = gpus(watcher)
        assert report is not None and not report["healthy"]
        # two more rounds with GPU 1 still sick: no second patch, no second dry-run count
        checks = metric(watcher, "shoal_gpu_check_seconds_count") or 0.0
        assert wait_until(
            lambda: (metric(watcher, "shoal_gpu_check_seconds_count") or 0.0) >= checks + 2,
            timeout=20,
        )
        assert metric(watcher, "shoal_gpu_cordon_actions_total", result=result) == 1.0
        assert [(node, body) for node, _, body in api.patches] == (
            [("k8s-a", {"spec": {"unschedulable": True}})] if apply else []
        )
    finally:
        assert watcher.stop() == 0
