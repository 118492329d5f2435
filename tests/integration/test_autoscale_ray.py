"""``shoal autoscale run --target ray:URL`` as a real process scaling an engines daemon's
fleet over its HTTP API (the daemon in-process, its fleet instant): a wake scales the
fleet from zero through ``POST /v1/scale`` with the daemon's token; the controller reads
the fleet back; a wrong token is a 503 naming the daemon, and the fleet is untouched."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.conftest import ENV, free_port
from tests.integration.test_engines_server import serving

pytestmark = pytest.mark.integration

TOKEN = "fleet-s3cret"


@asynccontextmanager
async def autoscaler(target: str, token_file: Path, tmp_path: Path) -> AsyncIterator[str]:
    port = free_port()
    log = tmp_path / "autoscale.log"
    with open(log, "w") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "shoal", "autoscale", "run", "--target", target,
            "--target-token-file", str(token_file), "--policy", "kpa", "--min-replicas", "0",
            "--max-replicas", "3", "--model", "m", "--interval-s", "0.3",
            "--metrics", "requests_waiting:4", "--port", str(port),
            env=ENV, stdout=out, stderr=out,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            async with asyncio.timeout(30):
                while True:
                    assert process.returncode is None, log.read_text()
                    try:
                        await call(url + "/metrics")
                        break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.1)
            yield url
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()
    assert process.returncode == 0, log.read_text()


async def call(url: str, body: Any = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request("POST" if body is not None else "GET", url, json=body) as reply,
    ):
        text = await reply.text()
        return reply.status, json.loads(text) if "json" in reply.content_type else text


def test_a_wake_scales_a_ray_fleet_from_zero_through_the_daemon(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")

    async def scenario() -> None:
        async with (
            serving(TOKEN, replicas=0) as (engines, daemon),
            autoscaler(f"ray:{engines}", token_file, tmp_path) as url,
        ):
            assert daemon.spec.replicas == 0
            assert await call(url + "/v1/wake", {"model": "m"}) == (202, {"desired": 1})
            assert daemon.spec.replicas == 1  # asked of the daemon before the answer
            async with asyncio.timeout(20):
                while True:
                    code, status = await call(url + "/status")
                    assert code == 200
                    if status["replicas"] == {"spec": 1, "ready": 1, "pending": 0}:
                        break
                    await asyncio.sleep(0.1)
            assert status["target"] == f"ray:{engines}"

    asyncio.run(scenario())


def test_a_wrong_token_is_a_503_naming_the_daemon(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("not-the-token\n")

    async def scenario() -> None:
        async with (
            serving(TOKEN, replicas=0) as (engines, daemon),
            autoscaler(f"ray:{engines}", token_file, tmp_path) as url,
        ):
            code, answer = await call(url + "/v1/wake", {"model": "m"})
            assert code == 503
            assert f"engines daemon {engines}/v1/fleet: HTTP 401" in answer["error"]
            assert daemon.spec.replicas == 0
            _, metrics = await call(url + "/metrics")
            assert "shoal_autoscale_actuator_errors_total" in metrics
            assert "shoal_autoscale_actuator_errors_total 0.0" not in metrics

    asyncio.run(scenario())
