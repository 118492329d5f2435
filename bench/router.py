"""The router benchmark: Shoal's router beside the routers users would pick instead.

::

    python bench/router.py [--quick] [--json] [--seed N] [--seconds S] [--warmup S]
                           [--workloads a,b] [--arms a,b] [--no-overhead] [--replicas]
                           [--kill] [--tokenizer DIR | --no-precise]

One fleet of ``--engines`` (4) simulated engines (``shoal sim engine``, default 7B/A100
step profile, time scale 1, block size 16, KV events on ipc sockets) is started per
workload with that workload's KV capacity (``bench/router_workloads.py``: small caches, so
a wrong placement recomputes, and enough load to queue). Every arm then replays the same
seeded sessions in front of that fleet, one arm after another; before each arm the engines
drain and ``/reset_prefix_cache`` empties their caches; the first ``--warmup`` seconds of
each arm's sessions are not measured.

Precise mode (the default when ``router/precise.py`` and ``--tokenizer DIR/tokenizer.json``
exist; ``SHOAL_BENCH_TOKENIZER`` sets DIR): the engines tokenize with that tokenizer, a
``shoal cache serve`` daemon per fleet subscribes to their KV events (``engine_events``,
64-token chunks), and the ``shoal`` arm gets ``--engines URL=STREAM,...``,
``--cache-socket``, ``--tokenizer`` and ``--tokenizer-dialect simulator``. Prompt words
are then drawn from the tokenizer's one-token words, so n words stay ~n tokens.
``--no-precise``: hashed words, no daemon, shoal routes from its approximate index. Arms:

* ``shoal``: ``python -m shoal router serve`` (default strategy ``shoal``);
  ``shoal_approx`` (precise mode, not in ``--quick``): the same strategy without the
  daemon; ``random`` and ``least_request``: the router with ``--strategy random`` /
  ``least-request``. Without a router (``router.server`` missing) the shoal arms are
  null in the JSON, and ``random`` and ``least_request`` fall back to the same policy
  applied in the client (marked ``client-side``);
* ``sglang_cache_aware`` / ``sglang_round_robin``: PyPI ``sglang-router`` 0.3.2;
* ``vllm_router_cache_aware`` / ``vllm_router_consistent_hash``: PyPI ``vllm-router``
  0.1.17 (both installed by ``bench/install_router_anchors.sh`` into ``.venv-bench``;
  every anchor keeps its default thresholds, health checks every 2 s);
* ``oracle``: ``router_workloads.Oracle`` in the client: it reads every engine's KV events
  (the true cache) and sends straight to the engine it picks (no proxy hop).

Measured per arm and workload, client-side: TTFT = time from sending to the first SSE
chunk that carries generated text (aiohttp, streaming, open-loop session starts), p50 and
p90 over successful requests; ``ok`` = fraction answered 200 and ended with ``[DONE]``;
``hit_rate`` = the engines' own ``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries``
deltas over the arm's run (tokens). The table adds each arm's p90 ratio to the best anchor's
with a bootstrap 90% interval over requests, and the most loaded engine's share of requests
(``vllm:request_success`` deltas) against a fair share.

``--replicas``: 4 router processes per router (shoal sharing state through a
``redis-server`` the bench starts; each anchor as 4 independent processes), every request
sent to a random replica. ``--kill``: one of 4 engines SIGKILLed halfway through the run;
``ok`` and, for shoal, the requests its ``x-shoal-engine`` header says went to the dead
engine after its ``/router/engines`` reported it unhealthy. Overhead (``--no-overhead``
skips it): 2 engines that answer at once (this file's ``--fast-engine``), 16 KiB prompts,
non-streaming, closed-loop concurrency 64; the router pinned to core 0 (every router,
Rust or Python, gets that one core), engines and client on core 1; added latency p50/p99 =
via the router minus direct to the engines, and the router's requests/s.

``--json`` prints ``{"workloads": {NAME: {ARM: {"ttft_p50_ms", "ttft_p90_ms",
"hit_rate", "ok"}}}, "overhead": {ARM: {"added_p50_ms", "added_p99_ms", "rps"}}}``
(``--replicas`` and ``--kill`` add workloads named ``tenants_4_replicas`` and
``engine_kill``); an arm that could not run is there with nulls. ``--quick``: 1 s of
warm-up and 3 s windows, only the JSON's arms (overhead: shoal and the cache_aware
anchors), under five minutes.

Debugging a run: ``--keep-logs`` keeps every engine's, daemon's and router's log (the path is
printed); ``SHOAL_BENCH_ROUTER_LOG_LEVEL=debug`` makes Shoal's routers log each decision with
every engine's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

import aiohttp  # noqa: E402
import router_workloads as wl  # noqa: E402

BENCH_VENV = REPO / ".venv-bench" / "bin"
MODEL = "sim-7b"
JSON_ARMS = (
    "shoal",
    "random",
    "least_request",
    "sglang_cache_aware",
    "vllm_router_cache_aware",
    "oracle",
)
EXTRA_ARMS = ("sglang_round_robin", "vllm_router_consistent_hash", "shoal_approx")
ANCHORS = (
    "sglang_cache_aware",
    "sglang_round_robin",
    "vllm_router_cache_aware",
    "vllm_router_consistent_hash",
)
ABSENT = {"ttft_p50_ms": None, "ttft_p90_ms": None, "hit_rate": None, "ok": None}
OVERHEAD_KEYS = ("added_p50_ms", "added_p99_ms", "rps")
SHOAL_STRATEGY = {
    "shoal": None,
    "random": "random",
    "least_request": "least-request",
    "shoal_approx": "shoal",  # the default strategy without the cache daemon: approximate
}
CHUNK_TOKENS = 64  # the cache daemon's engine_chunk_tokens: the precise view's grain


@dataclass
class Mode:
    """Set once by main(): the engines' tokenizer in precise mode (None = the simulator's
    hashed words and no cache daemon)."""

    tokenizer: str | None = None


MODE = Mode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            if http_get(url + "/health", 0.5)[0] == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy in {timeout} s: {log.read_text()[-2000:]}")


def shoal_router_available() -> bool:
    return (REPO / "router" / "server.py").exists()


@functools.cache
def shoal_strategies() -> frozenset[str]:
    """The strategy names this checkout's router registers (empty without a router)."""
    if not shoal_router_available():
        return frozenset()
    out = subprocess.run(
        [sys.executable, "-c", "import router.strategies as s; print(' '.join(s.STRATEGIES))"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    return frozenset(out.stdout.split())


def shoal_arm_ready(arm: str) -> bool:
    """Whether a shoal-router arm can run through the real router here."""
    return (SHOAL_STRATEGY[arm] or "shoal") in shoal_strategies()


# --- processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def spawn(
    name: str,
    command: list[str],
    url: str,
    logs: Path,
    *,
    cpu: int | None = None,
    timeout: float = 30.0,
) -> Proc:
    log = logs / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    if cpu is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(process.pid, {cpu})
    proc = Proc(name, url, process, log)
    try:
        wait_healthy(url, process, log, timeout)
    except BaseException:
        proc.stop()
        raise
    return proc


@dataclass
class Fleet:
    engines: list[Proc]
    endpoints: list[str]  # KV-event endpoints, by engine
    flags: dict[str, Any]
    logs: Path
    cache_socket: str = ""  # the cache daemon fed by the engines' KV events (precise mode)
    streams: list[str] = field(default_factory=list)  # its stream per engine

    def precise(self, arm: str) -> tuple[str, list[str]] | None:
        """(cache socket, engine streams) for an arm that routes precisely, else None."""
        return (self.cache_socket, self.streams) if arm == "shoal" and self.cache_socket else None

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def restart(self, i: int) -> None:
        old = self.engines[i]
        old.stop()
        port = int(old.url.rsplit(":", 1)[1])
        self.engines[i] = start_engine(i, port, self.endpoints[i], self.flags, self.logs)


def start_engine(i: int, port: int, endpoint: str, flags: dict[str, Any], logs: Path) -> Proc:
    if MODE.tokenizer:
        flags = {**flags, "tokenizer": MODE.tokenizer}
    command = [
        sys.executable,
        "-m",
        "shoal",
        "sim",
        "engine",
        "--port",
        str(port),
        "--model",
        MODEL,
        "--log-level",
        "WARNING",
        "--kv-events-config",
        json.dumps({"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}),
    ]
    for key, value in flags.items():
        command += ["--" + key.replace("_", "-"), str(value)]
    return spawn(f"engine-{i}-{port}", command, f"http://127.0.0.1:{port}", logs)


@contextlib.contextmanager
def fleet(count: int, flags: dict[str, Any], logs: Path) -> Iterator[Fleet]:
    """``count`` engines; in precise mode (``MODE.tokenizer`` set) also a cache daemon that
    subscribes to their KV events, for the shoal arm's ``--cache-socket``."""
    engines: list[Proc] = []
    daemon: subprocess.Popen[bytes] | None = None
    endpoints = [f"ipc://{logs}/kv-{i}.sock" for i in range(count)]
    try:
        socket_path, streams = "", list[str]()
        if MODE.tokenizer:
            daemon, socket_path, streams = start_daemon(endpoints, logs)
        for i in range(count):
            engines.append(start_engine(i, free_port(), endpoints[i], flags, logs))
        yield Fleet(engines, endpoints, flags, logs, socket_path, streams)
    finally:
        for engine in engines:
            engine.stop()
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def start_daemon(
    endpoints: Sequence[str], logs: Path
) -> tuple[subprocess.Popen[bytes], str, list[str]]:
    """``shoal cache serve`` with the engines' KV-event endpoints: (process, its engine
    socket, the stream it names each engine by, in ``endpoints`` order)."""
    from kvcache.client import CacheClient
    from kvcache.config import CacheConfig

    name = f"bench{os.getpid()}x{free_port()}"
    values = {
        "name": name,
        "runtime_dir": str(logs / "run"),
        "shm_bytes": "64MiB",
        "dram_bytes": "64MiB",
        "slab_bytes": "8MiB",
        "metrics_port": 0,
        "log_format": "text",
        "log_level": "warning",
        "engine_events": ",".join(endpoints),
        "engine_model": MODEL,
        "engine_chunk_tokens": CHUNK_TOKENS,
    }
    command = [sys.executable, "-m", "shoal", "cache", "serve"]
    for key, value in values.items():
        command += ["--" + key.replace("_", "-"), str(value)]
    log = logs / f"daemon-{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            start_new_session=True,
        )
    config = CacheConfig(name=name, runtime_dir=str(logs / "run"))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"cache daemon exited: {log.read_text()[-2000:]}")
        if config.socket_path.exists():
            with contextlib.suppress(Exception):  # not ready yet: any client error
                client = CacheClient(config.endpoint, timeout_s=1, heartbeat=False)
                try:
                    status = client.cluster_status()
                finally:
                    client.close()
                streams = [e["stream"] for e in status["engines"]]
                if len(streams) == len(endpoints):
                    return process, str(config.socket_path), streams
        time.sleep(0.1)
    process.kill()
    process.wait()
    raise RuntimeError(f"cache daemon not ready: {log.read_text()[-2000:]}")


def router_command(
    arm: str,
    port: int,
    urls: Sequence[str],
    redis_url: str | None,
    precise: tuple[str, list[str]] | None = None,
) -> list[str]:
    if arm in SHOAL_STRATEGY:
        if precise is not None:
            urls = [f"{u}={stream}" for u, stream in zip(urls, precise[1], strict=True)]
        command = [
            sys.executable,
            "-m",
            "shoal",
            "router",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--engines",
            ",".join(urls),
            "--log-level",
            os.environ.get("SHOAL_BENCH_ROUTER_LOG_LEVEL", "WARNING"),
            "--health-interval-s",
            "2",
        ]
        if SHOAL_STRATEGY[arm]:
            command += ["--strategy", str(SHOAL_STRATEGY[arm])]
        if redis_url:
            command += ["--redis", redis_url]
        if precise is not None:
            command += ["--cache-socket", precise[0], "--tokenizer", str(MODE.tokenizer),
                        "--tokenizer-dialect", "simulator"]  # fmt: skip
        return command
    family, _, policy = arm.partition("_router_") if arm.startswith("vllm") else arm.partition("_")
    common = [
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *urls,
        "--policy",
        policy,
        "--prometheus-port",
        str(free_port()),
        "--health-check-interval-secs",
        "2",
    ]
    if family == "sglang":
        return [
            str(BENCH_VENV / "python"),
            "-m",
            "sglang_router.launch_router",
            *common,
            "--log-level",
            "error",
        ]
    return [
        str(BENCH_VENV / "vllm-router"),
        *common,
        "--log-level",
        "error",
        "--max-concurrent-requests",
        "4096",
        "--queue-size",
        "4096",
    ]


def start_router(
    arm: str,
    urls: Sequence[str],
    logs: Path,
    *,
    tag: str = "",
    redis_url: str | None = None,
    cpu: int | None = None,
    precise: tuple[str, list[str]] | None = None,
) -> Proc:
    port = free_port()
    return spawn(
        f"router-{arm}{tag}-{port}",
        router_command(arm, port, urls, redis_url, precise),
        f"http://127.0.0.1:{port}",
        logs,
        cpu=cpu,
        timeout=60,
    )


def lookups(router_url: str) -> str:
    """The shoal router's precise prefix lookups by result (its /metrics), for the note."""
    counts: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in http_get(router_url + "/metrics", 2.0)[1].decode().splitlines():
            if line.startswith("shoal_router_prefix_lookups_total{"):
                result = line.split('result="', 1)[1].split('"', 1)[0]
                counts[result] = counts.get(result, 0.0) + float(line.rsplit(" ", 1)[1])
    if not any(counts.values()):
        return ""
    return "lookups " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(counts.items()))


def arm_available(arm: str) -> str | None:
    """None when the arm can run here, else why not."""
    if arm in SHOAL_STRATEGY and not shoal_arm_ready(arm):
        if arm in ("random", "least_request"):
            return None  # the client-side fallback
        if not shoal_router_available():
            return "router.server not on this branch yet"
        return "strategy shoal not registered in router.strategies yet"
    if arm.startswith("sglang") and not (BENCH_VENV / "python").exists():
        return "run bench/install_router_anchors.sh"
    if arm.startswith("vllm") and not (BENCH_VENV / "vllm-router").exists():
        return "run bench/install_router_anchors.sh"
    return None


# --- load generation ----------------------------------------------------------------------


@dataclass
class Result:
    sent_s: float
    ttft_s: float | None
    ok: bool
    engine: str | None
    warmup: bool = False


@dataclass
class Target:
    """Where an arm's requests go: router replicas, or a client-side policy over engines."""

    name: str
    routers: list[str] = field(default_factory=list)
    engines: list[str] = field(default_factory=list)
    policy: str = ""  # "oracle" | "random" | "least_request" (client-side)
    oracle: wl.Oracle | None = None
    alive: list[bool] = field(default_factory=list)
    inflight: list[int] = field(default_factory=list)
    rng: random.Random = field(default_factory=lambda: random.Random(7))


async def send(
    session: aiohttp.ClientSession, target: Target, path: str, body: dict[str, Any]
) -> tuple[Result, str]:
    """One streamed request; (result, the generated text)."""
    engine_index, key = -1, -1
    if target.routers:
        base = target.rng.choice(target.routers)
    elif target.policy == "oracle":
        assert target.oracle is not None
        engine_index, key = target.oracle.place(body, target.alive)
        base = target.engines[engine_index]
    elif target.policy == "least_request":
        live = [i for i, a in enumerate(target.alive) if a]
        least = min(target.inflight[i] for i in live)
        engine_index = target.rng.choice([i for i in live if target.inflight[i] == least])
        base = target.engines[engine_index]
    else:
        engine_index = target.rng.choice([i for i, a in enumerate(target.alive) if a])
        base = target.engines[engine_index]
    if engine_index >= 0:
        target.inflight[engine_index] += 1
    chat = "messages" in body
    start = time.perf_counter()
    ttft: float | None = None
    text: list[str] = []
    ok, engine = False, None
    try:
        async with session.post(base + path, json=body) as reply:
            engine = reply.headers.get("x-shoal-engine")
            if reply.status == 200:
                async for line in reply.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        ok = True
                        break
                    if ttft is not None and not chat:
                        continue
                    choice = (json.loads(data).get("choices") or [{}])[0]
                    piece = choice.get("delta", {}).get("content") if chat else choice.get("text")
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                            if target.oracle is not None:
                                target.oracle.first_token(engine_index, key)
                        text.append(piece)
            else:
                await reply.read()
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        ok = False
    finally:
        if engine_index >= 0:
            target.inflight[engine_index] -= 1
            if target.oracle is not None:
                target.oracle.done(engine_index, key)
    if engine is None and engine_index >= 0:
        engine = target.engines[engine_index]
    return Result(start, ttft if ok else None, ok, engine), "".join(text)


async def run_session(
    session: aiohttp.ClientSession,
    target: Target,
    s: wl.Session,
    t0: float,
    results: list[Result],
    warmup_s: float,
) -> None:
    await asyncio.sleep(max(0.0, t0 + s.start_s - time.perf_counter()))
    history: list[dict[str, str]] = []
    if s.system is not None:
        history.append({"role": "system", "content": s.system})
    for i, turn in enumerate(s.turns):
        if i:
            await asyncio.sleep(turn.think_s)
        body: dict[str, Any] = {"model": MODEL, "max_tokens": turn.max_tokens, "stream": True}
        if turn.prompt is not None:
            body["prompt"] = turn.prompt
            result, _ = await send(session, target, "/v1/completions", body)
        else:
            history.append({"role": "user", "content": turn.user or ""})
            body["messages"] = list(history)
            result, text = await send(session, target, "/v1/chat/completions", body)
            history.append({"role": "assistant", "content": text})
        result.warmup = s.start_s < warmup_s
        results.append(result)


async def replay(
    target: Target,
    workload: wl.Workload,
    warmup_s: float,
    snapshot: list[dict[str, float]],
    kill: tuple[float, Any] | None = None,
) -> list[Result]:
    """Every session of ``workload``; ``snapshot`` gets the engines' counters at the end of
    the warm-up (sessions starting before ``warmup_s`` are not measured)."""
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter() + 0.05
        tasks = [
            asyncio.create_task(run_session(session, target, s, t0, results, warmup_s))
            for s in workload.sessions
        ]
        await asyncio.sleep(max(0.0, t0 + warmup_s - time.perf_counter()))
        snapshot[:] = await asyncio.gather(*(asyncio.to_thread(scrape, u) for u in target.engines))
        if kill is not None:
            await asyncio.sleep(max(0.0, t0 + warmup_s + kill[0] - time.perf_counter()))
            await kill[1]()
        await asyncio.gather(*tasks)
    return results


async def listen_events(fleet_: Fleet, oracle: wl.Oracle) -> None:
    """Feed the oracle every engine's KV-event batches (vLLM's msgpack) until cancelled."""
    import msgpack
    import zmq
    import zmq.asyncio

    context = zmq.asyncio.Context()
    sockets = []
    try:
        for endpoint in fleet_.endpoints:
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(endpoint)
            sockets.append(sub)
        poller = zmq.asyncio.Poller()
        for sub in sockets:
            poller.register(sub, zmq.POLLIN)
        while True:
            for sub, _ in await poller.poll():
                frames = await sub.recv_multipart()
                batch = msgpack.unpackb(frames[-1], raw=False)
                oracle.apply(sockets.index(sub), batch[1])
    finally:
        for sub in sockets:
            sub.close(0)
        context.term()


# --- engine metrics -----------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        status, body = http_get(url + "/metrics", 2.0)
        if status != 200:
            return found
        for line in body.decode().splitlines():
            if line.startswith("#") or " " not in line:
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in (
                "vllm:prefix_cache_hits_total",
                "vllm:prefix_cache_queries_total",
                "vllm:request_success_total",
                "vllm:num_requests_running",
                "vllm:num_requests_waiting",
            ):
                found[name] = found.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def reset_fleet(urls: Sequence[str], timeout: float = 60.0) -> None:
    """Wait until every engine is idle, then empty its prefix cache."""
    for url in urls:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            req = urllib.request.Request(url + "/reset_prefix_cache", method="POST")
            try:
                with urllib.request.urlopen(req, timeout=2):
                    break
            except urllib.error.HTTPError:
                time.sleep(0.1)  # 400 while blocks are in use: still draining
            except OSError:
                break  # a dead engine (the kill run)


# --- one arm over one workload ------------------------------------------------------------


@dataclass
class CellResult:
    arm: str
    results: list[Result]
    hits: float
    queries: float
    per_engine: list[float]
    note: str = ""

    def measured(self) -> list[Result]:
        return [r for r in self.results if not r.warmup]

    def ttfts(self) -> list[float]:
        return sorted(r.ttft_s for r in self.measured() if r.ttft_s is not None)

    def summary(self) -> dict[str, float | None]:
        t = self.ttfts()
        measured = self.measured()
        return {
            "ttft_p50_ms": round(pct(t, 50) * 1e3, 1) if t else None,
            "ttft_p90_ms": round(pct(t, 90) * 1e3, 1) if t else None,
            "hit_rate": round(self.hits / self.queries, 4) if self.queries else None,
            "ok": round(sum(r.ok for r in measured) / max(1, len(measured)), 4),
        }


def pct(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def run_cell(
    arm: str,
    fleet_: Fleet,
    workload: wl.Workload,
    routers: list[str],
    kill: tuple[float, Any] | None = None,
) -> CellResult:
    urls = fleet_.urls
    reset_fleet(urls)
    before: list[dict[str, float]] = []
    target = Target(
        arm, routers=routers, engines=urls, alive=[True] * len(urls), inflight=[0] * len(urls)
    )
    note = ""
    if not routers:
        target.policy = "oracle" if arm == "oracle" else arm
        note = "" if arm == "oracle" else "client-side"
    if arm == "oracle":
        target.oracle = wl.Oracle(len(urls), MODE.tokenizer)

    async def main() -> list[Result]:
        listener = None
        if target.oracle is not None:
            listener = asyncio.create_task(listen_events(fleet_, target.oracle))
            await asyncio.sleep(0.2)  # the SUB sockets connect before the first event
        try:
            return await replay(target, workload, workload.warmup_s, before, kill)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    results = asyncio.run(main())
    after = [scrape(u) for u in urls]

    def delta(name: str) -> list[float]:
        return [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True)]

    return CellResult(
        arm,
        results,
        sum(delta("vllm:prefix_cache_hits_total")),
        sum(delta("vllm:prefix_cache_queries_total")),
        delta("vllm:request_success_total"),
        note,
    )


def run_workload(
    name: str, arms: Sequence[str], args: argparse.Namespace, logs: Path
) -> dict[str, CellResult]:
    workload = wl.build(name, args.seed, args.seconds, args.warmup)
    cells: dict[str, CellResult] = {}
    with fleet(args.engines, workload.engine_flags, logs) as fleet_:
        routers: dict[str, Proc] = {}
        try:
            for arm in arms:
                if arm == "oracle" or (arm in SHOAL_STRATEGY and not shoal_arm_ready(arm)):
                    continue
                routers[arm] = start_router(arm, fleet_.urls, logs, precise=fleet_.precise(arm))
            for arm in arms:
                router = routers.get(arm)
                cells[arm] = run_cell(arm, fleet_, workload, [router.url] if router else [])
                if router is not None and arm in SHOAL_STRATEGY:
                    cells[arm].note = lookups(router.url)
                progress(f"{name:14} {arm:28} {cells[arm].summary()}")
        finally:
            for router in routers.values():
                router.stop()
    return cells


def run_replicas(
    arms: Sequence[str], args: argparse.Namespace, logs: Path
) -> dict[str, CellResult]:
    """The tenants workload through 4 replicas of each router, requests spread at random."""
    workload = wl.build("tenants", args.seed, args.seconds, args.warmup)
    cells: dict[str, CellResult] = {}
    redis = None
    with fleet(args.engines, workload.engine_flags, logs) as fleet_:
        try:
            if (REPO / "router" / "shared.py").exists():
                port = free_port()
                redis = subprocess.Popen(
                    [
                        "/usr/bin/redis-server",
                        "--port",
                        str(port),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--bind",
                        "127.0.0.1",
                    ],
                    stdout=subprocess.DEVNULL,
                )
                time.sleep(0.3)
            for arm in arms:
                if arm == "oracle" or (arm in SHOAL_STRATEGY and not shoal_arm_ready(arm)):
                    continue
                redis_url = (
                    f"redis://127.0.0.1:{port}/0" if redis and arm in SHOAL_STRATEGY else None
                )
                replicas = [
                    start_router(
                        arm,
                        fleet_.urls,
                        logs,
                        tag=f"-r{i}",
                        redis_url=redis_url,
                        precise=fleet_.precise(arm),
                    )
                    for i in range(4)
                ]
                try:
                    cells[arm] = run_cell(arm, fleet_, workload, [r.url for r in replicas])
                finally:
                    for r in replicas:
                        r.stop()
                if arm in SHOAL_STRATEGY:
                    cells[arm].note = (
                        "shared through Redis"
                        if redis_url
                        else ("in memory per replica: router.shared not on this branch yet")
                    )
                progress(f"{'4 replicas':14} {arm:28} {cells[arm].summary()}")
        finally:
            if redis is not None:
                redis.terminate()
                redis.wait()
    return cells


def run_kill(arms: Sequence[str], args: argparse.Namespace, logs: Path) -> dict[str, CellResult]:
    """4 engines, the tenants workload at a lower rate; engine 3 SIGKILLed halfway."""
    workload = dataclasses.replace(
        wl.tenants(args.seed, args.warmup + args.seconds, rate=10.0), warmup_s=args.warmup
    )
    cells: dict[str, CellResult] = {}
    with fleet(4, workload.engine_flags, logs) as fleet_:
        for arm in arms:
            if arm == "oracle" or (arm in SHOAL_STRATEGY and not shoal_arm_ready(arm)):
                continue
            if fleet_.engines[3].process.poll() is not None:
                fleet_.restart(3)
            router = start_router(arm, fleet_.urls, logs, tag="-kill", precise=fleet_.precise(arm))
            dead_url = fleet_.urls[3]
            detected: list[float] = []

            watchers: list[asyncio.Task[None]] = []

            async def kill(
                arm: str = arm,
                url: str = router.url,
                dead: str = dead_url,
                detected: list[float] = detected,
                watchers: list[asyncio.Task[None]] = watchers,
            ) -> None:
                fleet_.engines[3].process.kill()
                killed = time.perf_counter()
                if arm in SHOAL_STRATEGY:
                    watchers.append(asyncio.create_task(watch(url, dead, killed, detected)))

            try:
                cell = run_cell(arm, fleet_, workload, [router.url], kill=(args.seconds / 2, kill))
            finally:
                router.stop()
            if detected:
                after = [r for r in cell.results if r.sent_s > detected[0] and r.engine == dead_url]
                cell.note = (
                    f"detected {detected[0] - detected[1]:.2f} s after the kill; "
                    f"{len(after)} sent to it after"
                )
            elif arm in SHOAL_STRATEGY:
                cell.note = "not seen unhealthy in /router/engines"
            cells[arm] = cell
            progress(f"{'engine kill':14} {arm:28} {cell.summary()} {cell.note}")
    return cells


async def watch(router_url: str, dead_url: str, killed: float, detected: list[float]) -> None:
    """Poll the shoal router's /router/engines until it marks ``dead_url`` unhealthy."""
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
                async with session.get(router_url + "/router/engines") as reply:
                    data = await reply.json(content_type=None)
                engines = data.get("engines", data) if isinstance(data, dict) else data
                for e in engines if isinstance(engines, list) else []:
                    down = not e.get("healthy", True) or e.get("breaker") == "open"
                    if e.get("url", "").rstrip("/") == dead_url and down:
                        detected[:] = [time.perf_counter(), killed]
                        return
            await asyncio.sleep(0.05)


# --- overhead -----------------------------------------------------------------------------


def fast_engine(port: int) -> None:
    """An OpenAI server that answers every completion at once (the overhead arm's engine)."""
    from aiohttp import web

    reply = json.dumps(
        {
            "id": "cmpl-0",
            "object": "text_completion",
            "created": 0,
            "model": MODEL,
            "choices": [{"index": 0, "text": " ok", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
    ).encode()

    async def complete(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=reply, content_type="application/json")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def ok(_: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", ok)
    app.router.add_get("/metrics", ok)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def closed_loop(
    urls: Sequence[str], seconds: float, concurrency: int, prompt: str
) -> tuple[list[float], int, float]:
    latencies: list[float] = []
    errors = 0
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.perf_counter() + seconds

        async def worker(i: int) -> None:
            nonlocal errors
            url = urls[i % len(urls)] + "/v1/completions"
            while time.perf_counter() < end:
                start = time.perf_counter()
                try:
                    async with session.post(url, data=body, headers=headers) as reply:
                        await reply.read()
                        if reply.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, OSError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
    return latencies, errors, elapsed


def run_overhead(arms: Sequence[str], args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    seconds = 3.0 if args.quick else 10.0
    if args.quick:  # the policy barely matters with engines that answer at once
        arms = [a for a in arms if a not in ("random", "least_request")]
    prompt = " ".join(f"w{i:05d}" for i in range(16384 // 7))[:16384]
    engines: list[Proc] = []
    out: dict[str, Any] = {}
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {1})  # the client on core 1; routers get core 0
    try:
        for i in range(2):
            port = free_port()
            engines.append(
                spawn(
                    f"fast-{i}",
                    [sys.executable, str(Path(__file__).resolve()), "--fast-engine", str(port)],
                    f"http://127.0.0.1:{port}",
                    logs,
                    cpu=1,
                )
            )
        urls = [e.url for e in engines]
        asyncio.run(closed_loop(urls, 1.0, args.concurrency, prompt))  # warm-up
        direct, _, _ = asyncio.run(closed_loop(urls, seconds, args.concurrency, prompt))
        direct.sort()
        out["direct"] = {
            "p50_ms": pct(direct, 50) * 1e3,
            "p99_ms": pct(direct, 99) * 1e3,
            "rps": len(direct) / seconds,
        }
        for arm in arms:
            if (
                arm_available(arm)
                or arm == "oracle"
                or (arm in SHOAL_STRATEGY and not shoal_arm_ready(arm))
            ):
                continue
            router = start_router(arm, urls, logs, tag="-overhead", cpu=0)
            try:
                asyncio.run(closed_loop([router.url], 1.0, args.concurrency, prompt))
                lat, errors, elapsed = asyncio.run(
                    closed_loop([router.url], seconds, args.concurrency, prompt)
                )
            finally:
                router.stop()
            lat.sort()
            out[arm] = {
                "added_p50_ms": round((pct(lat, 50) - pct(direct, 50)) * 1e3, 3),
                "added_p99_ms": round((pct(lat, 99) - pct(direct, 99)) * 1e3, 3),
                "rps": round(len(lat) / elapsed, 1),
                "errors": errors,
            }
            progress(f"{'overhead':14} {arm:28} {out[arm]}")
    finally:
        for e in engines:
            e.stop()
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


# --- report -------------------------------------------------------------------------------


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def bootstrap_ratio(
    a: Sequence[float], b: Sequence[float], rng: random.Random, rounds: int = 300
) -> tuple[float, float]:
    """5th and 95th percentiles of p90(a) / p90(b) over bootstrap resamples of requests."""
    ratios = []
    for _ in range(rounds):
        ra = sorted(rng.choices(a, k=len(a)))
        rb = sorted(rng.choices(b, k=len(b)))
        ratios.append(pct(ra, 90) / pct(rb, 90))
    ratios.sort()
    return pct(ratios, 5), pct(ratios, 95)


def table(workloads: dict[str, dict[str, CellResult]], overhead: dict[str, Any]) -> str:
    rng = random.Random(0)
    lines = []
    for name, cells in workloads.items():
        anchors = [c for a, c in cells.items() if a in ANCHORS and c.ttfts()]
        best = min(anchors, key=lambda c: pct(c.ttfts(), 90)) if anchors else None
        lines.append(f"\n{name} (best anchor: {best.arm if best else '-'})")
        lines.append(
            "| arm | TTFT p50 ms | TTFT p90 ms | p90 / best anchor [90% CI] | hit rate "
            "| ok | requests | max engine share / fair | note |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for arm, cell in cells.items():
            s = cell.summary()
            ratio = "-"
            if best is not None and cell.ttfts():
                lo, hi = bootstrap_ratio(cell.ttfts(), best.ttfts(), rng)
                ratio = f"{pct(cell.ttfts(), 90) / pct(best.ttfts(), 90):.2f} [{lo:.2f}, {hi:.2f}]"
            total = sum(cell.per_engine)
            share = f"{max(cell.per_engine) / (total / len(cell.per_engine)):.2f}" if total else "-"
            lines.append(
                f"| {arm} | {s['ttft_p50_ms']} | {s['ttft_p90_ms']} | {ratio} | "
                f"{s['hit_rate']} | {s['ok']} | {len(cell.measured())} | {share} | "
                f"{cell.note} |"
            )
    if overhead:
        d = overhead.get("direct", {})
        lines.append(
            f"\noverhead (direct: p50 {d.get('p50_ms', 0):.2f} ms, "
            f"p99 {d.get('p99_ms', 0):.2f} ms, {d.get('rps', 0):.0f} req/s)"
        )
        lines.append("| arm | added p50 ms | added p99 ms | req/s | errors |")
        lines.append("|---|---|---|---|---|")
        for arm, o in overhead.items():
            if arm != "direct":
                lines.append(
                    f"| {arm} | {o['added_p50_ms']} | {o['added_p99_ms']} | {o['rps']} "
                    f"| {o['errors']} |"
                )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=float, help="arrival window per arm (quick 3, else 20)")
    parser.add_argument("--warmup", type=float, help="unmeasured warm-up per arm (quick 1, else 5)")
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the engines' and routers' logs"
    )
    parser.add_argument("--workloads", default=",".join(wl.WORKLOADS))
    parser.add_argument(
        "--arms", help="comma list (default: the JSON's arms, + anchors' others without --quick)"
    )
    parser.add_argument("--no-overhead", action="store_true")
    parser.add_argument("--overhead-only", action="store_true")
    parser.add_argument("--replicas", action="store_true")
    parser.add_argument("--kill", action="store_true")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--tokenizer",
        default=os.environ.get("SHOAL_BENCH_TOKENIZER", str(REPO / ".cache/engine/tiny-llama")),
        help="tokenizer.json directory for precise mode (default .cache/engine/tiny-llama)",
    )
    parser.add_argument(
        "--no-precise", action="store_true", help="no cache daemon: shoal routes approximately"
    )
    parser.add_argument("--fast-engine", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so every process started is stopped
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    if args.fast_engine:
        fast_engine(args.fast_engine)
        return 0
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 20.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 5.0
    arms = (
        args.arms.split(",")
        if args.arms
        else list(JSON_ARMS) + ([] if args.quick else list(EXTRA_ARMS))
    )
    precise_ready = (REPO / "router" / "precise.py").exists()
    if not args.no_precise and precise_ready and (Path(args.tokenizer) / "tokenizer.json").exists():
        MODE.tokenizer = args.tokenizer
        wl.use_tokenizer(MODE.tokenizer)
        progress(f"precise mode: engines tokenize with {MODE.tokenizer}, a cache daemon reads "
                 "their "
                 "KV events, shoal routes with --cache-socket")  # fmt: skip
    else:
        progress("approximate mode: no cache daemon (--no-precise, no router/precise.py, or "
                 f"no tokenizer.json in {args.tokenizer})")  # fmt: skip
        arms = [a for a in arms if a != "shoal_approx"]
    wanted = list(arms)  # the JSON names every one, null where it could not run
    for arm in list(arms):
        why = arm_available(arm)
        if why:
            progress(f"arm {arm} skipped: {why}")
            arms.remove(arm)
    logs = Path(tempfile.mkdtemp(prefix="bench-router-"))
    started = time.perf_counter()
    load_before = os.getloadavg()
    workloads: dict[str, dict[str, CellResult]] = {}
    overhead: dict[str, Any] = {}
    try:
        if not args.overhead_only:
            for name in args.workloads.split(","):
                workloads[name] = run_workload(name, arms, args, logs)
            if args.replicas:
                workloads["tenants_4_replicas"] = run_replicas(arms, args, logs)
            if args.kill:
                workloads["engine_kill"] = run_kill(arms, args, logs)
        if not args.no_overhead:
            overhead = run_overhead(arms, args, logs)
    finally:
        progress(f"took {time.perf_counter() - started:.0f} s; logs in {logs}")
    if args.json:
        print(
            json.dumps(
                {
                    "workloads": {
                        n: {a: cells[a].summary() if a in cells else ABSENT for a in wanted}
                        for n, cells in workloads.items()
                    },
                    "overhead": {
                        a: {k: overhead[a][k] for k in OVERHEAD_KEYS}
                        if a in overhead
                        else dict.fromkeys(OVERHEAD_KEYS)
                        for a in wanted
                        if a in overhead or a in ("shoal", *ANCHORS[::2])
                    }
                    if overhead
                    else {},
                }
            )
        )
    else:
        load = os.getloadavg()
        print(
            f"load average before {load_before[0]:.2f}, after {load[0]:.2f} "
            f"(1-min; {os.cpu_count()} CPUs), {time.perf_counter() - started:.0f} s"
        )
        print(table(workloads, overhead))
    if not args.keep_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
