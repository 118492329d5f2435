"""The router's precise prefix lookup against a real ``vllm serve``: the keys the router
computes from a client's text or chat request are the keys the engine's KV events and
its Shoal connector produce.

One engine (core 0) with Shoal's connector and KV events, one cache daemon told only the
model (it learns the layout from the connector's hello). The engine serves a completion
and a chat; then ``PreciseLocator`` (tokenizer.json and the chat template of the tiny
Llama, ``dialect="vllm"``, the namespace and 256-token chunk the daemon learned) finds
every full chunk of each prompt on the engine's GPU and in its node's daemon, which is
only possible when every router key equals the engine's, and ``usage.prompt_tokens``
equals the router's token count.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from router.precise import PreciseLocator, PromptTokenizer
from router.types import EngineView, PrefixView, RouteRequest
from tests.e2e.engines import (
    CHUNK,
    MODEL_DIR,
    SERVED_NAME,
    Engine,
    connector_config,
    kv_events_config,
    running_engines,
    spawn_engine,
)
from tests.integration.conftest import DaemonProcess, start_daemon, wait_until

TOPIC = "kv-events"
TEXT = (
    "Routers that know where a prompt's prefix already sits can send the request there, "
    "and the engine then skips recomputing the shared part of its attention state. "
) * 16
CHAT = [
    {"role": "system", "content": "You are a precise assistant for cache questions. " * 16},
    {"role": "user", "content": "Explain how a cluster-wide index of KV blocks helps. " * 22},
]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, DaemonProcess]]:
    workdir = tmp_path_factory.mktemp("router-precise")
    events, replay = f"ipc://{workdir}/kv-events.sock", f"ipc://{workdir}/kv-replay.sock"
    daemon = start_daemon(
        workdir,
        shm_bytes="64MiB",
        dram_bytes="0",
        engine_events=events,
        engine_events_replay=replay,
        engine_events_topic=TOPIC,
        engine_model=MODEL_DIR.resolve().name,
        engine_chunk_tokens=CHUNK,
    )
    try:
        engine = spawn_engine(
            workdir,
            "engine",
            cpu=0,
            kv_transfer=connector_config(daemon.endpoint, chunk_tokens=CHUNK),
            kv_events=kv_events_config(events, replay, TOPIC),
        )
        with running_engines(engine):
            yield engine, daemon
    finally:
        daemon.stop()


def engine_status(daemon: DaemonProcess) -> dict[str, Any]:
    with daemon.client(heartbeat=False) as client:
        (status,) = client.cluster_status()["engines"]
    return dict(status)


def test_router_keys_equal_the_real_engines_keys_for_text_and_chat(
    served: tuple[Engine, DaemonProcess],
) -> None:
    engine, daemon = served
    assert wait_until(lambda: engine_status(daemon)["connected"], timeout=30)
    tokenizer = PromptTokenizer(MODEL_DIR)
    completion = RouteRequest("r1", "completions", SERVED_NAME, TEXT, 0)
    chat = RouteRequest("r2", "chat", SERVED_NAME, "", 0, messages=tuple(CHAT))
    sizes = {}
    for request, path, body in (
        (completion, "/v1/completions", {"prompt": TEXT}),
        (chat, "/v1/chat/completions", {"messages": CHAT}),
    ):
        ids = tokenizer.token_ids(request)
        assert ids is not None and len(ids) >= 2 * CHUNK
        answer = engine.post(path, {"model": SERVED_NAME, "max_tokens": 1, **body})
        assert answer["usage"]["prompt_tokens"] == len(ids), request.route
        sizes[request.request_id] = len(ids) // CHUNK * CHUNK

    stream = engine_status(daemon)["stream"]
    candidates = [
        EngineView("e0", engine.url, frozenset({SERVED_NAME}), node=stream.split("/")[0], stream=stream),
        EngineView("e1", "http://elsewhere", frozenset({SERVED_NAME}), node="other", stream="other/gpu0"),
    ]  # fmt: skip

    async def main() -> None:
        locator = await PreciseLocator.connect(
            daemon.endpoint, tokenizer, shm_dir=daemon.config.shm_dir, timeout_s=2.0
        )
        try:
            assert locator.chunk_tokens == CHUNK
            assert locator.namespace is not None and locator.namespace.layout != "default"

            async def settled(request: RouteRequest) -> PrefixView:
                want = sizes[request.request_id]
                view: PrefixView | None = None
                for _ in range(200):
                    view = await locator.locate(request, candidates)
                    assert view is not None
                    mine = view.of("e0")
                    if mine.gpu_tokens == want and mine.node_tokens == want:
                        return view
                    await asyncio.sleep(0.1)
                raise AssertionError(f"{request.route}: {view} (want {want} on e0)")

            for request in (completion, chat):
                view = await settled(request)
                assert view.of("e1").gpu_tokens == 0 and view.of("e1").node_tokens == 0
        finally:
            await locator.close()

    asyncio.run(main())
