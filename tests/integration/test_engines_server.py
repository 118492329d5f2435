"""The engines daemon's HTTP API over real sockets, with an in-test fleet behind it: what
``shoal engines status|scale|update`` (real client processes) and the autoscaler's
``RayFleetActuator`` see; bad bodies, bearer tokens, exit codes. The fleet is the real
``EngineFleet`` over in-memory groups; the real fleet on a real Ray cluster, with
``RayEngineGroup`` and simulated engines, is in test_engines_ray.py."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control.autoscale.actuators.ray import RayFleetActuator
from control.autoscale.errors import ActuatorError, ActuatorNotFound
from control.autoscale.types import ReplicaState
from control.ray.config import EnginesSettings, fleet_spec
from control.ray.fleet import EngineFleet
from control.ray.server import EnginesDaemon, start_server
from control.ray.types import GroupPhase, GroupSpec, GroupStatus
from tests.integration.conftest import ENV, free_port

pytestmark = pytest.mark.integration

TOKEN = "engines-s3cret"


class MemoryGroup:
    """A group with no Ray behind it (``EngineFleet``'s group_factory): ready at its first
    poll, its engine URL on a closed port (a scrape of it fails at once)."""

    def __init__(self, spec: GroupSpec, group_id: str) -> None:
        self.spec = spec
        self.group_id = group_id
        self.stopped = False
        self.number = int(group_id.rpartition("-")[2])

    async def start(self) -> None:
        pass

    async def poll(self) -> GroupStatus:
        return GroupStatus(
            self.group_id,
            GroupPhase.STOPPED if self.stopped else GroupPhase.READY,
            url=f"http://127.0.0.1:{10 + self.number}",
            nodes=(f"node-{self.number}",),
            gpus=(f"node-{self.number}/gpu0",),
        )

    async def stop(self, grace_s: float = 30.0) -> None:
        self.stopped = True


@asynccontextmanager
async def serving(
    token: str | None = None, replicas: int = 1
) -> AsyncIterator[tuple[str, EnginesDaemon]]:
    """An engines daemon on a free loopback port, its fleet instant (endpoints on closed
    ports: scrapes of them fail at once)."""
    settings = EnginesSettings(
        model="m", engine_command="sim --port {port}", replicas=replicas, max_replicas=3
    )
    spec = fleet_spec(settings)
    fleet = EngineFleet(spec, group_factory=MemoryGroup, drain_s=0.0)
    daemon = EnginesDaemon(fleet, spec, max_replicas=3, interval_s=0.05)
    port = free_port()
    runner = await start_server(daemon, "127.0.0.1", port, token)
    stop = asyncio.Event()
    loop = asyncio.create_task(daemon.run(stop))
    try:
        yield f"http://127.0.0.1:{port}", daemon
    finally:
        stop.set()
        await loop
        await runner.cleanup()
        await fleet.close()


async def shoal(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shoal", "engines", *args, env=ENV,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def call(url: str, method: str, path: str, body: Any = None, *, data: bytes | None = None,
               token: str | None = None) -> tuple[int, Any]:  # fmt: skip
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.request(method, url + path, json=body, data=data) as reply,
    ):
        text = await reply.text()
        try:
            return reply.status, json.loads(text)
        except ValueError:
            return reply.status, text


async def until_ready(actuator: RayFleetActuator, ready: int) -> ReplicaState:
    async with asyncio.timeout(10):
        while (state := await actuator.state()).ready != ready:
            await asyncio.sleep(0.05)
    return state


def test_the_cli_and_the_actuator_scale_and_read_the_fleet() -> None:
    async def scenario() -> None:
        async with serving() as (url, daemon):
            actuator = RayFleetActuator(url)
            try:
                assert await until_ready(actuator, 1) == ReplicaState(
                    1, 1, 0, ("http://127.0.0.1:11",)
                )
                code, out, _ = await shoal("scale", "2", "--url", url)
                assert (code, out.strip()) == (0, "asked for 2 groups")
                state = await until_ready(actuator, 2)
                assert state.spec == 2 and len(state.endpoints) == 2
                await actuator.scale(3)  # the autoscaler's path
                assert (await until_ready(actuator, 3)).spec == 3
                code, out, _ = await shoal("status", "--url", url)
                assert code == 0
                assert out.splitlines()[0] == (
                    f"m: 3 ready, 0 pending of 3 (tp 1 x pp 1, PACK, revision "
                    f"{daemon.spec.template.revision})"
                )
                assert [line.split()[:2] for line in out.splitlines()[3:]] == [
                    ["group-1", "ready"], ["group-2", "ready"], ["group-3", "ready"],
                ]  # fmt: skip
                code, out, _ = await shoal("status", "--url", url, "--json")
                answer = json.loads(out)
                assert [g["gpus"] for g in answer["groups"]] == [
                    ["node-1/gpu0"], ["node-2/gpu0"], ["node-3/gpu0"],
                ]  # fmt: skip
                _, metrics = await call(url, "GET", "/metrics")
                assert "shoal_engines_ready 3.0" in metrics
                assert "shoal_engines_replicas_desired 3.0" in metrics
                assert 'shoal_engines_groups{phase="ready"} 3.0' in metrics
                # over --max-replicas: the daemon refuses, the CLI exits 1, the actuator raises
                code, _, err = await shoal("scale", "4", "--url", url)
                assert code == 1 and "between 0 and 3" in err and "HTTP 400" in err
                with pytest.raises(ActuatorError, match="HTTP 400: replicas must be between"):
                    await actuator.scale(4)
            finally:
                await actuator.close()

    asyncio.run(scenario())


def test_update_starts_a_rolling_update_once_and_bad_bodies_are_400() -> None:
    async def scenario() -> None:
        async with serving() as (url, daemon):
            first = daemon.spec.template.revision
            code, out, _ = await shoal("update", "--url", url, "--engine-command",
                                       "sim --port {port} --v2", "--env", "A=1")  # fmt: skip
            second = daemon.spec.template.revision
            assert (code, out.strip()) == (0, f"rolling update: revision {first} -> {second}")
            assert daemon.spec.template.env == {"A": "1"}
            code, out, _ = await shoal("update", "--url", url, "--engine-command",
                                       "sim --port {port} --v2", "--env", "A=1")  # fmt: skip
            assert (code, out.strip()) == (0, f"unchanged: revision {second}")
            fleet = daemon.fleet
            assert isinstance(fleet, EngineFleet)
            assert fleet.spec.template == daemon.spec.template and fleet.counters().updates == 1
            assert await call(url, "POST", "/v1/update", {"tp": 2}) == (
                202, {"revision": daemon.spec.template.revision, "previous": second}
            )  # fmt: skip
            assert await call(url, "POST", "/v1/update", {"colour": "red"}) == (
                400,
                {"error": "unknown key(s) ['colour']; updatable: model, engine_command, env, "
                          "tp, pp, strategy, accelerator_type, gpu_type, driver_cpus, "
                          "wait_deadline_s, ready_timeout_s, workers"},
            )  # fmt: skip
            for body in ({"replicas": "2"}, {"replicas": True}, {"replicas": 1, "x": 1}):
                code, answer = await call(url, "POST", "/v1/scale", body)
                assert (code, answer) == (
                    400, {"error": 'body must be {"replicas": N} with N an integer'}
                ), body  # fmt: skip
            for raw in (b"\xff{", b"[1]"):
                code, answer = await call(url, "POST", "/v1/scale", data=raw)
                assert (code, answer) == (400, {"error": "body must be a JSON object"}), raw
            code, _ = await call(url, "POST", "/v1/update", data=b"x" * (65 << 10))
            assert code == 413
            code, _, err = await shoal("update", "--url", url)
            assert code == 2 and "nothing to change" in err
            assert await call(url, "GET", "/healthz") == (200, {"ok": True})

    asyncio.run(scenario())


def test_with_a_token_every_route_but_metrics_and_healthz_needs_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    async def scenario() -> None:
        async with serving(TOKEN) as (url, _):
            for method, path, body in (("GET", "/v1/fleet", None),
                                       ("GET", "/v1/discovery", None),
                                       ("POST", "/v1/scale", {"replicas": 2}),
                                       ("POST", "/v1/update", {"tp": 2})):  # fmt: skip
                code, answer = await call(url, method, path, body)
                assert code == 401 and "bearer token" in answer["error"]
                assert (await call(url, method, path, body, token="wrong"))[0] == 401
            assert (await call(url, "GET", "/metrics"))[0] == 200
            assert (await call(url, "GET", "/healthz"))[0] == 200
            code, _, err = await shoal("status", "--url", url)
            assert code == 1 and "HTTP 401" in err
            code, out, _ = await shoal("scale", "2", "--url", url, "--token-file", str(token_file))
            assert (code, out.strip()) == (0, "asked for 2 groups")
            good, bad = RayFleetActuator(url, TOKEN), RayFleetActuator(url)
            try:
                assert (await until_ready(good, 2)).spec == 2
                # what a router's --discovery http reads: the ready groups, file-shaped
                # (published at the end of the round that saw them ready)
                expected = [{"url": "http://127.0.0.1:11", "gpus": ["node-1/gpu0"]},
                            {"url": "http://127.0.0.1:12", "gpus": ["node-2/gpu0"]}]  # fmt: skip
                async with asyncio.timeout(10):
                    while (answer := await call(url, "GET", "/v1/discovery", token=TOKEN)) != (
                        200, expected
                    ):  # fmt: skip
                        assert answer[0] == 200, answer
                        await asyncio.sleep(0.05)
                with pytest.raises(ActuatorError, match="HTTP 401"):
                    await bad.state()
            finally:
                await good.close()
                await bad.close()

    asyncio.run(scenario())


def test_unreachable_or_wrong_urls_are_exit_3_and_actuator_errors() -> None:
    async def scenario() -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        code, _, err = await shoal("status", "--url", url)
        assert code == 3 and f"cannot reach {url}" in err
        actuator = RayFleetActuator(url, timeout_s=2.0)
        with pytest.raises(ActuatorError, match=f"engines daemon {url}/v1/fleet: Client"):
            await actuator.state()
        await actuator.close()
        async with serving() as (good_url, _):
            elsewhere = RayFleetActuator(good_url + "/not-here")
            with pytest.raises(ActuatorNotFound, match="404"):
                await elsewhere.scale(1)
            await elsewhere.close()

    asyncio.run(scenario())


def test_serve_refuses_to_listen_beyond_loopback_without_a_token() -> None:
    async def scenario() -> None:
        code, _, err = await shoal("serve", "--model", "m", "--engine-command",
                                   "sim --port {port}", "--host", "0.0.0.0")  # fmt: skip
        assert code == 2
        assert "beyond loopback without authentication" in err
        assert "--auth-token-file FILE, or --insecure-no-auth" in err
        code, _, err = await shoal("serve", "--engine-command", "sim --port {port}")
        assert (code, err.strip()) == (
            2,
            "shoal: --model is required: the model every engine serves",
        )

    asyncio.run(scenario())
