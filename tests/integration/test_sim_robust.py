"""A simulated engine under the abuse a router fleet puts it through, over real sockets:
clients that hang up before or after their first token, a hung engine whose clients give
up, and hundreds of concurrent streams. After each, the engine must be back to idle
(nothing running or waiting, no KV block held) and keep serving."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from sim.process import SimEngineProcess, running_sim_engine
from sim.profile import StepProfile
from tests.integration.conftest import free_port, wait_until

pytestmark = pytest.mark.integration


def metric(engine: SimEngineProcess, name: str, **labels: str) -> float:
    return engine.metric(name, **labels)


def complete(engine: SimEngineProcess, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = engine.request("POST", "/v1/completions", body)
    assert status == 200, raw
    return dict(json.loads(raw))


# A decode step of 20 ms simulated (2 ms of wall time at --time-scale 10): a 1,000-token
# answer takes 2 s, long enough for a test to hang up in the middle.
PROFILE = StepProfile(c0_s=0.02, c_prefill_s=0.0, c_decode_s=0.0, c_kv_s=0.0)


@pytest.fixture(scope="module")
def engine() -> Iterator[SimEngineProcess]:
    with running_sim_engine(
        free_port(), profile=PROFILE, time_scale=10, max_num_seqs=2, num_gpu_blocks=512
    ) as handle:
        yield handle


def open_request(engine: SimEngineProcess, body: dict[str, Any]) -> socket.socket:
    """A raw POST /v1/completions whose socket the test closes when it likes."""
    data = json.dumps(body).encode()
    conn = socket.create_connection(("127.0.0.1", engine.port), timeout=5)
    conn.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return conn


def idle(engine: SimEngineProcess) -> bool:
    return (
        metric(engine, "vllm:num_requests_running") == 0
        and metric(engine, "vllm:num_requests_waiting") == 0
        and metric(engine, "vllm:kv_cache_usage_perc") == 0
        and metric(engine, "shoal_sim_open_requests") == 0
    )


def test_clients_that_hang_up_before_or_after_their_first_token_free_everything(
    engine: SimEngineProcess,
) -> None:
    aborts = metric(engine, "shoal_sim_client_aborts_total")
    done = metric(engine, "vllm:request_success_total", finished_reason="length")
    # max_num_seqs=2: two requests run (streamed tokens arrive), four wait for a seat.
    streams = [
        open_request(engine, {"prompt": [20 + i] * 40, "max_tokens": 1000, "stream": True})
        for i in range(2)
    ]
    for conn in streams:
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
    waiting = [
        open_request(engine, {"prompt": [30 + i] * 40, "max_tokens": 1000, "stream": i % 2 == 0})
        for i in range(4)
    ]
    assert wait_until(lambda: metric(engine, "vllm:num_requests_waiting") == 4)
    assert metric(engine, "vllm:num_requests_running") == 2
    assert metric(engine, "vllm:kv_cache_usage_perc") > 0
    for conn in streams + waiting:
        conn.close()
    assert wait_until(lambda: idle(engine)), engine.get("/metrics")
    assert metric(engine, "shoal_sim_client_aborts_total") - aborts == 6
    # As vLLM: a client's hang-up is no finished request, "abort" included.
    assert metric(engine, "vllm:request_success_total", finished_reason="abort") == 0
    assert metric(engine, "vllm:request_success_total", finished_reason="length") == done
    assert complete(engine, {"prompt": "still serving", "max_tokens": 3})["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 5,
        "completion_tokens": 3,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def test_a_hung_engine_lets_go_of_clients_that_gave_up(engine: SimEngineProcess) -> None:
    engine.set_faults(hang="requests")
    try:
        conns = [open_request(engine, {"prompt": "hello", "max_tokens": 5}) for _ in range(10)]
        assert wait_until(lambda: metric(engine, "shoal_sim_open_requests") == 10)
        for conn in conns:
            conn.close()
        assert wait_until(lambda: metric(engine, "shoal_sim_open_requests") == 0)
    finally:
        engine.set_faults(hang="off")
    assert wait_until(lambda: idle(engine))
    assert complete(engine, {"prompt": "after the hang", "max_tokens": 2})["choices"]


async def stream_tokens(session: aiohttp.ClientSession, url: str, i: int) -> tuple[int, int]:
    """(tokens streamed, completion_tokens in the usage chunk) of one request."""
    body = {
        "prompt": f"request {i} " + "word " * (i % 40),
        "max_tokens": 10 + i % 13,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = usage = 0
    async with session.post(url + "/v1/completions", json=body) as reply:
        assert reply.status == 200
        async for line in reply.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: ") :])
            if chunk["choices"]:
                tokens += 1
            else:
                usage = chunk["usage"]["completion_tokens"]
    return tokens, usage


@pytest.mark.parametrize("time_scale", [1, 1000])
def test_two_hundred_concurrent_streams_all_finish(time_scale: int) -> None:
    async def run(url: str) -> list[tuple[int, int]]:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            return await asyncio.gather(*(stream_tokens(session, url, i) for i in range(200)))

    fast = StepProfile(c0_s=0.005, c_prefill_s=0.0, c_decode_s=0.0, c_kv_s=0.0)
    with running_sim_engine(
        free_port(),
        profile=fast,
        time_scale=time_scale,
        num_gpu_blocks=256,
        max_num_seqs=64,
        max_model_len=1024,
    ) as engine:
        results = asyncio.run(asyncio.wait_for(run(engine.url), timeout=30))
        expected = [(10 + i % 13, 10 + i % 13) for i in range(200)]
        assert results == expected
        assert metric(engine, "vllm:request_success_total", finished_reason="length") == 200
        assert metric(engine, "vllm:generation_tokens_total") == sum(n for n, _ in expected)
        assert metric(engine, "vllm:time_to_first_token_seconds_count") == 200
        assert metric(engine, "vllm:inter_token_latency_seconds_count") == sum(
            n - 1 for n, _ in expected
        )
        assert wait_until(lambda: idle(engine))


def test_a_busy_engine_far_faster_than_real_time_still_answers_scrapes() -> None:
    """At --time-scale 100000 no step waits for the wall clock; the engine loop must still
    let the server run between steps, or a /metrics scrape (and /health, new requests,
    streamed tokens) is answered only when the engine has nothing left to run."""

    async def scrape_during_run(url: str) -> tuple[float, list[int]]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def ask(i: int) -> int:
                body = {"prompt": f"long {i}", "max_tokens": 3000}
                async with session.post(url + "/v1/completions", json=body) as reply:
                    return int((await reply.json())["usage"]["completion_tokens"])

            asks = [asyncio.create_task(ask(i)) for i in range(30)]
            running = 0.0
            while running == 0 and not all(a.done() for a in asks):
                async with session.get(url + "/metrics") as reply:
                    running = running_now(await reply.text())
            return running, list(await asyncio.gather(*asks))

    with running_sim_engine(free_port(), time_scale=100000, max_model_len=4096) as engine:
        running, done = asyncio.run(asyncio.wait_for(scrape_during_run(engine.url), timeout=30))
        assert done == [3000] * 30
        assert running > 0, "no scrape was answered while a request was running"


def running_now(text: str) -> float:
    """vllm:num_requests_running in one /metrics text."""
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no vllm:num_requests_running")


def test_a_bug_in_one_request_is_vllms_500_json_and_the_engine_serves_on() -> None:
    """vLLM's last-resort handler turns any exception into a 500 error JSON; so does the
    simulator's (here a bug planted in the engine's submit, for one request)."""
    from aiohttp.test_utils import TestClient, TestServer

    from sim.config import SimConfig
    from sim.server import SimServer

    async def scenario() -> tuple[int, dict[str, Any], int]:
        server = SimServer(SimConfig(time_scale=100))
        real_submit = server.engine.submit
        calls = 0

        def buggy_once(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                raise KeyError("planted")
            return real_submit(*args, **kwargs)

        server.engine.submit = buggy_once  # type: ignore[method-assign]
        async with TestClient(TestServer(server.app())) as client:
            body = {"prompt": "x", "max_tokens": 2}
            first = await client.post("/v1/completions", json=body)
            error = await first.json()
            second = await client.post("/v1/completions", json=body)
            return first.status, error, second.status

    status, error, after = asyncio.run(scenario())
    assert (status, after) == (500, 200)
    assert error == {
        "error": {
            "message": "Internal Server Error",
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
