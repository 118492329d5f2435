"""``shoal up``: the whole serving stack on one machine, in the foreground.

::

    shoal up                      # cache daemon, loader sidecar, 2 vLLM engines, the router
    shoal up --engines 3 --model ~/models/llama-3.2-1b --port 9000
    shoal up --engines sim        # simulated engines (no vLLM needed), 2 of them
    shoal up --engines sim:4      # 4 simulated engines
    shoal up --demo               # then a short conversation through the router (router.demo)

What runs, in stages (``router.stack``: spawned together, awaited in order, stopped in
reverse), every process in its own session with its log in ``--workdir``::

    1 cache     shoal cache serve      socket <workdir>/shoal-<name>.sock; engine events
                                       of every engine (gpu0, gpu1, ... in engine order)
    2 loader    shoal loader serve     real engines only, unless --no-loader
      prefetch  shoal loader prefetch  stages the model's weights in shared memory
    3 engine-i  vllm serve (or shoal sim engine), all starting at once
    4 router    shoal router serve     --engines URL=up/gpuI,... --cache-socket <daemon>
                                       (the socket where router.precise is installed)

Invariant: the table printed (and ``--json``) lists exactly the processes running, each
ready; when ``shoal up`` returns, none of them is left (``Stack.stop``: whole process
groups, the engines' core processes included, each waited for before any SIGKILL).

Each real engine runs the model with Shoal's KV connector to the daemon
(``kvcache.connector.vllm``; chunks of ``--chunk-tokens``), vLLM's KV events published on an
``ipc://`` socket in the workdir (vLLM binds only ipc or a TCP wildcard; the daemon
connects), ``--load-format shoal`` reading the weights from the loader sidecar through its
Unix socket (``peer+unix://SOCKET/MODEL``: the sidecar serves the staged copy or the engine
fails; no fallback), ``--enable-prompt-tokens-details`` (so answers say how many prompt
tokens came from cache) and its compute threads pinned to ``--cpu-per-engine`` cores
(``VLLM_CPU_OMP_THREADS_BIND``; engines take cores round-robin from this process's
affinity). Facts behind each flag: ``../shared/ENGINES.md``. The daemon names its node
``up``, so engine ``i``'s stream is ``up/gpu<i>``; the router gets that mapping, the
daemon's socket (precise prefix routing) and the model's tokenizer.

Choices:

- The engine interpreter is ``.venv-engine/bin/python`` of this checkout when present
  (``scripts/setup-engine`` makes it: vLLM's CPU build cannot share ``.venv``), else this
  interpreter; ``--engine-python`` overrides. Engines get ``PYTHONPATH`` = this checkout,
  so they run the same Shoal as the daemon; their environment is built, not inherited
  (offline hub, ``VLLM_HOST_IP=127.0.0.1``, caches in the workdir), except ``VLLM_*`` and
  ``HF_*`` variables of the caller, which pass through (ours win where we set one).
- The default model is the tiny offline Llama ``scripts/setup-engine`` builds
  (``.cache/engine/tiny-llama``); missing, ``shoal up`` says which script makes it before
  starting anything (exit 2). The served model name is the model folder's name.
- The default workdir is a new ``up-XXXX`` folder in the runtime dir (where daemons put
  sockets; ipc paths must stay under ~100 bytes): removed after a clean stop, kept (and
  named) when something failed. An explicit ``--workdir`` is never removed. The workdir's
  name names the daemon (its arena ``/dev/shm/shoal-<name>.arena``), whose lock file is
  dropped once the arena is gone.
- The daemon gets ``--cache-shm-bytes`` (512 MiB) of shared memory and no DRAM tier: one
  machine's engines share it; other daemon settings come from ``SHOAL_CACHE_*`` in the
  environment, which it inherits (the flags set here win). The router gets the daemon's
  socket only where ``router.precise`` is installed (else it routes on approximate
  prefixes, and the table says so).
- Progress goes to stderr, the table (or one line of JSON) to stdout, so ``shoal up
  --json | head -1`` is the contract scripts read.
- Exit codes (``shoal.cli_format``): 0 stopped by Ctrl-C/SIGTERM after it was up;
  2 bad flags or missing set-up (the message names the fix); 1 a component failed to
  start or died (its log tail is printed, everything else is stopped); 130 interrupted
  while starting.

Rejected: starting the router in-process (its workers are processes of their own; one
supervisor over plain processes is simpler to stop); reusing ``running_router`` and the
test fixtures (each waits on its own; here every process shares one plan, one log folder
and one stop order); a default of ``VLLM_CPU_OMP_THREADS_BIND=auto`` (with a KV connector
each engine asks for every core, and two engines then fight over them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.stack import (
    Job,
    RunningStep,
    Service,
    Stack,
    StartFailed,
    Step,
    exit_text,
    log_tail,
)
from shoal.cli_format import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from shoal.cli_format import table as text_table
from shoal.config import default_runtime_dir
from shoal.errors import ConfigError

__all__ = [
    "DEFAULT_MODEL",
    "REPO",
    "UpOptions",
    "UpPlan",
    "check_setup",
    "connector_config",
    "default_engine_python",
    "describe",
    "engine_cpus",
    "kv_events_config",
    "options_from_args",
    "plan_stack",
    "register",
    "render",
    "run",
    "vllm_command",
    "vllm_env",
]

REPO = Path(__file__).resolve().parents[1]
# The tiny model scripts/setup-engine builds (where SHOAL_ENGINE_MODEL_DIR puts it, as there).
DEFAULT_MODEL = REPO / os.environ.get("SHOAL_ENGINE_MODEL_DIR", ".cache/engine/tiny-llama")
SETUP_HINT = "bash scripts/setup-engine"  # builds .venv-engine and the tiny model
NODE = "up"  # the daemon's node name: engine i's stream is up/gpu<i>
TOPIC = "kv-events"
_IPC_MAX = 100  # bytes of an ipc:// path ZeroMQ accepts (sun_path less its margin)
_SHOAL_ENV_KEEP = ("VLLM_", "HF_")


@dataclass(frozen=True, slots=True)
class UpOptions:
    """What ``shoal up`` was asked for (its flags, checked)."""

    num_engines: int = 2
    sim: bool = False
    model: Path = DEFAULT_MODEL
    served_model_name: str = ""  # "" = the model folder's name
    port: int = 8080  # the router's; 0 = any free port
    host: str = "127.0.0.1"
    strategy: str = "shoal"
    loader: bool = True
    cpu_per_engine: int = 1
    engine_python: Path | None = None  # None = default_engine_python()
    engine_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    kv_cache_bytes: int = 128 << 20
    max_model_len: int = 2048
    cache_shm_bytes: str = "512MiB"
    chunk_tokens: int = 256
    engine_ready_timeout_s: float = 300.0

    @property
    def served_name(self) -> str:
        return self.served_model_name or self.model.name


@dataclass(frozen=True, slots=True)
class UpPlan:
    """Everything decided before the first process starts."""

    workdir: Path
    stages: tuple[tuple[Step, ...], ...]
    router_url: str
    engine_urls: tuple[str, ...]
    streams: tuple[str, ...]
    served_name: str
    cache_socket: Path
    directories: tuple[Path, ...] = ()  # to create before the first process starts

    def example_curl(self) -> str:
        body = json.dumps(
            {
                "model": self.served_name,
                "messages": [{"role": "user", "content": "Say hello to Shoal."}],
                "max_tokens": 16,
            }
        )
        return (
            f"curl -sD - {self.router_url}/v1/chat/completions "
            f"-H 'content-type: application/json' -d '{body}'"
        )


# --- the engines' command lines -------------------------------------------------------------


def default_engine_python() -> Path:
    """``.venv-engine/bin/python`` of this checkout if present, else this interpreter."""
    candidate = REPO / ".venv-engine" / "bin" / "python"
    return candidate if candidate.exists() else Path(sys.executable)


def connector_config(endpoint: str, **extra: Any) -> dict[str, Any]:
    """``--kv-transfer-config`` for Shoal's connector talking to the daemon at ``endpoint``."""
    return {
        "kv_connector": "ShoalConnector",
        "kv_connector_module_path": "kvcache.connector.vllm",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": endpoint, **extra},
    }


def kv_events_config(endpoint: str, replay_endpoint: str, topic: str = TOPIC) -> dict[str, Any]:
    """``--kv-events-config`` for vLLM's ZeroMQ publisher on ``ipc://`` endpoints (which
    vLLM binds; a ``tcp://127.0.0.1:P`` one it would *connect*, never meeting the daemon)."""
    return {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": endpoint,
        "replay_endpoint": replay_endpoint,
        "topic": topic,
    }


def vllm_command(
    python: Path,
    model: Path,
    port: int,
    served_name: str,
    *,
    kv_transfer: Mapping[str, Any] | None = None,
    kv_events: Mapping[str, Any] | None = None,
    weights_uri: str = "",
    kv_cache_bytes: int = 128 << 20,
    max_model_len: int = 2048,
    extra: Sequence[str] = (),
) -> list[str]:
    """One ``vllm serve`` on 127.0.0.1 (the API server module: the CPU wheel's console
    script cannot tell its own version). ``weights_uri`` loads through Shoal's loader."""
    args = [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(max_model_len), "--enforce-eager", "--dtype", "bfloat16",
        "--seed", "0", "--kv-cache-memory-bytes", str(kv_cache_bytes),
        "--enable-prompt-tokens-details", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if kv_transfer is not None:
        args += ["--kv-transfer-config", json.dumps(kv_transfer)]
    if kv_events is not None:
        args += ["--kv-events-config", json.dumps(kv_events)]
    if weights_uri:
        loader_config = json.dumps({"model_weights": weights_uri})
        args += ["--load-format", "shoal", "--model-loader-extra-config", loader_config]
    return args + list(extra)


def vllm_env(
    home: Path, cpus: Sequence[int], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of one engine (module docstring): offline, loopback, caches under
    ``home``, compute threads on ``cpus``."""
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k.startswith(_SHOAL_ENV_KEEP)}
    env.update(
        PATH=base.get("PATH", "/usr/bin:/bin"),
        HOME=str(home),
        PYTHONPATH=_pythonpath({}),
        HF_HOME=str(home / "hf"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_HOST_IP="127.0.0.1",
        VLLM_CACHE_ROOT=str(home / "vllm-cache"),
        VLLM_NO_USAGE_STATS="1",
        VLLM_DO_NOT_TRACK="1",
        VLLM_TARGET_DEVICE=base.get("VLLM_TARGET_DEVICE", "cpu"),
        VLLM_CPU_OMP_THREADS_BIND=",".join(map(str, cpus)),
        TMPDIR=str(home),
    )
    return env


def _pythonpath(base: Mapping[str, str]) -> str:
    """This checkout first (when it is one), then what ``base`` had."""
    parts = [str(REPO)] if (REPO / "pyproject.toml").exists() else []
    if base.get("PYTHONPATH"):
        parts.append(base["PYTHONPATH"])
    return os.pathsep.join(parts)


def _shoal_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": _pythonpath(os.environ)}


def engine_cpus(index: int, per_engine: int, available: Sequence[int]) -> list[int]:
    """The cores engine ``index`` computes on: ``per_engine`` of them, round-robin."""
    assert per_engine >= 1 and available, "at least one core per engine, and some cores"
    start = index * per_engine
    return sorted({available[(start + k) % len(available)] for k in range(per_engine)})


# --- the plan ------------------------------------------------------------------------------


def check_setup(options: UpOptions) -> None:
    """Raise ``ConfigError`` naming the fix for anything missing, before any process starts."""
    model = options.model
    if not options.sim:
        python = options.engine_python or default_engine_python()
        if not python.exists():
            raise ConfigError(f"no engine interpreter at {python}; run {SETUP_HINT}")
        if python == Path(sys.executable) and importlib.util.find_spec("vllm") is None:
            raise ConfigError(
                f"no vLLM to serve with: run {SETUP_HINT} (it builds .venv-engine), "
                "pass --engine-python, or use --engines sim"
            )
        if not (model / "config.json").exists():
            if model == DEFAULT_MODEL:
                raise ConfigError(
                    f"the tiny model is missing ({model}): run {SETUP_HINT} (about 1.5 min "
                    "the first time), pass --model DIR, or use --engines sim"
                )
            raise ConfigError(f"--model {model}: no config.json there (a model folder?)")
        if options.loader:
            missing = [n for n in ("torch", "grpc") if importlib.util.find_spec(n) is None]
            if missing:
                raise ConfigError(
                    f"the loader sidecar needs the 'loader' extra (missing: {', '.join(missing)}):"
                    " pip install 'shoal[loader]', or say --no-loader"
                )
    if options.num_engines < 1:
        raise ConfigError("--engines takes a count of at least 1, sim or sim:N")
    if options.cpu_per_engine < 1:
        raise ConfigError("--cpu-per-engine takes at least 1")
    if options.chunk_tokens <= 0 or options.chunk_tokens % 128:
        raise ConfigError("--chunk-tokens must be a positive multiple of 128 (vLLM's CPU block)")
    if options.port and not _bindable(options.host, options.port):
        raise ConfigError(f"port {options.port} on {options.host} is taken: pass --port")


def plan_stack(
    options: UpOptions,
    workdir: Path,
    *,
    free_port: Callable[[], int] | None = None,
    cpus: Sequence[int] | None = None,
    precise: bool | None = None,
) -> UpPlan:
    """The processes to start, in stages (pure: ports come from ``free_port``, cores from
    ``cpus``, by default this process's affinity). ``precise``: give the router the
    daemon's socket (default: when ``router.precise`` is installed)."""
    free_port = free_port or _free_port
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    events_dir = workdir / "ev"
    name = workdir.name  # unique per run: arena /dev/shm/shoal-<name>.arena, sockets
    cache_socket = workdir / f"shoal-{name}.sock"
    for path in (cache_socket, events_dir / f"gpu{options.num_engines - 1}.replay"):
        if len(str(path)) > _IPC_MAX:
            raise ConfigError(f"{path} is longer than {_IPC_MAX} bytes: pick a shorter --workdir")
    python = str(sys.executable)
    shoal = (python, "-m", "shoal")
    env = _shoal_env()
    served = options.served_name
    model = options.model.resolve() if options.model.exists() else options.model

    ports = [free_port() for _ in range(options.num_engines)]
    urls = tuple(f"http://127.0.0.1:{port}" for port in ports)
    streams = tuple(f"{NODE}/gpu{i}" for i in range(options.num_engines))
    publishers = [
        (f"ipc://{events_dir}/gpu{i}.pub", f"ipc://{events_dir}/gpu{i}.replay")
        for i in range(options.num_engines)
    ]
    metrics_port = free_port()
    cache = Service(
        "cache",
        (*shoal, "cache", "serve", "--name", name, "--runtime-dir", str(workdir),
         "--shm-bytes", options.cache_shm_bytes, "--dram-bytes", "0",
         "--metrics-port", str(metrics_port), "--log-format", "text", "--cluster-node", NODE,
         "--engine-events", ",".join(p for p, _ in publishers),
         "--engine-events-replay", ",".join(r for _, r in publishers),
         "--engine-events-topic", TOPIC, "--engine-model", model.name,
         "--engine-chunk-tokens", str(options.chunk_tokens)),
        workdir / "cache.log", env,
        address=f"ipc://{cache_socket}",
        detail=f"metrics :{metrics_port}, engine streams {', '.join(streams)}",
        ready_url=f"http://127.0.0.1:{metrics_port}/readyz", ready_path=cache_socket,
    )  # fmt: skip
    stages: list[tuple[Step, ...]] = [(cache,)]

    weights_uri = ""
    if not options.sim and options.loader:
        sidecar_socket = workdir / f"shoal-loader-{name}.sock"
        where = ("--name", name, "--runtime-dir", str(workdir))
        loader = Service(
            "loader", (*shoal, "loader", "serve", *where, "--log-format", "text"),
            workdir / "loader.log", env, address=f"unix:{sidecar_socket}",
            detail=f"stages {model.name} for the engines",
            ready_log="loader sidecar ready", ready_path=sidecar_socket,
        )  # fmt: skip
        prefetch = Job(
            "prefetch", (*shoal, "loader", "prefetch", str(model), *where),
            workdir / "prefetch.log", env,
        )  # fmt: skip
        stages += [(loader,), (prefetch,)]
        weights_uri = f"peer+unix://{sidecar_socket}/{model}"

    engines: list[Step] = []
    for i, (port, (pub, replay)) in enumerate(zip(ports, publishers, strict=True)):
        events = kv_events_config(pub, replay)
        if options.sim:
            argv: tuple[str, ...] = (
                *shoal, "sim", "engine", "--host", "127.0.0.1", "--port", str(port),
                "--model", model.name, "--served-model-name", served,
                "--max-model-len", str(options.max_model_len),
                "--kv-events-config", json.dumps(events), "--enable-prompt-tokens-details",
                *(("--tokenizer", str(model)) if (model / "tokenizer.json").exists() else ()),
                *options.engine_args,
            )  # fmt: skip
            engines.append(Service(
                f"engine-{i}", argv, workdir / f"engine-{i}.log", env, address=urls[i],
                detail=f"stream {streams[i]}, simulated", ready_url=f"{urls[i]}/health",
                ready_timeout_s=30.0, stop_grace_s=10.0,
            ))  # fmt: skip
            continue
        home = workdir / f"engine-{i}"
        cores = engine_cpus(i, options.cpu_per_engine, cpus)
        chunk = options.chunk_tokens
        argv = tuple(vllm_command(
            options.engine_python or default_engine_python(), model, port, served,
            kv_transfer=connector_config(f"ipc://{cache_socket}", chunk_tokens=chunk),
            kv_events=events, weights_uri=weights_uri, kv_cache_bytes=options.kv_cache_bytes,
            max_model_len=options.max_model_len, extra=options.engine_args,
        ))  # fmt: skip
        how = "load-format shoal" if weights_uri else "vLLM's loader"
        engines.append(Service(
            f"engine-{i}", argv, workdir / f"engine-{i}.log", vllm_env(home, cores),
            cwd=home, address=urls[i],
            detail=f"stream {streams[i]}, cpu {','.join(map(str, cores))}, {how}",
            ready_url=f"{urls[i]}/health", ready_timeout_s=options.engine_ready_timeout_s,
            stop_grace_s=20.0,  # the engine core unlinks its shared memory last
        ))  # fmt: skip
    stages.append(tuple(engines))

    router_port = options.port or free_port()
    router_url = f"http://{options.host}:{router_port}"
    router_argv = [
        *shoal, "router", "serve", "--host", options.host, "--port", str(router_port),
        "--engines", ",".join(f"{url}={stream}" for url, stream in zip(urls, streams, strict=True)),
        "--strategy", options.strategy, "--chunk-tokens", str(options.chunk_tokens),
    ]  # fmt: skip
    if precise is None:
        precise = importlib.util.find_spec("router.precise") is not None
    if precise:
        router_argv += ["--cache-socket", str(cache_socket)]
    if (model / "tokenizer.json").exists():
        router_argv += ["--tokenizer", str(model)]
        if options.sim and _router_has_setting("tokenizer_dialect"):
            router_argv += ["--tokenizer-dialect", "simulator"]  # sim renders chats its way
    how = "precise prefixes from the cache daemon" if precise else "approximate prefixes"
    router = Service(
        "router", (*router_argv, *options.router_args), workdir / "router.log", env,
        address=router_url, detail=f"strategy {options.strategy}, {how}",
        ready_url=f"{router_url}/health", ready_timeout_s=60.0,
    )  # fmt: skip
    stages.append((router,))
    return UpPlan(
        workdir, tuple(stages), router_url, urls, streams, served, cache_socket, (events_dir,)
    )


def _router_has_setting(name: str) -> bool:
    """Whether ``shoal router serve`` takes ``--<name>`` (settings land piece by piece)."""
    from router.config import RouterSettings

    return name in {field.name for field in dataclasses.fields(RouterSettings)}


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range (where outgoing
    connections take their source ports, and could take it before the child binds it)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    pool = range(20000, low) if low > 21000 else range(high + 1, 65000)
    for _ in range(200):
        port = random.choice(pool)
        if _bindable("127.0.0.1", port):
            return port
    raise ConfigError("no free loopback port outside the ephemeral range")


# --- output --------------------------------------------------------------------------------


def describe(plan: UpPlan, running: Sequence[RunningStep]) -> dict[str, Any]:
    """The ``--json`` object (and what the table shows)."""
    return {
        "router": plan.router_url,
        "model": plan.served_name,
        "workdir": str(plan.workdir),
        "components": [
            {
                "component": item.name,
                "pid": item.pid,
                "address": item.step.address,
                "detail": item.step.detail,
                "log": str(item.step.log_path),
                "ready_s": round(item.ready_after_s or 0.0, 1),
            }
            for item in running
            if isinstance(item.step, Service)
        ],
        "curl": plan.example_curl(),
    }


def render(described: Mapping[str, Any]) -> list[str]:
    rows = [
        [c["component"], str(c["pid"]), c["address"], c["detail"], c["log"]]
        for c in described["components"]
    ]
    lines = text_table(("COMPONENT", "PID", "ADDRESS", "DETAIL", "LOG"), rows, "<><<<")
    return [
        *lines,
        "",
        f"Router: {described['router']}  (model {described['model']!r}; the response header "
        "x-shoal-engine names the engine that served it)",
        f"  {described['curl']}",
        "",
        "Ctrl-C stops everything.",
    ]


# --- the command ---------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    up = subparsers.add_parser(
        "up",
        help="the whole stack on one machine: cache daemon, loader sidecar, engines and the router",
        description=(
            "Start a cache daemon, the loader sidecar, N engines (vLLM with Shoal's KV "
            "connector, KV events and --load-format shoal; or simulated ones) and the router "
            "in front, print what runs where, and stop everything on Ctrl-C."
        ),
    )
    a = up.add_argument
    a(
        "--engines",
        default="2",
        metavar="N|sim|sim:N",
        help="how many vLLM engines (default 2), or simulated ones: sim (2) or sim:N",
    )
    a(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"model folder the engines serve (default: the tiny model {SETUP_HINT} builds)",
    )
    a("--served-model-name", default="", help="the name clients send (default: the folder's)")
    a("--port", type=int, default=8080, help="the router's port (default 8080; 0 = any free)")
    a("--host", default="127.0.0.1", help="the router's address (default loopback)")
    a("--strategy", default="shoal", help="the router's strategy or weighted mix (default shoal)")
    a(
        "--workdir",
        type=Path,
        help="logs and sockets (default: a new up-XXXX in the runtime "
        "dir, removed after a clean stop)",
    )
    a(
        "--no-loader",
        dest="loader",
        action="store_false",
        help="engines load weights with vLLM's own loader (no sidecar)",
    )
    a("--cpu-per-engine", type=int, default=1, help="cores each engine computes on (default 1)")
    a(
        "--engine-python",
        type=Path,
        help="interpreter with vLLM (default: .venv-engine/bin/python here, else this one)",
    )
    a(
        "--engine-args",
        default="",
        metavar="'FLAGS'",
        help="more engine flags, one string: --engine-args='--max-num-seqs 4'",
    )
    a(
        "--router-args",
        default="",
        metavar="'FLAGS'",
        help="more `shoal router serve` flags, one string: --router-args='--workers 2'",
    )
    a("--kv-cache-bytes", type=int, default=128 << 20, help="each vLLM engine's KV cache")
    a("--max-model-len", type=int, default=2048)
    a("--cache-shm-bytes", default="512MiB", help="the cache daemon's shared-memory tier")
    a("--chunk-tokens", type=int, default=256, help="tokens per Shoal cache key (default 256)")
    a("--ready-timeout-s", type=float, default=300.0, help="how long an engine may take to start")
    a("--json", action="store_true", help="print what runs where as one line of JSON")
    a(
        "--demo",
        action="store_true",
        help="once up, send a short conversation through the "
        "router and show each turn's engine and cached prompt tokens",
    )
    up.set_defaults(func=_up)  # fmt: skip


def options_from_args(args: argparse.Namespace) -> UpOptions:
    text = str(args.engines).strip().lower()
    sim = text == "sim" or text.startswith("sim:")
    count = text.removeprefix("sim").removeprefix(":") or "2"
    try:
        num_engines = int(count)
    except ValueError:
        raise ConfigError(f"--engines takes N, sim or sim:N, got {args.engines!r}") from None
    return UpOptions(
        num_engines=num_engines,
        sim=sim,
        model=Path(args.model).expanduser(),
        served_model_name=args.served_model_name,
        port=args.port,
        host=args.host,
        strategy=args.strategy,
        loader=args.loader,
        cpu_per_engine=args.cpu_per_engine,
        engine_python=args.engine_python,
        engine_args=tuple(shlex.split(args.engine_args)),
        router_args=tuple(shlex.split(args.router_args)),
        kv_cache_bytes=args.kv_cache_bytes,
        max_model_len=args.max_model_len,
        cache_shm_bytes=args.cache_shm_bytes,
        chunk_tokens=args.chunk_tokens,
        engine_ready_timeout_s=args.ready_timeout_s,
    )


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block, even where SIGINT was
    inherited ignored (a background job of a script: ``kill -INT`` must still stop it)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _up(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    check_setup(options)
    temporary = args.workdir is None
    if temporary:
        runtime = Path(default_runtime_dir())
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="up-", dir=runtime))
    else:
        workdir = Path(args.workdir).expanduser().resolve()
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    code = run(options, workdir, as_json=args.json, demo=args.demo)
    _drop_arena_lock(workdir.name)
    if temporary and code in (0, EXIT_USAGE):  # EXIT_USAGE: nothing ever ran
        shutil.rmtree(workdir, ignore_errors=True)
    elif code not in (0, EXIT_USAGE):
        _say(f"shoal up: logs kept in {workdir}")
    return code


def _drop_arena_lock(name: str) -> None:
    """The daemon keeps its arena's lock file by design (``kvcache.arena``: a new daemon of
    the same name takes it); once the arena itself is gone (a clean exit removes it) this
    run's daemon is, and its name is this workdir's: the lock would only pile up."""
    arena = Path(os.environ.get("SHOAL_CACHE_SHM_DIR") or "/dev/shm") / f"shoal-{name}.arena"
    if not arena.exists():
        arena.with_name(arena.name + ".lock").unlink(missing_ok=True)


def run(options: UpOptions, workdir: Path, *, as_json: bool = False, demo: bool = False) -> int:
    """Start the plan, print it, wait for Ctrl-C/SIGTERM or a death, stop everything."""
    try:
        plan = plan_stack(options, workdir)
    except ConfigError as exc:
        _say(f"shoal up: {exc}")
        return EXIT_USAGE
    for directory in plan.directories:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    began = time.monotonic()
    what = "simulated" if options.sim else "vLLM"
    _say(
        f"shoal up: {options.num_engines} {what} engines serving {plan.served_name!r} behind "
        f"the router on {plan.router_url}; logs in {workdir}"
    )

    def on_stage(steps: Sequence[Step]) -> None:
        names = ", ".join(step.name for step in steps)
        slow = (
            " (vLLM on CPU: 20-90 s)"
            if any(s.name.startswith("engine") for s in steps) and not options.sim
            else ""
        )
        _say(f"[{time.monotonic() - began:6.1f}s] starting {names}{slow}")

    def on_ready(item: RunningStep) -> None:
        verb = "done" if isinstance(item.step, Job) else f"ready (pid {item.pid})"
        _say(f"[{time.monotonic() - began:6.1f}s] {item.name} {verb} in {item.ready_after_s:.1f} s")

    stack = Stack(plan.stages, on_stage=on_stage, on_ready=on_ready)
    up = False
    try:
        with _signals_interrupt():
            try:
                stack.start()
                up = True
                described = describe(plan, stack.running)
                if as_json:
                    print(json.dumps(described), flush=True)
                else:
                    print("\n".join(render(described)), flush=True)
                if demo:
                    _demo(plan, stack.running, as_json)
                while (dead := stack.exited()) is None:
                    time.sleep(0.5)
                code = dead.process.returncode
                _say(
                    f"shoal up: {dead.name} {exit_text(code)}; its log "
                    f"{dead.step.log_path}, last lines:\n{log_tail(dead.step.log_path)}"
                )
                return EXIT_FAILED
            except StartFailed as exc:
                _say(f"shoal up: {exc}")
                return EXIT_FAILED
            except KeyboardInterrupt:
                return 0 if up else EXIT_INTERRUPTED
    finally:
        _stop(stack, began)


def _demo(plan: UpPlan, running: Sequence[RunningStep], as_json: bool) -> None:
    from router.demo import demo_json, render_demo, safe_demo

    names = {item.step.address: item.name for item in running if isinstance(item.step, Service)}
    _say("shoal up: demo: two conversations of three turns through the router")
    turns, error = safe_demo(plan.router_url, plan.served_name, names)
    if error:
        _say(f"shoal up: demo FAILED ({error}); the stack keeps serving")
    elif as_json:
        print(json.dumps(demo_json(turns)), flush=True)
    else:
        print("\n".join(["", *render_demo(turns), ""]), flush=True)


def _stop(stack: Stack, began: float) -> None:
    names = ", ".join(item.name for item in reversed(stack.running))
    if names:
        _say(f"[{time.monotonic() - began:6.1f}s] stopping {names}")
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.stop()  # bounded (router.stack): a second Ctrl-C cannot make it leak
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if names:
        _say(f"[{time.monotonic() - began:6.1f}s] stopped")
