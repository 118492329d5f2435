"""``--load-format shoal`` in a real ``vllm serve``: the same answers as vLLM's own loader.

Three engines start side by side on the tiny model's files:

- ``default``: vLLM's default loader, ``--model`` the model's folder;
- ``s3``: Shoal's loader reading the weights from s3rver (``s3://checkpoints/tiny-llama/``,
  the model's files uploaded there), with the endpoint in ``s3_endpoint`` and s3rver's key
  in the engine's ``AWS_*`` environment, as an operator would give them;
- ``sidecar``: Shoal's loader reading them from a loader sidecar (``shoal loader serve``)
  that staged the model's folder beforehand, through its Unix socket
  (``peer+unix://SOCKET/FOLDER``: a bare path names a folder on the sidecar's host, so there
  is no fallback to the origin: the sidecar serves it or the engine fails).

The two Shoal engines get ``--model`` a folder holding only the model's small files (config,
tokenizer) and the weights' URI as ``model_weights`` in ``--model-loader-extra-config``
(vLLM reads config and tokenizer itself before any loader runs, and cannot from ``s3://``
without Run:ai's streamer, nor from ``peer://``; ``loader/vllm.py``). That folder has no
``*.safetensors``, so every weight an answer depends on came through Shoal.

Every engine computes with one thread (``VLLM_CPU_OMP_THREADS_BIND``; two of them share a
core, which costs time, not bits), so equal weights give equal bits: the generated text and
the top-5 logprobs of every token must be exactly the default loader's.
"""

from __future__ import annotations

import json
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.engines import MODEL_DIR, Engine, running_engines, spawn_engine, top_logprobs
from tests.integration.conftest import free_port
from tests.integration.servers import S3RVER_KEY, S3rver, running_s3rver

pytest.importorskip("grpc")
pytest.importorskip("boto3")

from tests.integration.test_loader_sidecar import Sidecar, start_sidecar

BUCKET = "checkpoints"
PREFIX = "tiny-llama"
WEIGHTS = "model.safetensors"
# A code prompt, a prose prompt, and token ids past the tokenizer's specials: each answer
# goes 24 tokens deep, so every layer's weights shape many logprobs.
PROMPTS: list[str | list[int]] = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "The quick brown fox jumps over the lazy dog. " * 12,
    [(97 * i + 13) % 8188 + 4 for i in range(300)],
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("load-format")


@pytest.fixture(scope="module")
def config_only(workdir: Path) -> Path:
    """The model's folder without its weights."""
    folder = workdir / "config-only"
    folder.mkdir()
    for path in MODEL_DIR.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors"):
            shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(scope="module")
def s3rver(workdir: Path) -> Iterator[S3rver]:
    with running_s3rver(workdir / "s3rver", bucket=BUCKET) as server:
        for path in sorted(MODEL_DIR.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                server.put(f"{PREFIX}/{path.name}", path.read_bytes())
        yield server


@pytest.fixture(scope="module")
def sidecar(workdir: Path) -> Iterator[tuple[Sidecar, int]]:
    metrics_port = free_port()
    (workdir / "sidecar").mkdir()
    handle = start_sidecar(workdir / "sidecar", metrics_port=metrics_port)
    try:
        with handle.client() as client:
            assert client.prefetch(str(MODEL_DIR.resolve())).origin == "staged"
        yield handle, metrics_port
    finally:
        handle.stop()


def shoal_args(model_weights: str, **extra: Any) -> list[str]:
    config = {"model_weights": model_weights, **extra}
    return ["--load-format", "shoal", "--model-loader-extra-config", json.dumps(config)]


@pytest.fixture(scope="module")
def engines(
    workdir: Path, config_only: Path, s3rver: S3rver, sidecar: tuple[Sidecar, int]
) -> Iterator[dict[str, Engine]]:
    socket_path = sidecar[0].config.socket_path
    assert socket_path is not None
    s3_env = {
        "AWS_ACCESS_KEY_ID": S3RVER_KEY,
        "AWS_SECRET_ACCESS_KEY": S3RVER_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    spawned = {
        "default": spawn_engine(workdir, "default", cpu=0),
        "s3": spawn_engine(
            workdir,
            "s3",
            cpu=1,
            model=config_only,
            extra_args=shoal_args(f"s3://{BUCKET}/{PREFIX}/", s3_endpoint=s3rver.endpoint),
            env=s3_env,
        ),
        "sidecar": spawn_engine(
            workdir,
            "sidecar",
            cpu=0,
            model=config_only,
            extra_args=shoal_args(f"peer+unix://{socket_path}/{MODEL_DIR.resolve()}"),
        ),
    }
    with running_engines(*spawned.values()):
        yield spawned


def answers(engine: Engine) -> list[tuple[str, list[dict[str, float]]]]:
    results = []
    for prompt in PROMPTS:
        answer = engine.complete(prompt, max_tokens=MAX_TOKENS, logprobs=5)
        results.append((answer["choices"][0]["text"], top_logprobs(answer)))
    return results


@pytest.fixture(scope="module")
def reference(engines: dict[str, Engine]) -> list[tuple[str, list[dict[str, float]]]]:
    result = answers(engines["default"])
    assert all(len(logprobs) == MAX_TOKENS for _, logprobs in result)
    return result


def scrape(port: int) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


def test_weights_from_s3_answer_exactly_like_vllms_own_loader(
    engines: dict[str, Engine], reference: list[tuple[str, list[dict[str, float]]]]
) -> None:
    assert answers(engines["s3"]) == reference


def test_weights_from_the_loader_sidecar_answer_exactly_like_vllms_own_loader(
    engines: dict[str, Engine],
    reference: list[tuple[str, list[dict[str, float]]]],
    sidecar: tuple[Sidecar, int],
) -> None:
    assert answers(engines["sidecar"]) == reference
    # The sidecar sent the engine at least every tensor's bytes (``Read`` serves ranges).
    served = scrape(sidecar[1])["shoal_loader_read_bytes_served_total"]
    assert served >= tensor_bytes(MODEL_DIR / WEIGHTS), served


def tensor_bytes(path: Path) -> int:
    """A safetensors file's size less its header (8-byte length, then JSON)."""
    with path.open("rb") as file:
        header_len = int.from_bytes(file.read(8), "little")
    return path.stat().st_size - 8 - header_len
