"""The router as a real process in front of real simulated engines (issue 12): routes,
streaming without buffering, cancellation, retries, breakers, limits and failure answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from router.server import RouterProcess, running_router
from sim.process import SimEngineProcess, running_sim_engine, start_sim_engine
from tests.integration.conftest import ENV, free_port, wait_until

MODEL = "sim-7b"
FAST = {"health_interval_s": 0.2, "metrics_interval_s": 0.2, "models_interval_s": 0.5}


@contextlib.contextmanager
def sims(count: int, **flags: Any) -> Iterator[list[SimEngineProcess]]:
    """``count`` simulated engines (10x real time unless ``time_scale`` says otherwise)."""
    flags = {"time_scale": 10.0, **flags}
    engines: list[SimEngineProcess] = []
    try:
        for _ in range(count):
            engines.append(start_sim_engine(free_port(), **flags))
        yield engines
    finally:
        for engine in engines:
            engine.stop()


@contextlib.contextmanager
def router(engines: list[SimEngineProcess] | list[str], **flags: Any) -> Iterator[RouterProcess]:
    urls = [e if isinstance(e, str) else e.url for e in engines]
    settings = {"strategy": "least-request", **FAST, **flags}
    with running_router(free_port(), engines=urls, **settings) as process:
        yield process


def completion(prompt: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **extra}


def metric(router_process: RouterProcess, name: str, **labels: str) -> float:
    text = router_process.request("GET", "/metrics")[2].decode()
    total = 0.0
    for line in text.splitlines():
        found = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if found and all(f'{k}="{v}"' in found.group(1) for k, v in labels.items()):
            total += float(found.group(2))
    return total


def engines_status(router_process: RouterProcess) -> dict[str, dict[str, Any]]:
    body = json.loads(router_process.request("GET", "/router/engines")[2])
    return {row["url"]: row for row in body["engines"]}


async def stream_times(
    url: str, body: dict[str, Any], limit_s: float = 20.0
) -> list[tuple[float, bytes]]:
    """(seconds since the request, chunk) for every chunk of a streamed response."""
    chunks: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(
            url, json=body, timeout=aiohttp.ClientTimeout(total=limit_s)
        ) as reply:
            assert reply.status == 200, await reply.text()
            async for chunk in reply.content.iter_any():
                chunks.append((time.monotonic() - started, chunk))
    return chunks


def test_completions_and_chat_go_through_and_name_the_engine() -> None:
    with sims(2) as engines, router(engines) as r:
        status, headers, body = r.request("POST", "/v1/completions", completion())
        assert status == 200, body
        assert headers["x-shoal-engine"] in {e.url for e in engines}
        assert json.loads(body)["choices"][0]["finish_reason"] == "length"
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        status, headers, body = r.request("POST", "/v1/chat/completions", chat)
        assert status == 200, body
        assert json.loads(body)["object"] == "chat.completion"
        # least-request spreads sequential requests over both (ties broken at random)
        seen = {r.request("POST", "/v1/completions", completion())[1]["x-shoal-engine"]
                for _ in range(20)}  # fmt: skip
        assert seen == {e.url for e in engines}
        assert metric(r, "shoal_router_requests_total", route="completions", status="200") == 21


def test_a_stream_arrives_chunk_by_chunk_before_it_ends() -> None:
    # slowed down: one decode step takes tens of milliseconds
    with sims(1, time_scale=1.0, fault_slowdown=20.0) as engines, router(engines) as r:
        body = completion(max_tokens=12, stream=True)
        chunks = asyncio.run(stream_times(r.url + "/v1/completions", body))
        data = b"".join(c for _, c in chunks)
        assert data.rstrip().endswith(b"data: [DONE]")
        assert data.count(b"data: ") >= 13
        first, last = chunks[0][0], chunks[-1][0]
        assert len(chunks) >= 6  # not one buffered blob
        assert last - first > 0.1, chunks  # the first bytes came well before the end


def test_a_client_that_hangs_up_cancels_the_upstream_request() -> None:
    with sims(1, time_scale=1.0, fault_slowdown=20.0) as engines, router(engines) as r:
        engine = engines[0]

        async def read_two_chunks_and_leave() -> None:
            async with aiohttp.ClientSession() as session:
                body = completion(max_tokens=2000, stream=True)
                async with session.post(r.url + "/v1/completions", json=body) as reply:
                    await reply.content.readany()
                    await reply.content.readany()
                    assert engine.metric("vllm:num_requests_running") == 1.0

        asyncio.run(read_two_chunks_and_leave())
        assert wait_until(lambda: engine.metric("vllm:num_requests_running") == 0.0, timeout=5)
        assert wait_until(lambda: engines_status(r)[engine.url]["in_flight"] == 0, timeout=5)
        # the client leaving is not the engine's failure
        assert metric(r, "shoal_router_upstream_errors_total") == 0
        assert engines_status(r)[engine.url]["breaker"] == "closed"


def test_a_refused_engine_is_retried_elsewhere_and_its_breaker_opens() -> None:
    # health checks far apart: only the passive path (refusals) can notice the death
    with sims(2) as engines, router(engines, health_interval_s=60, breaker_failures=2,
                                    breaker_cooldown_s=60, strategy="random") as r:  # fmt: skip
        dead, alive = engines
        dead.stop()
        for _ in range(12):
            status, headers, body = r.request("POST", "/v1/completions", completion())
            assert status == 200, body
            assert headers["x-shoal-engine"] == alive.url
        assert metric(r, "shoal_router_upstream_errors_total", engine=dead.url) == 2
        assert metric(r, "shoal_router_retries_total") == 2
        assert engines_status(r)[dead.url]["breaker"] == "open"
        assert metric(r, "shoal_router_breaker_state", engine=dead.url) == 2


def test_an_engine_answering_5xx_is_retried_and_then_avoided() -> None:
    with sims(2) as engines, router(engines, breaker_failures=2, breaker_cooldown_s=60,
                                    strategy="random") as r:  # fmt: skip
        failing, good = engines
        failing.set_faults(fail_next=100)
        for _ in range(10):
            status, headers, _ = r.request("POST", "/v1/completions", completion())
            assert (status, headers["x-shoal-engine"]) == (200, good.url)
        assert metric(r, "shoal_router_upstream_errors_total", engine=failing.url, kind="500") == 2
        assert engines_status(r)[failing.url]["healthy"]  # /health is fine: the breaker caught it


def test_an_engine_dying_mid_stream_ends_the_stream_with_an_error_event() -> None:
    with sims(1, time_scale=1.0, fault_slowdown=5.0) as engines, router(engines) as r:
        engines[0].set_faults(die_after_chunks=3, die_mode="close")
        body = completion(max_tokens=50, stream=True)
        chunks = asyncio.run(stream_times(r.url + "/v1/completions", body, limit_s=10))
        data = b"".join(c for _, c in chunks)
        events = [e for e in data.split(b"\n\n") if e.strip()]
        error = json.loads(events[-2].removeprefix(b"data: "))
        assert error["error"]["type"] == "upstream_error"
        assert events[-1] == b"data: [DONE]"
        assert metric(r, "shoal_router_upstream_errors_total", kind="mid-stream") == 1


def test_metrics_of_an_engine_that_stops_answering_become_unknown() -> None:
    with sims(2) as engines, router(engines, metrics_stale_s=0.6, metrics_timeout_s=0.2) as r:
        frozen, fine = engines
        assert wait_until(lambda: all(row["metrics_fresh"] for row in engines_status(r).values()))
        frozen.set_faults(hang="all")
        try:
            assert wait_until(lambda: not engines_status(r)[frozen.url]["metrics_fresh"], timeout=5)
            status = engines_status(r)
            assert status[frozen.url]["metrics_age_s"] > 0.6
            assert status[fine.url]["metrics_fresh"]
            assert metric(r, "shoal_router_engine_metrics_fresh", engine=frozen.url) == 0
            assert metric(r, "shoal_router_engine_metrics_fresh", engine=fine.url) == 1
            assert wait_until(lambda: not engines_status(r)[frozen.url]["healthy"], timeout=5)
        finally:
            frozen.set_faults(hang="off")


def test_a_body_over_the_limit_is_413_and_malformed_ones_400() -> None:
    with sims(1) as engines, router(engines, max_body_bytes=2048) as r:
        status, _, body = r.request("POST", "/v1/completions", completion("x" * 4096))
        assert status == 413
        assert json.loads(body)["error"]["code"] == 413
        status, _, body = r.request("POST", "/v1/completions", b"{not json")
        assert status == 400
        assert "not valid JSON" in json.loads(body)["error"]["message"]
        status, _, body = r.request("POST", "/v1/completions", completion("x" * 1000))
        assert status == 200, body


def test_models_are_the_union_over_engines_with_adapters() -> None:
    with running_sim_engine(free_port(), served_model_name="base-a") as a, running_sim_engine(
        free_port(), served_model_name="base-b", enable_lora=True, lora_modules=["ad1=/x"]
    ) as b, router([a, b]) as r:  # fmt: skip
        assert wait_until(
            lambda: (
                {m["id"] for m in json.loads(r.request("GET", "/v1/models")[2])["data"]}
                == {"base-a", "base-b", "ad1"}
            )
        )
        status, headers, _ = r.request("POST", "/v1/completions", {"model": "ad1", "prompt": "x"})
        assert (status, headers["x-shoal-engine"]) == (200, b.url)
        status = r.request("POST", "/v1/completions", {"model": "nope", "prompt": "x"})[0]
        assert status == 404


def test_every_engine_saturated_is_429_and_none_healthy_is_503_with_retry_after() -> None:
    with sims(1, time_scale=1.0, fault_slowdown=20.0) as engines, router(
        engines, max_in_flight_per_engine=1, retry_after_s=3
    ) as r:  # fmt: skip

        async def two_at_once() -> list[tuple[int, str | None]]:
            async with aiohttp.ClientSession() as session:

                async def one(delay: float) -> tuple[int, str | None]:
                    await asyncio.sleep(delay)
                    body = completion(max_tokens=20)
                    async with session.post(r.url + "/v1/completions", json=body) as reply:
                        await reply.read()
                        return reply.status, reply.headers.get("Retry-After")

                return list(await asyncio.gather(one(0.0), one(0.3)))

        assert asyncio.run(two_at_once()) == [(200, None), (429, "3")]
    dead = f"http://127.0.0.1:{free_port()}"
    with running_router(free_port(), engines=[dead], wait_healthy=False, **FAST) as r:
        status, headers, body = r.request("POST", "/v1/completions", completion())
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert json.loads(body)["error"]["type"] == "no_engine_available"
        assert r.request("GET", "/health")[0] == 503


def test_user_rate_limits_answer_429_with_retry_after(tmp_path: Any) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice alice\nsk-bob bob\n")
    with sims(1) as engines, router(engines, user_rpm=2, api_keys=keys) as r:
        auth = {"Authorization": "Bearer sk-alice"}
        codes = [r.request("POST", "/v1/completions", completion(), headers=auth)[0]
                 for _ in range(3)]  # fmt: skip
        assert codes == [200, 200, 429]
        status, headers, _ = r.request("POST", "/v1/completions", completion(), headers=auth)
        assert status == 429 and int(headers["Retry-After"]) >= 1
        bob = {"Authorization": "Bearer sk-bob", "x-user": "alice"}  # x-user cannot claim alice
        assert r.request("POST", "/v1/completions", completion(), headers=bob)[0] == 200


def test_with_api_keys_a_request_without_a_known_key_is_401(tmp_path: Any) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-alice alice\n")
    with sims(1) as engines, router(engines, api_keys=keys) as r:
        for headers in ({}, {"x-user": "alice"}, {"Authorization": "Bearer sk-mallory"}):
            status, _, body = r.request("POST", "/v1/completions", completion(), headers=headers)
            assert status == 401
            assert json.loads(body)["error"]["type"] == "invalid_api_key"
        assert metric(r, "shoal_router_requests_total", route="completions", status="401") == 3


def test_a_router_beyond_loopback_needs_api_keys_or_an_explicit_opt_out() -> None:
    from router.config import RouterSettings
    from router.server import check_settings
    from shoal.errors import ConfigError

    with pytest.raises(ConfigError, match="--api-keys FILE, or --insecure-no-auth"):
        check_settings(RouterSettings(host="0.0.0.0", engines="http://127.0.0.1:1"))
    check_settings(RouterSettings(host="0.0.0.0", engines="http://127.0.0.1:1",
                                  insecure_no_auth=True))  # fmt: skip
    check_settings(RouterSettings(host="::1", engines="http://127.0.0.1:1"))


@pytest.mark.parametrize("header", ["x-shoal-routing-strategy", "routing-strategy"])
def test_the_strategy_header_is_honoured_and_a_bad_one_is_400(header: str) -> None:
    with sims(1) as engines, router(engines) as r:
        ok = r.request("POST", "/v1/completions", completion(), headers={header: "random"})
        assert ok[0] == 200
        assert metric(r, "shoal_router_decisions_total", strategy="random") == 1
        bad = r.request("POST", "/v1/completions", completion(), headers={header: "nope"})
        assert bad[0] == 400
        assert json.loads(bad[2])["error"]["type"] == "unknown_strategy"


def test_workers_share_the_port_and_stop_cleanly() -> None:
    with sims(1) as engines:
        with router(engines, workers=2) as r:
            pids: set[int] = set()

            def both_answer() -> bool:  # the second may still be starting: ask until both did
                pids.add(json.loads(r.request("GET", "/health")[2])["pid"])
                return len(pids) == 2

            assert wait_until(both_answer, timeout=10, interval=0.01)
            assert r.process.pid not in pids
            codes = [r.request("POST", "/v1/completions", completion())[0] for _ in range(10)]
            assert codes == [200] * 10
        assert r.process.returncode == 0


def test_engines_from_a_discovery_file_follow_its_changes(tmp_path: Any) -> None:
    pytest.importorskip("router.discovery")  # the shared-state part of issue 12
    listing = tmp_path / "engines.json"
    with sims(2) as (first, second):
        listing.write_text(json.dumps([{"url": first.url}]))
        with running_router(free_port(), discovery="file", discovery_file=listing,
                            discovery_interval_s=0.2, strategy="random", **FAST) as r:  # fmt: skip
            engines = {r.request("POST", "/v1/completions", completion())[1]["x-shoal-engine"]
                       for _ in range(5)}  # fmt: skip
            assert engines == {first.url}
            listing.write_text(json.dumps([{"url": first.url}, {"url": second.url}]))
            assert wait_until(lambda: second.url in engines_status(r), timeout=5)

            def reached_second() -> bool:
                status, headers, _ = r.request("POST", "/v1/completions", completion())
                return status == 200 and headers["x-shoal-engine"] == second.url

            assert wait_until(reached_second, timeout=5)


def test_two_routers_share_limits_and_in_flight_counts_through_redis(tmp_path: Any) -> None:
    pytest.importorskip("router.shared")  # the shared-state part of issue 12
    redis_server = pytest.importorskip("tests.integration.redis_server")
    with redis_server.running_redis(tmp_path) as redis, sims(
        1, time_scale=1.0, fault_slowdown=20.0
    ) as engines:  # fmt: skip
        engine = engines[0].url
        limits = {"redis": redis.url, "user_rpm": 4}
        with router(engines, **limits) as a, router(engines, **limits) as b:
            user = {"x-user": "carol"}
            replies = [(a, b)[i % 2].request("POST", "/v1/completions", completion(max_tokens=1),
                                             headers=user) for i in range(6)]  # fmt: skip
            assert [status for status, _, _ in replies] == [200, 200, 200, 200, 429, 429]
            assert json.loads(replies[-1][2])["error"]["type"] == "rate_limited"

        full = {"redis": redis.url, "max_in_flight_per_engine": 1}
        with router(engines, **full) as a, router(engines, **full) as b:

            async def one_long_request_through_a() -> list[int]:
                async with aiohttp.ClientSession() as session:
                    body = completion(max_tokens=30)
                    long = asyncio.ensure_future(session.post(a.url + "/v1/completions", json=body))
                    # b sees a's request in flight on the engine, and the engine is full
                    seen = await asyncio.to_thread(
                        wait_until, lambda: engines_status(b)[engine]["in_flight"] == 1, 5
                    )
                    assert seen
                    status = (await asyncio.to_thread(b.request, "POST", "/v1/completions",
                                                      completion()))[0]  # fmt: skip
                    reply = await long
                    await reply.read()
                    return [status, reply.status]

            assert asyncio.run(one_long_request_through_a()) == [429, 200]


def test_an_engine_that_accepts_and_never_answers_times_out_into_a_retry() -> None:
    with sims(2) as (wedged, good), router([wedged, good], upstream_timeout_s=0.5,
                                           breaker_failures=1, breaker_cooldown_s=60,
                                           strategy="random") as r:  # fmt: skip
        wedged.set_faults(hang="requests")  # its /health still answers, as vLLM's does
        try:
            for _ in range(30):  # random picks the wedged one soon (all 30 miss: 1e-9)
                status, headers, _ = r.request("POST", "/v1/completions", completion())
                assert (status, headers["x-shoal-engine"]) == (200, good.url)
                if engines_status(r)[wedged.url]["breaker"] == "open":
                    break
            assert metric(r, "shoal_router_upstream_errors_total", engine=wedged.url,
                          kind="timeout") == 1  # fmt: skip
            assert engines_status(r)[wedged.url]["breaker"] == "open"
        finally:
            wedged.set_faults(hang="off")


def test_the_engines_verb_shows_a_running_routers_engines() -> None:
    def shoal(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shoal", "router", *args],
                              capture_output=True, text=True, timeout=30, env=ENV)  # fmt: skip

    with sims(1) as engines, router([f"{engines[0].url}=n1/gpu0"]) as r:
        listed = shoal("engines", "--url", r.url, "--json")
        assert listed.returncode == 0, listed.stderr
        (row,) = json.loads(listed.stdout)
        assert (row["url"], row["stream"], row["healthy"]) == (engines[0].url, "n1/gpu0", True)
        table = shoal("engines", "--url", r.url)
        assert "n1/gpu0" in table.stdout and "closed" in table.stdout
        url = r.url
    gone = shoal("engines", "--url", url)
    assert gone.returncode == 3
    assert "cannot read" in gone.stderr


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ((), "--engines"),
        (("--engines", "http://127.0.0.1:1", "--strategy", "nope"), "--strategy: unknown"),
        (("--engines", "127.0.0.1:1"), "--engines item"),
        (("--engines", "http://127.0.0.1:1", "--workers", "0"), "workers"),
    ],
)
def test_bad_settings_stop_the_router_with_one_line_and_exit_2(
    argv: tuple[str, ...], words: str
) -> None:
    done = subprocess.run([sys.executable, "-m", "shoal", "router", "serve", *argv],
                          capture_output=True, text=True, timeout=30, env=ENV)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
