"""The Kubernetes actuator through the official client, unchanged, against a local stand-in
for the API server: the scale subresource, the workload's status, its pods; 404, 409, 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client as k8s

from control.autoscale.actuators.kubernetes import KubernetesActuator
from control.autoscale.errors import ActuatorError, ActuatorNotFound

pytestmark = pytest.mark.integration

LABELS = {"app": "engine", "model": "llama"}


@dataclass
class Workload:
    replicas: int
    ready: int
    labels: dict[str, str] = field(default_factory=lambda: dict(LABELS))


@dataclass
class ApiServer:
    """What the stand-in serves; ``fail`` maps a path suffix to the status to answer once."""

    workloads: dict[tuple[str, str, str], Workload] = field(default_factory=dict)
    pods: list[dict[str, Any]] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)
    patches: list[tuple[str, str, Any]] = field(default_factory=list)  # path, type, body
    selectors: list[str] = field(default_factory=list)
    stall: set[str] = field(default_factory=set)  # path suffixes that never answer
    release: asyncio.Event = field(default_factory=asyncio.Event)  # set at teardown


def _status(code: int, message: str) -> web.Response:
    body = {
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": {404: "NotFound", 409: "Conflict"}.get(code, "InternalError"),
        "code": code,
    }  # fmt: skip
    return web.json_response(body, status=code)


def _scale(kind: str, ns: str, name: str, w: Workload) -> dict[str, Any]:
    return {
        "kind": "Scale", "apiVersion": "autoscaling/v1",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7"},
        "spec": {"replicas": w.replicas},
        "status": {"replicas": w.replicas, "selector": ",".join(f"{k}={v}" for k, v in w.labels.items())},
    }  # fmt: skip


def _workload(kind: str, ns: str, name: str, w: Workload) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "replicas": w.replicas,
        "selector": {"matchLabels": w.labels},
        "template": {
            "metadata": {"labels": w.labels},
            "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
        },
    }
    if kind == "statefulsets":
        spec["serviceName"] = name
    return {
        "kind": "Deployment" if kind == "deployments" else "StatefulSet",
        "apiVersion": "apps/v1",
        "metadata": {"name": name, "namespace": ns, "generation": 3},
        "spec": spec,
        "status": {"replicas": w.replicas, "readyReplicas": w.ready, "observedGeneration": 3},
    }


def pod(name: str, ip: str, *, ready: bool = True, deleting: bool = False) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": "serving", "labels": dict(LABELS)}
    if deleting:
        metadata["deletionTimestamp"] = "2026-12-06T12:00:00Z"
    return {
        "metadata": metadata,
        "spec": {"containers": [{"name": "engine", "image": "vllm/vllm-openai"}]},
        "status": {
            "phase": "Running",
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def make_app(api: ApiServer) -> web.Application:
    @web.middleware
    async def stalling(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if any(request.path.endswith(suffix) for suffix in api.stall):
            await api.release.wait()  # a stalled API server: connected, never answers
        return await handler(request)

    def failure(path: str) -> web.Response | None:
        for suffix, code in list(api.fail.items()):
            if path.endswith(suffix):
                del api.fail[suffix]
                return _status(code, f"injected {code} on {path}")
        return None

    def find(request: web.Request) -> tuple[str, str, str, Workload] | web.Response:
        kind, ns, name = (request.match_info[k] for k in ("kind", "ns", "name"))
        injected = failure(request.path)
        if injected is not None:
            return injected
        workload = api.workloads.get((kind, ns, name))
        if workload is None:
            return _status(404, f'{kind}.apps "{name}" not found')
        return kind, ns, name, workload

    async def get_scale(request: web.Request) -> web.Response:
        found = find(request)
        return found if isinstance(found, web.Response) else web.json_response(_scale(*found))

    async def patch_scale(request: web.Request) -> web.Response:
        found = find(request)
        if isinstance(found, web.Response):
            return found
        body = json.loads(await request.read())
        api.patches.append((request.path, request.content_type, body))
        found[3].replicas = int(body["spec"]["replicas"])
        return web.json_response(_scale(*found))

    async def get_workload(request: web.Request) -> web.Response:
        found = find(request)
        return found if isinstance(found, web.Response) else web.json_response(_workload(*found))

    async def list_pods(request: web.Request) -> web.Response:
        injected = failure(request.path)
        if injected is not None:
            return injected
        selector = request.query.get("labelSelector", "")
        api.selectors.append(selector)
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = [
            p for p in api.pods
            if p["metadata"]["namespace"] == request.match_info["ns"]
            and all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        ]  # fmt: skip
        return web.json_response(
            {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
             "items": items}
        )  # fmt: skip

    app = web.Application(middlewares=[stalling])
    base = "/apis/apps/v1/namespaces/{ns}/{kind}/{name}"
    app.router.add_get(base + "/scale", get_scale)
    app.router.add_patch(base + "/scale", patch_scale)
    app.router.add_get(base, get_workload)
    app.router.add_get("/api/v1/namespaces/{ns}/pods", list_pods)
    return app


@asynccontextmanager
async def stand_in(api: ApiServer) -> AsyncIterator[k8s.ApiClient]:
    """The stand-in on a free loopback port and an official client configured for it."""
    runner = web.AppRunner(make_app(api), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    configuration = k8s.Configuration(host=f"http://127.0.0.1:{port}")
    api_client = k8s.ApiClient(configuration)
    try:
        yield api_client
    finally:
        api.release.set()
        await asyncio.to_thread(api_client.close)
        await runner.cleanup()


def run(api: ApiServer, body: Callable[[k8s.ApiClient], Awaitable[None]]) -> None:
    async def main() -> None:
        async with stand_in(api) as api_client:
            await body(api_client)

    asyncio.run(main())


def test_state_reads_spec_ready_pending_and_ready_pod_endpoints() -> None:
    api = ApiServer(
        workloads={("deployments", "serving", "llama"): Workload(replicas=4, ready=2)},
        pods=[
            pod("llama-a", "10.0.0.5"),
            pod("llama-b", "10.0.0.6"),
            pod("llama-c", "10.0.0.7", ready=False),
            pod("llama-d", "10.0.0.8", deleting=True),
        ],
    )

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "deployment", "llama", namespace="serving", engine_port=8000, api_client=api_client
        )
        state = await actuator.state()
        assert (state.spec, state.ready, state.pending) == (4, 2, 2)
        assert state.endpoints == ("http://10.0.0.5:8000", "http://10.0.0.6:8000")

    run(api, body)
    assert api.selectors == ["app=engine,model=llama"]


def test_scale_patches_the_scale_subresource() -> None:
    api = ApiServer(workloads={("deployments", "serving", "llama"): Workload(2, 2)})

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "deployment", "llama", namespace="serving", api_client=api_client
        )
        await actuator.scale(5)
        state = await actuator.state()
        assert (state.spec, state.ready, state.pending) == (5, 2, 3)

    run(api, body)
    path, content_type, patch = api.patches[0]
    assert path == "/apis/apps/v1/namespaces/serving/deployments/llama/scale"
    # a merge patch of spec.replicas, as the API server takes on the scale subresource
    assert content_type in (
        "application/strategic-merge-patch+json",
        "application/merge-patch+json",
    )
    assert patch == {"spec": {"replicas": 5}}


def test_statefulsets_scale_the_same_way() -> None:
    api = ApiServer(workloads={("statefulsets", "serving", "llama"): Workload(1, 1)})

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "statefulset", "llama", namespace="serving", api_client=api_client
        )
        await actuator.scale(0)
        assert (await actuator.state()).spec == 0

    run(api, body)
    assert api.patches[0][0].endswith("/statefulsets/llama/scale")


def test_a_missing_workload_is_not_found_naming_target_and_namespace() -> None:
    api = ApiServer()

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "deployment", "nope", namespace="serving", api_client=api_client
        )
        with pytest.raises(ActuatorNotFound, match="deployment/nope in namespace serving"):
            await actuator.state()
        with pytest.raises(ActuatorNotFound, match="404"):
            await actuator.scale(1)

    run(api, body)


@pytest.mark.parametrize("code", [409, 500])
def test_conflicts_and_server_errors_are_actuator_errors(code: int) -> None:
    api = ApiServer(
        workloads={("deployments", "serving", "llama"): Workload(2, 2)},
        fail={"/deployments/llama/scale": code},
    )

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "deployment", "llama", namespace="serving", api_client=api_client
        )
        with pytest.raises(
            ActuatorError, match=f"scale of deployment/llama in namespace serving failed: {code}"
        ) as caught:
            await actuator.scale(3)
        assert not isinstance(caught.value, ActuatorNotFound)
        await actuator.scale(3)  # the next call goes through
        assert (await actuator.state()).spec == 3

    run(api, body)


def test_pod_list_failure_is_an_actuator_error() -> None:
    api = ApiServer(
        workloads={("deployments", "serving", "llama"): Workload(2, 2)},
        fail={"/pods": 500},
    )

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "deployment", "llama", namespace="serving", api_client=api_client
        )
        with pytest.raises(ActuatorError, match="list pods"):
            await actuator.state()

    run(api, body)


def test_an_unreachable_api_server_is_an_actuator_error() -> None:
    from tests.integration.conftest import free_port

    configuration = k8s.Configuration(host=f"http://127.0.0.1:{free_port()}")
    configuration.retries = 0
    api_client = k8s.ApiClient(configuration)
    actuator = KubernetesActuator("deployment", "llama", namespace="serving", api_client=api_client)

    async def body() -> None:
        try:
            with pytest.raises(ActuatorError, match="cannot reach the API server"):
                await actuator.state()
        finally:
            await actuator.close()

    asyncio.run(body())


@pytest.mark.parametrize("stalled", ["/scale", "/pods"])
def test_a_stalled_api_server_fails_the_call_in_its_deadline_naming_the_target(
    stalled: str,
) -> None:
    api = ApiServer(
        workloads={("deployments", "serving", "llama"): Workload(replicas=2, ready=2)},
        stall={stalled},
    )

    async def body(api_client: k8s.ApiClient) -> None:
        actuator = KubernetesActuator(
            "deployment", "llama", namespace="serving", api_client=api_client,
            connect_timeout_s=1.0, read_timeout_s=0.5,
        )  # fmt: skip
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ActuatorError, match="deployment/llama in namespace serving"):
            await asyncio.wait_for(actuator.state(), 20)  # unbounded before the fix
        assert loop.time() - started < 10
        if stalled == "/scale":
            with pytest.raises(ActuatorError, match="scale of deployment/llama"):
                await asyncio.wait_for(actuator.scale(3), 20)

    run(api, body)
