"""Real ``vllm serve`` processes for the end-to-end tests, and small HTTP helpers to talk
to them.

The engine is vLLM's CPU build in its own venv (``.venv-engine``, made by
``scripts/setup-engine``) serving the tiny Llama in ``.cache/engine/tiny-llama``; the test
process only speaks HTTP to it (and ZeroMQ, through a cache daemon). Facts behind every
choice here are in ``../shared/ENGINES.md``. Each engine:

- listens on 127.0.0.1 only (``--host``, ``VLLM_HOST_IP`` for vLLM's internal sockets);
- never reaches a hub (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, no usage stats);
- pins its compute threads to one core (``VLLM_CPU_OMP_THREADS_BIND``): two engines on
  different cores with one thread each compute bit-identical logprobs, which the prefix
  tests rely on;
- runs the working tree's Shoal (``PYTHONPATH`` ahead of the venv's editable install);
- writes ``torch.compile`` and other caches under the test's own directory;
- is ready when ``/health`` answers 200; a process that exits first, or a start slower
  than ``ready_timeout_s``, raises with the tail of its log;
- runs in its own session, so stopping it (SIGTERM, then SIGKILL after 20 s) reaches the
  engine-core process vLLM forks as well.

Logs stay in the test's temporary directory; ``tests/e2e/conftest.py`` prints the tail
of every engine that was running when a test failed.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import require_all
from tests.integration.conftest import REPO, DaemonProcess, free_port

ENGINE_PYTHON = REPO / ".venv-engine" / "bin" / "python"
MODEL_DIR = Path(os.environ.get("SHOAL_ENGINE_MODEL_DIR", REPO / ".cache/engine/tiny-llama"))
LORA_DIR = MODEL_DIR.with_name(MODEL_DIR.name + "-lora")  # its adapter (tiny_model.py)
SERVED_NAME = "tiny"
BLOCK_SIZE = 128  # the CPU attention backend's block size (ENGINES.md)
SETUP_HINT = "run scripts/setup-engine"
DEFAULT_KV_BYTES = 128 << 20
VOCAB = 8192  # the tiny model's; ids 0-3 are its special tokens
CHUNK = 256  # the Shoal chunk the e2e connectors use: two blocks of 128
EXTERNAL_HITS = "vllm:external_prefix_cache_hits_total"  # tokens loaded through a connector
LOCAL_HITS = "vllm:prefix_cache_hits_total"  # tokens found in the engine's own KV cache

LIVE: list[Engine] = []  # engines running now, for the failure report in conftest


def require_engine() -> None:
    """Skip (fail in CI) when ``scripts/setup-engine`` has not run."""
    if ENGINE_PYTHON.exists() and (MODEL_DIR / ".complete").exists():
        return
    message = f"the served vLLM or the tiny model is missing: {SETUP_HINT}"
    if require_all():
        pytest.fail(message)
    pytest.skip(message)


class EngineError(RuntimeError):
    """An engine did not start, or answered with an HTTP error."""


@dataclass
class Engine:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    # --- HTTP ---------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 120.0
    ) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"content-type": "application/json"} if payload is not None else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, path: str, body: Any, timeout: float = 120.0) -> dict[str, Any]:
        status, raw = self.request("POST", path, body, timeout)
        if status != 200:
            raise EngineError(f"{self.name}: POST {path} answered {status}: {raw[:500]!r}")
        result: dict[str, Any] = json.loads(raw)
        return result

    def complete(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 1,
        logprobs: int | None = 5,
        **extra: Any,
    ) -> dict[str, Any]:
        """A greedy ``/v1/completions`` call (temperature 0)."""
        body: dict[str, Any] = {
            "model": SERVED_NAME,
            "prompt": prompt if isinstance(prompt, str) else list(prompt),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            **extra,
        }
        if logprobs is not None:
            body["logprobs"] = logprobs
        return self.post("/v1/completions", body)

    def stream(self, path: str, body: Mapping[str, Any], timeout: float = 120.0) -> list[str]:
        """The ``data:`` payloads of a streamed answer, in order, ``[DONE]`` included."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(
                "POST",
                path,
                body=json.dumps({**body, "stream": True}).encode(),
                headers={"content-type": "application/json"},
            )
            response = connection.getresponse()
            if response.status != 200:
                raise EngineError(f"{self.name}: {path} answered {response.status}")
            events: list[str] = []
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
            return events
        finally:
            connection.close()

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of ``/metrics``: (name, sorted labels) -> value."""
        status, raw = self.request("GET", "/metrics", timeout=30)
        if status != 200:
            raise EngineError(f"{self.name}: /metrics answered {status}")
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(raw.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """The sum of ``name`` over the series whose labels include ``labels``."""
        return sum(
            value
            for (sample, series), value in self.metrics().items()
            if sample == name and set(labels.items()) <= set(series)
        )

    def healthy(self) -> bool:
        try:
            status, _ = self.request("GET", "/health", timeout=2)
        except OSError:
            return False
        return status == 200

    # --- lifecycle ----------------------------------------------------------------------

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EngineError(
                    f"engine {self.name} exited with {self.process.returncode} before it was "
                    f"ready; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.25)
        self.stop()
        raise EngineError(
            f"engine {self.name} was not ready within {timeout_s:.0f} s; log "
            f"{self.log_path}:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM to the engine's process group, then wait for the whole group: the
        engine core outlives the API server by a second or two while it unlinks its
        shared memory (``/dev/shm/psm_*``, 240 MB each here), and a SIGKILL in that window
        leaks it. Whatever is left after ``_STOP_GRACE_S`` is killed."""
        with contextlib.suppress(ValueError):
            LIVE.remove(self)
        group = self.process.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_S
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=_STOP_GRACE_S)
        while time.monotonic() < deadline and _group_alive(group):
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


_STOP_GRACE_S = 20.0


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def connector_config(endpoint: str, **extra: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` for Shoal's connector talking to the daemon at ``endpoint``."""
    return {
        "kv_connector": "ShoalConnector",
        "kv_connector_module_path": "kvcache.connector.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": endpoint, **extra},
    }


def kv_events_config(
    endpoint: str, replay_endpoint: str | None = None, topic: str = "kv-events"
) -> dict[str, Any]:
    """``--kv-events-config`` for vLLM's ZeroMQ publisher. vLLM *binds* only a wildcard
    TCP endpoint (``tcp://*:P``: every interface) or an ``ipc://`` one; given
    ``tcp://127.0.0.1:P`` its PUB *connects*, and so never meets a daemon's SUB, which
    connects too. Engines here stay off the network: pass ``ipc://`` paths (the replay
    endpoint is always bound)."""
    config: dict[str, Any] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "topic": topic,
    }
    if replay_endpoint is not None:
        config["replay_endpoint"] = replay_endpoint
    return config


def ipc_endpoints(directory: Path, name: str) -> tuple[str, str]:
    """A KV-event PUB endpoint and its replay endpoint under ``directory`` (ipc paths are
    limited to ~100 bytes: keep ``directory`` short)."""
    directory.mkdir(parents=True, exist_ok=True)
    return f"ipc://{directory}/{name}.pub", f"ipc://{directory}/{name}.replay"


def spawn_engine(
    workdir: Path,
    name: str,
    *,
    cpu: int = 0,
    kv_transfer: Mapping[str, Any] | None = None,
    kv_events: Mapping[str, Any] | None = None,
    kv_cache_bytes: int = DEFAULT_KV_BYTES,
    model: str | Path = MODEL_DIR,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Engine:
    """Start one ``vllm serve`` without waiting for it (see ``start_engines``)."""
    require_engine()
    port = free_port()
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    args = [
        str(ENGINE_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--dtype",
        "bfloat16",
        "--seed",
        "0",
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes),
        "--disable-uvicorn-access-log",
    ]
    if kv_transfer is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer)]
    if kv_events is not None:
        args += ["--kv-events-config", json.dumps(kv_events)]
    args += list(extra_args)
    engine_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(home / "hf"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(home / "vllm-cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_DO_NOT_TRACK": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_OMP_THREADS_BIND": str(cpu),
        "VLLM_LOGGING_LEVEL": "INFO",
        "TMPDIR": str(home),
        **(env or {}),
    }
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            args,
            env=engine_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=home,
        )
    engine = Engine(name, port, process, log_path, args)
    LIVE.append(engine)
    return engine


def start_engines(engines: Sequence[Engine], ready_timeout_s: float = 240.0) -> None:
    """Wait for engines spawned together (they start in parallel); on a failure stop all."""
    try:
        for engine in engines:
            engine.wait_ready(ready_timeout_s)
    except BaseException:
        for engine in engines:
            engine.stop()
        raise


@contextlib.contextmanager
def running_engines(*engines: Engine, ready_timeout_s: float = 240.0) -> Iterator[list[Engine]]:
    start_engines(engines, ready_timeout_s)
    try:
        yield list(engines)
    finally:
        for engine in engines:
            engine.stop()


def top_logprobs(answer: Mapping[str, Any]) -> list[dict[str, float]]:
    """The top-k logprobs of each generated token of a ``/v1/completions`` answer."""
    result: list[dict[str, float]] = answer["choices"][0]["logprobs"]["top_logprobs"]
    return result


def random_prompt(seed: int, length: int) -> list[int]:
    """Token ids drawn from the tiny vocabulary, past its special tokens: a prompt that
    shares no prefix with another seed's."""
    rng = random.Random(seed)
    return [rng.randrange(4, VOCAB) for _ in range(length)]


def stored_blocks(daemon: DaemonProcess) -> int:
    """Blocks a cache daemon holds, all tiers together."""
    with daemon.client(heartbeat=False) as client:
        return sum(int(tier["num_blocks"]) for tier in client.stats()["tiers"])
