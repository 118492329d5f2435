"""Precise prefix routing against a real cache daemon fed by simulated engines' KV events.

Two simulated engines (``shoal sim engine --tokenizer`` with the tiny Llama's tokenizer,
blocks of 16 tokens) publish vLLM KV events to one cache daemon, which keys them in
chunks of 32 tokens (two blocks, as the real engines' 128-token blocks make 256-token
chunks). The router's ``PreciseLocator`` tokenizes a prompt, keys it, and asks the
daemon: the engine that served the prompt holds all of its full chunks on its GPU, the
other none. A full-length GPU run means every key the router computed equals the key the
daemon built from the engine's own events (a chain differs from its first wrong chunk on).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kvcache.keys import Namespace, chain_keys
from router.precise import PreciseLocator, PromptTokenizer
from router.types import EngineView, RouteRequest
from shoal.errors import ConfigError
from sim.process import SimEngineProcess, start_sim_engine
from tests.integration.conftest import DaemonProcess, free_port, start_daemon, wait_until

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / ".cache/engine/tiny-llama"
MODEL = "tiny-sim@1"
BLOCK = 16
CHUNK = 32

pytestmark = pytest.mark.skipif(
    not (MODEL_DIR / "tokenizer.json").exists(),
    reason="the tiny model's tokenizer is missing: run scripts/setup-engine",
)

PROMPT = (
    "The router keys every prompt exactly as the engines' connectors do, so the cache "
    "daemon can say which engine already holds its prefix on the GPU. " * 4
)
CHAT = [
    {"role": "system", "content": "You answer in one short sentence about caches."},
    {"role": "user", "content": "Where does the key-value cache of a long shared prefix "
                                "live when two engines serve the same model? " * 5},
]  # fmt: skip


def events_config(port: int) -> dict[str, Any]:
    return {"enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"tcp://*:{port}", "topic": "kv-events"}  # fmt: skip


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[DaemonProcess, list[SimEngineProcess]]]:
    ports = [free_port(), free_port()]
    node = start_daemon(
        tmp_path,
        engine_events=",".join(f"tcp://127.0.0.1:{p}" for p in ports),
        engine_events_topic="kv-events",
        engine_model=MODEL,
        engine_chunk_tokens=CHUNK,
    )
    engines: list[SimEngineProcess] = []
    try:
        for port in ports:
            engines.append(
                start_sim_engine(
                    free_port(),
                    served_model_name="tiny",
                    tokenizer=str(MODEL_DIR),
                    block_size=BLOCK,
                    time_scale=100,
                    kv_events_config=events_config(port),
                )
            )
        assert wait_until(lambda: all(e["connected"] for e in engine_status(node)), 10)
        yield node, engines
    finally:
        for engine in engines:
            engine.stop()
        node.stop()


def engine_status(node: DaemonProcess) -> list[dict[str, Any]]:
    with node.client(heartbeat=False) as client:
        return list(client.cluster_status()["engines"])


def views(node: DaemonProcess, engines: list[SimEngineProcess]) -> list[EngineView]:
    streams = [e["stream"] for e in engine_status(node)]  # gpu0, gpu1: the events' order
    return [
        EngineView(f"e{i}", engine.url, frozenset({"tiny"}), node=s.split("/")[0], stream=s)
        for i, (engine, s) in enumerate(zip(engines, streams, strict=True))
    ]


def served_tokens(engine: SimEngineProcess, path: str, body: dict[str, Any]) -> int:
    code, raw = engine.request("POST", path, {"model": "tiny", "max_tokens": 1, **body})
    assert code == 200, raw
    return int(json.loads(raw)["usage"]["prompt_tokens"])


def test_the_engine_that_served_a_prompt_holds_its_prefix_and_the_other_none(
    fleet: tuple[DaemonProcess, list[SimEngineProcess]],
) -> None:
    node, engines = fleet
    candidates = views(node, engines)
    tokenizer = PromptTokenizer(MODEL_DIR, dialect="simulator")
    completion = RouteRequest("r1", "completions", "tiny", PROMPT, 0)
    chat = RouteRequest("r2", "chat", "tiny", "", 0, messages=tuple(CHAT))

    # engine 0 serves the completion, engine 1 the chat; each counts the prompt's tokens
    # exactly as the router does
    completion_ids = tokenizer.token_ids(completion)
    chat_ids = tokenizer.token_ids(chat)
    assert completion_ids is not None and chat_ids is not None
    assert served_tokens(engines[0], "/v1/completions", {"prompt": PROMPT}) == len(completion_ids)
    assert served_tokens(engines[1], "/v1/chat/completions", {"messages": CHAT}) == len(chat_ids)
    assert len(completion_ids) >= 4 * CHUNK and len(chat_ids) >= 4 * CHUNK

    async def main() -> None:
        locator = await PreciseLocator.connect(
            node.endpoint, tokenizer, shm_dir=node.config.shm_dir, timeout_s=1.0
        )
        try:
            # the daemon taught the locator its engines' namespace and chunk
            assert locator.namespace == Namespace(MODEL) and locator.chunk_tokens == CHUNK
            assert locator.node == candidates[0].node

            async def located(request: RouteRequest, engine_id: str) -> Any:
                for _ in range(100):  # events reach the daemon within a few of its turns
                    view = await locator.locate(request, candidates)
                    assert view is not None
                    if view.of(engine_id).gpu_tokens:
                        return view
                    await asyncio.sleep(0.05)
                raise AssertionError(f"the daemon never saw {request.request_id} on {engine_id}")

            full = len(completion_ids) // CHUNK * CHUNK
            view = await located(completion, "e0")
            assert view.source == "precise" and view.prompt_tokens == len(completion_ids)
            assert view.of("e0").gpu_tokens == full  # every full chunk: every key matched
            assert view.of("e1").gpu_tokens == 0
            view = await located(chat, "e1")
            assert view.of("e1").gpu_tokens == len(chat_ids) // CHUNK * CHUNK
            assert view.of("e0").gpu_tokens == 0

            # a prompt no engine has seen: known, and nowhere
            cold = await locator.locate(
                RouteRequest("r3", "completions", "tiny", "A different text. " * 40, 0), candidates
            )
            assert cold is not None and dict(cold.engines) == {}

            # blocks in this node's cache daemon count for every engine on this node
            keys = chain_keys(Namespace(MODEL), completion_ids, CHUNK)[:2]
            with node.client(heartbeat=False) as client:
                payloads = [np.full(4096, i, dtype=np.uint8) for i in range(len(keys))]
                assert client.put(keys, payloads).stored == 2
            view = await locator.locate(completion, candidates)
            assert view is not None
            assert [view.of(e).node_tokens for e in ("e0", "e1")] == [2 * CHUNK, 2 * CHUNK]
            assert locator.statistics().num_failures == 0
        finally:
            await locator.close()

    asyncio.run(main())


def test_a_dead_daemon_is_an_unknown_prefix_not_an_error(
    fleet: tuple[DaemonProcess, list[SimEngineProcess]],
) -> None:
    node, engines = fleet
    candidates = views(node, engines)

    async def main() -> None:
        tokenizer = PromptTokenizer(MODEL_DIR, dialect="simulator")
        locator = await PreciseLocator.connect(
            node.endpoint, tokenizer, shm_dir=node.config.shm_dir, timeout_s=0.5
        )
        try:
            request = RouteRequest("r1", "completions", "tiny", PROMPT, 0)
            assert await locator.locate(request, candidates) is not None
            node.stop()
            assert await locator.locate(request, candidates) is None
            assert locator.statistics().num_failures == 1
        finally:
            await locator.close()

    asyncio.run(main())


def test_a_locator_built_without_io_connects_off_the_request_path(
    fleet: tuple[DaemonProcess, list[SimEngineProcess]], tmp_path: Path
) -> None:
    node, engines = fleet
    candidates = views(node, engines)
    tokenizer = PromptTokenizer(MODEL_DIR, dialect="simulator")
    request = RouteRequest("r1", "completions", "tiny", PROMPT, 0)

    async def main() -> None:
        # a bare socket path, a chunk the daemon will overrule, no hello yet
        locator = PreciseLocator.for_endpoint(str(node.config.socket_path), tokenizer,
                                              chunk_tokens=256, timeout_s=1.0)  # fmt: skip
        try:
            assert await locator.locate(request, candidates) is None  # connecting meanwhile
            for _ in range(100):
                view = await locator.locate(request, candidates)
                if view is not None:
                    break
                await asyncio.sleep(0.02)
            assert view is not None and view.source == "precise"
            assert locator.chunk_tokens == CHUNK  # the daemon's, not the 256 given
        finally:
            await locator.close()
        with pytest.raises(ConfigError, match="no cache daemon answers"):
            await PreciseLocator.connect(str(tmp_path / "none.sock"), tokenizer)

    asyncio.run(main())
