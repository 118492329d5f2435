"""What ``shoal up`` runs: each process's command line, environment and readiness, in
stages (``UpPlan``), decided before the first one starts (``router.up`` runs it).

::

    1 cache     shoal cache serve      socket <workdir>/shoal-<name>.sock; engine events
                                       of every engine (gpu0, gpu1, ... in engine order)
    2 loader    shoal loader serve     real engines only, unless --no-loader
      prefetch  shoal loader prefetch  stages the model's weights in shared memory
    3 engine-i  vllm serve (or shoal sim engine), all starting at once
    4 router    shoal router serve     --engines URL=up/gpuI,... --cache-socket <daemon>

With ``--autoscale [POLICY]`` (issue 13) ``shoal up`` starts no engine itself::

    3 autoscaler  shoal autoscale run --target local --engine-command "sh engine.sh {port}"
                  --discovery-file <workdir>/engines.json --min-replicas M --max-replicas N
                  (engine.sh, written in the workdir: one engine on port $1, the command
                  line and environment stage 3 would have used, with its own home)
    4 router      shoal router serve --discovery file --discovery-file <workdir>/engines.json
                  --autoscaler-url http://127.0.0.1:<autoscaler port>

so the router holds requests while no engine is up and asks the autoscaler for one (scale
from zero, ``router/hold.py``), and the autoscaler scrapes the router and the engines it
started. Such engines publish no KV events (the daemon's publisher list is fixed when it
starts, their ports are not): the router routes on the daemon's node cache and approximate
prefixes; they still share the daemon's cache through the connector, and all of them
compute on the cores engine 0 would have had (``--cpu-per-engine``).

Invariant: engine ``i`` publishes its KV events on ``<workdir>/ev/gpu<i>.pub``, which is
the ``i``-th ``--engine-events`` endpoint of the daemon, whose node is ``up``; so its
daemon stream is ``up/gpu<i>``, and that is what the router is told for its URL.

Each real engine runs the model with Shoal's KV connector to the daemon
(``kvcache.connector.vllm``; chunks of ``--chunk-tokens``), vLLM's KV events published on an
``ipc://`` socket in the workdir (vLLM binds only ipc or a TCP wildcard; the daemon
connects), ``--load-format shoal`` reading the weights from the loader sidecar through its
Unix socket (``peer+unix://SOCKET/MODEL``: the sidecar serves the staged copy or the engine
fails; no fallback), ``--enable-prompt-tokens-details`` (so answers say how many prompt
tokens came from cache) and its compute threads pinned to ``--cpu-per-engine`` cores
(``VLLM_CPU_OMP_THREADS_BIND``; engines take cores round-robin from this process's
affinity). Facts behind each flag: ``../shared/ENGINES.md``. Simulated engines get the
model's tokenizer, so their token counts and block hashes are the router's.

Choices:

- The engine interpreter is ``.venv-engine/bin/python`` of this checkout when present
  (``scripts/setup-engine`` makes it: vLLM's CPU build cannot share ``.venv``), else this
  interpreter; ``--engine-python`` overrides. Engines get ``PYTHONPATH`` = this checkout,
  so they run the same Shoal as the daemon; their environment is built, not inherited
  (offline hub, ``VLLM_HOST_IP=127.0.0.1``, caches in the workdir), except ``VLLM_*`` and
  ``HF_*`` variables of the caller, which pass through (ours win where we set one).
- The default model is the tiny offline Llama ``scripts/setup-engine`` builds
  (``.cache/engine/tiny-llama``, or ``SHOAL_ENGINE_MODEL_DIR``); missing, ``check_setup``
  names the script before anything starts. The served model name is the folder's name.
- The daemon gets ``--cache-shm-bytes`` (512 MiB) of shared memory and no DRAM tier: one
  machine's engines share it; other daemon settings come from ``SHOAL_CACHE_*`` in the
  environment, which it inherits (the flags set here win). Its name is the workdir's
  (arena ``/dev/shm/shoal-<name>.arena``). The router gets the daemon's socket, so it
  routes on precise prefixes (``precise=False`` in tests: approximate, and the table says so).

Rejected: a default of ``VLLM_CPU_OMP_THREADS_BIND=auto`` (with a KV connector each engine
asks for every core, and two engines then fight over them); reusing the e2e tests' engine
helpers (library code imports nothing from ``tests/``: they may import from here instead).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.stack import Job, Service, Step
from shoal.errors import ConfigError
from shoal.processes import REPO, bindable, checkout_pythonpath, free_loopback_port, shoal_env

__all__ = [
    "DEFAULT_MODEL",
    "NODE",
    "REPO",
    "UpOptions",
    "UpPlan",
    "check_setup",
    "connector_config",
    "default_engine_python",
    "engine_cpus",
    "kv_events_config",
    "plan_stack",
    "vllm_command",
    "vllm_env",
]

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
    # issue 13: None = engines started by shoal up; a policy name ("" = the controller's
    # default) = engines started and stopped by `shoal autoscale run`, up to num_engines
    autoscale: str | None = None
    min_replicas: int = 1
    autoscale_args: tuple[str, ...] = ()

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
    files: tuple[tuple[Path, str], ...] = ()  # to write (path, text) before it, too
    autoscaler_url: str = ""  # with --autoscale: the controller's endpoint

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
        PYTHONPATH=checkout_pythonpath({}),
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
    if options.autoscale is not None:
        if not 0 <= options.min_replicas <= options.num_engines:
            raise ConfigError(
                f"--min-replicas {options.min_replicas} must be 0..{options.num_engines} "
                "(--engines N is the most replicas the autoscaler may start)"
            )
        if importlib.util.find_spec("control.autoscale.controller") is None:
            raise ConfigError(
                "--autoscale needs Shoal's autoscaling controller (control/autoscale), which "
                "this installation lacks"
            )
    if options.cpu_per_engine < 1:
        raise ConfigError("--cpu-per-engine takes at least 1")
    if options.chunk_tokens <= 0 or options.chunk_tokens % 128:
        raise ConfigError("--chunk-tokens must be a positive multiple of 128 (vLLM's CPU block)")
    if options.port and not bindable(options.host, options.port):
        raise ConfigError(f"port {options.port} on {options.host} is taken: pass --port")


def plan_stack(
    options: UpOptions,
    workdir: Path,
    *,
    free_port: Callable[[], int] | None = None,
    cpus: Sequence[int] | None = None,
    precise: bool = True,
) -> UpPlan:
    """The processes to start, in stages (pure: ports come from ``free_port``, cores from
    ``cpus``, by default this process's affinity). ``precise``: give the router the
    daemon's socket (else it routes on approximate prefixes)."""
    free_port = free_port or _free_port
    cpus = sorted(os.sched_getaffinity(0)) if cpus is None else list(cpus)
    autoscaled = options.autoscale is not None
    events_dir = workdir / "ev"
    name = workdir.name  # unique per run: arena /dev/shm/shoal-<name>.arena, sockets
    cache_socket = workdir / f"shoal-{name}.sock"
    for path in (cache_socket, events_dir / f"gpu{options.num_engines - 1}.replay"):
        if len(str(path)) > _IPC_MAX:
            raise ConfigError(f"{path} is longer than {_IPC_MAX} bytes: pick a shorter --workdir")
    python = str(sys.executable)
    shoal = (python, "-m", "shoal")
    env = shoal_env()
    served = options.served_name
    model = options.model.resolve() if options.model.exists() else options.model

    # autoscaled engines come and go on ports the autoscaler picks: none is planned here
    num_planned = 0 if autoscaled else options.num_engines
    ports = [free_port() for _ in range(num_planned)]
    urls = tuple(f"http://127.0.0.1:{port}" for port in ports)
    streams = tuple(f"{NODE}/gpu{i}" for i in range(num_planned))
    publishers = [
        (f"ipc://{events_dir}/gpu{i}.pub", f"ipc://{events_dir}/gpu{i}.replay")
        for i in range(num_planned)
    ]
    metrics_port = free_port()
    event_flags: tuple[str, ...] = (
        "--engine-events", ",".join(p for p, _ in publishers),
        "--engine-events-replay", ",".join(r for _, r in publishers),
        "--engine-events-topic", TOPIC,
    ) if publishers else ()  # fmt: skip
    cache = Service(
        "cache",
        (*shoal, "cache", "serve", "--name", name, "--runtime-dir", str(workdir),
         "--shm-bytes", options.cache_shm_bytes, "--dram-bytes", "0",
         "--metrics-port", str(metrics_port), "--log-format", "text", "--cluster-node", NODE,
         *event_flags, "--engine-model", model.name,
         "--engine-chunk-tokens", str(options.chunk_tokens)),
        workdir / "cache.log", env,
        address=f"ipc://{cache_socket}",
        detail=f"metrics :{metrics_port}, "
        + (f"engine streams {', '.join(streams)}" if streams else "no engine events"),
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

    router_port = options.port or free_port()
    router_url = f"http://{options.host}:{router_port}"
    if autoscaled:
        return _plan_autoscaled(
            options, workdir, stages, free_port=free_port, cpus=cpus, env=env, model=model,
            cache_socket=cache_socket, weights_uri=weights_uri, router_url=router_url,
            precise=precise,
        )  # fmt: skip

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

    engine_list = ",".join(f"{url}={stream}" for url, stream in zip(urls, streams, strict=True))
    router = _router(options, workdir, env, model, ("--engines", engine_list), router_url,
                     cache_socket if precise else None)  # fmt: skip
    stages.append((router,))
    return UpPlan(
        workdir, tuple(stages), router_url, urls, streams, served, cache_socket, (events_dir,)
    )


def _router(
    options: UpOptions,
    workdir: Path,
    env: Mapping[str, str],
    model: Path,
    engines: Sequence[str],
    router_url: str,
    cache_socket: Path | None,
) -> Service:
    """The router's step; ``engines`` are the flags that say where its engines are."""
    router_argv = [
        sys.executable, "-m", "shoal", "router", "serve", "--host", options.host,
        "--port", router_url.rpartition(":")[2], *engines,
        "--strategy", options.strategy, "--chunk-tokens", str(options.chunk_tokens),
    ]  # fmt: skip
    if cache_socket is not None:
        router_argv += ["--cache-socket", str(cache_socket)]
    if (model / "tokenizer.json").exists():
        router_argv += ["--tokenizer", str(model)]
        if options.sim:
            router_argv += ["--tokenizer-dialect", "simulator"]  # sim renders chats its way
    how = "precise prefixes from the cache daemon" if cache_socket else "approximate prefixes"
    # with --autoscale, /health is 200 with no engine too (it holds requests for one)
    return Service(
        "router", (*router_argv, *options.router_args), workdir / "router.log", env,
        address=router_url, detail=f"strategy {options.strategy}, {how}",
        ready_url=f"{router_url}/health", ready_timeout_s=60.0,
    )  # fmt: skip


def engine_script(argv: Sequence[str], env: Mapping[str, str] | None, home: str) -> str:
    """A POSIX shell script starting one engine on port ``$1``: ``argv`` with its
    ``--port`` value replaced, in the environment ``env`` (nothing inherited; None: the
    caller's), in its own ``home`` folder (``$port`` and ``$home`` in ``home``, ``argv``
    and ``env`` values expand). The autoscaler's local actuator runs it as
    ``/bin/sh engine.sh {port}``, so no JSON flag has to survive a command-line template."""

    def word(text: str) -> str:  # shlex.quote, but $port and $home expand
        pieces = re.split(r"(\$port|\$home)", text)
        quoted = (f'"{p}"' if p in ("$port", "$home") else shlex.quote(p) for p in pieces if p)
        return "".join(quoted) or "''"

    argv = list(argv)
    argv[argv.index("--port") + 1] = "$port"
    command = " ".join(word(a) for a in argv)
    if env is not None:
        assigns = " ".join(word(f"{key}={value}") for key, value in env.items())
        command = f"env -i {assigns} {command}"
    return (
        "#!/bin/sh\n"
        "# one engine on port $1, for `shoal autoscale run --target local` (shoal up --autoscale)\n"
        'port="$1"\n'
        f"home={word(home)}\n"
        'mkdir -p "$home" && cd "$home" || exit 1\n'
        f"exec {command}\n"
    )


def autoscaler_stop_grace_s(engine_grace_s: float) -> float:
    """The autoscaler's own stop grace: a round in progress (which may stop an engine, up to
    ``engine_grace_s``), then its engines' stop (``engine_grace_s`` again, all at once), and
    10 s for the rest (one round's scrapes and probes, the discovery file, exiting)."""
    return 2 * engine_grace_s + 10.0


def _plan_autoscaled(
    options: UpOptions,
    workdir: Path,
    stages: list[tuple[Step, ...]],
    *,
    free_port: Callable[[], int],
    cpus: Sequence[int],
    env: Mapping[str, str],
    model: Path,
    cache_socket: Path,
    weights_uri: str,
    router_url: str,
    precise: bool,
) -> UpPlan:
    """The autoscaled stack (module docstring): the autoscaler, then the router."""
    served = options.served_name
    home = f"{workdir}/engine-$port"
    # vLLM binds ipc sockets named by a UUID in its TMPDIR (the engine's home)
    if not options.sim and len(f"{workdir}/engine-65535/{'u' * 36}") > _IPC_MAX:
        raise ConfigError(f"{workdir} is too long for the engines' ipc sockets: pick a "
                          "shorter --workdir")  # fmt: skip
    if options.sim:
        argv: list[str] = [
            sys.executable, "-m", "shoal", "sim", "engine", "--host", "127.0.0.1",
            "--port", "0", "--model", model.name, "--served-model-name", served,
            "--max-model-len", str(options.max_model_len), "--enable-prompt-tokens-details",
            *(("--tokenizer", str(model)) if (model / "tokenizer.json").exists() else ()),
            *options.engine_args,
        ]  # fmt: skip
        engine_env: Mapping[str, str] | None = None  # the autoscaler's: Shoal's own
        detail = "simulated"
    else:
        cores = engine_cpus(0, options.cpu_per_engine, cpus)
        argv = vllm_command(
            options.engine_python or default_engine_python(), model, 0, served,
            kv_transfer=connector_config(f"ipc://{cache_socket}",
                                         chunk_tokens=options.chunk_tokens),
            weights_uri=weights_uri, kv_cache_bytes=options.kv_cache_bytes,
            max_model_len=options.max_model_len, extra=options.engine_args,
        )  # fmt: skip
        engine_env = vllm_env(Path("$home"), cores)
        detail = f"vLLM, cpu {','.join(map(str, cores))}"
    script = workdir / "engine.sh"
    listing = workdir / "engines.json"
    port = free_port()
    autoscaler_url = f"http://127.0.0.1:{port}"
    policy = ("--policy", options.autoscale) if options.autoscale else ()
    # SIGTERM to the autoscaler ends its round (which may be stopping an engine) and then
    # stops its engines, each with this grace: its own must cover both, and a margin
    engine_grace_s = 10.0 if options.sim else 25.0  # vLLM unlinks its shared memory last
    autoscaler = Service(
        "autoscaler",
        (sys.executable, "-m", "shoal", "autoscale", "run", "--target", "local",
         "--engine-command", f"/bin/sh {script} {{port}}", "--discovery-file", str(listing),
         "--min-replicas", str(options.min_replicas),
         "--max-replicas", str(options.num_engines), *policy, "--model", served,
         "--router-url", router_url, "--host", "127.0.0.1", "--port", str(port),
         "--engine-ready-timeout-s", str(options.engine_ready_timeout_s),
         "--engine-stop-grace-s", str(engine_grace_s),
         "--log-format", "text", *options.autoscale_args),
        workdir / "autoscaler.log", env, address=autoscaler_url,
        detail=f"{options.autoscale or 'its default'} policy, {options.min_replicas}.."
        f"{options.num_engines} engines ({detail}) from engine.sh, listed in engines.json",
        ready_url=f"{autoscaler_url}/status", ready_timeout_s=60.0,
        stop_grace_s=autoscaler_stop_grace_s(engine_grace_s),
    )  # fmt: skip
    router = _router(
        options, workdir, env, model,
        ("--discovery", "file", "--discovery-file", str(listing),
         "--discovery-interval-s", "0.5", "--autoscaler-url", autoscaler_url),
        router_url, cache_socket if precise else None,
    )  # fmt: skip
    stages += [(autoscaler,), (router,)]
    return UpPlan(
        workdir, tuple(stages), router_url, (), (), served, cache_socket,
        files=((script, engine_script(argv, engine_env, home)), (listing, "[]\n")),
        autoscaler_url=autoscaler_url,
    )  # fmt: skip


def _free_port() -> int:
    port = free_loopback_port()
    if port is None:
        raise ConfigError("no free loopback port outside the ephemeral range")
    return port
