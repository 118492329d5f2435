"""Run the router: one process per worker, uvloop, graceful stop; and a test helper.

``serve(settings)`` builds everything from ``RouterSettings`` (``build_proxy``) and serves
until SIGTERM/SIGINT. With ``--workers N > 1`` the parent starts N worker processes
(``multiprocessing`` spawn) that each bind the same port with ``SO_REUSEPORT``, so the
kernel spreads connections over them; each has its own engine pool, scraper, strategies
and (without ``--redis``) its own ledger and limits. The parent forwards the stop signal
and exits with the first non-zero worker code.

What is built from settings (``build_proxy``, inside the serving loop):

* ``--redis URL``: ``router.shared``'s ``RedisLedger.connect(url)`` and
  ``RedisLimiter.connect(url, user_rpm=, user_tpm=, model_rps=)`` (else in memory);
* ``--cache-socket PATH``: ``router.precise``'s ``PreciseLocator.connect(PATH,
  PromptTokenizer(--tokenizer, dialect=--tokenizer-dialect), namespace=Namespace(
  --engine-model) or the daemon's, chunk_tokens=--chunk-tokens)`` (else no precise view);
* ``--discovery dns|k8s|file|http``: ``router.discovery.make_discovery(...)``, whose list the
  proxy copies into the pool every ``--discovery-interval-s``; static ``--engines`` is
  parsed here (``parse_engines``);
* ``--placement-url URL``: ``router.plan.PlanPoller``, whose ``current`` plan the ``slo``
  strategy reads (``StrategyDeps.placement``); the proxy starts and stops it;
* ``--gpu-health URL,...``: ``router.gpu_health.GpuHealthPoller``, which hands the set of
  unhealthy GPUs to the pool (``EnginePool.set_unhealthy_gpus``); the pool starts and
  stops it.

* ``--admin-port PORT``: a second listener on ``--admin-host`` (default loopback) for the
  admin routes (``router.proxy.ADMIN_PATHS``), which then leave the main port; beyond
  loopback it needs ``--admin-token-file`` (or ``--insecure-no-auth``), like the main port
  needs ``--api-keys``. Each worker binds it with ``SO_REUSEPORT`` too.

Those modules belong to other parts of issue 12; when one is missing the router refuses
to start with a ``ConfigError`` naming the flag (``check_settings``, also run before
forking workers), rather than silently running without it.

``running_router(port, engines=[...], **flags)`` starts ``python -m shoal router serve``
as a subprocess and waits for ``/health`` (like ``sim/process.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

from router.config import RouterSettings
from router.engines import EnginePool, parse_engines
from router.errors import UnknownStrategy
from router.gpu_health import POLL_RESULTS, GpuHealthPoller
from router.ledger import InMemoryLedger, Ledger
from router.limits import InMemoryLimiter, Limiter, load_api_keys
from router.metrics import RouterMetrics
from router.pipeline import Pipeline, PrefixLocator
from router.plan import NullPlanSource, PlanPoller, PlanSource
from router.proxy import Proxy
from router.strategies import StrategyDeps
from router.strategies.base import no_plan, uncounted
from router.types import PlacementPlan
from router.wake import read_token
from shoal.config import is_loopback
from shoal.errors import ConfigError, ShoalError
from shoal.processes import shoal_env, spawn_logged

__all__ = [
    "RouterProcess",
    "build_proxy",
    "check_settings",
    "running_router",
    "serve",
    "start_router",
]

log = logging.getLogger("shoal." + __name__)


def _optional(module: str, flag: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise ConfigError(f"{flag} needs {module}, which this installation lacks") from None


def _pipeline(
    settings: RouterSettings,
    locator: PrefixLocator | None,
    placement: Callable[[], PlacementPlan | None] = no_plan,
    count_placement: Callable[[str], None] = uncounted,
) -> Pipeline:
    rng = random.Random(None if settings.seed < 0 else settings.seed)
    # every tunable of StrategyDeps has a setting of the same name (config.py)
    tunables = {
        f.name: getattr(settings, f.name)
        for f in fields(StrategyDeps)
        if f.name not in ("rng", "clock", "placement", "count_placement")
    }
    deps = StrategyDeps(rng=rng, placement=placement, count_placement=count_placement, **tunables)
    try:
        return Pipeline(
            settings.strategy,
            deps,
            locator=locator,
            locate_timeout_s=settings.locate_timeout_s,
            retry_after_s=settings.retry_after_s,
        )
    except UnknownStrategy as exc:  # a request's bad header is a 400; a bad flag stops here
        raise ConfigError(f"--strategy: {exc}") from None


def check_settings(settings: RouterSettings) -> None:
    """What can be checked without I/O: the engines list, the strategy, the key file, and
    that the modules the flags need are there (``ConfigError`` naming the flag)."""
    if settings.discovery == "static" and not parse_engines(settings.engines):
        raise ConfigError("give the engines: --engines URL,URL,... (or --discovery ...)")
    if settings.discovery != "static":
        _optional("router.discovery", f"--discovery {settings.discovery}")
    if settings.redis:
        _optional("router.shared", "--redis")
    if settings.cache_socket:
        _optional("router.precise", "--cache-socket")
        if not settings.tokenizer:
            raise ConfigError("--cache-socket needs --tokenizer DIR (the served model's)")
    _pipeline(settings, None)
    if settings.api_keys:
        load_api_keys(settings.api_keys)
    elif not is_loopback(settings.host):
        if not settings.insecure_no_auth:
            raise ConfigError(
                f"the router would listen on {settings.host} beyond loopback without "
                "authentication: give --api-keys FILE, or --insecure-no-auth to accept that"
            )
        log.warning("listening on %s without API keys (--insecure-no-auth)", settings.host)
    if settings.admin_port and not is_loopback(settings.admin_host):
        if settings.admin_token_file:
            read_token(settings.admin_token_file, "--admin-token-file")
        elif not settings.insecure_no_auth:
            raise ConfigError(
                f"the admin listener would listen on {settings.admin_host} beyond loopback "
                "without authentication: give --admin-token-file FILE, or --insecure-no-auth "
                "to accept that"
            )


async def _connect_locator(settings: RouterSettings) -> PrefixLocator:
    precise = _optional("router.precise", "--cache-socket")
    tokenizer = precise.PromptTokenizer(settings.tokenizer, dialect=settings.tokenizer_dialect)
    namespace = None
    if settings.engine_model:
        from kvcache.keys import Namespace

        namespace = Namespace(settings.engine_model)
    locator: PrefixLocator = await precise.PreciseLocator.connect(
        settings.cache_socket,
        tokenizer,
        namespace=namespace,
        chunk_tokens=settings.chunk_tokens,
        timeout_s=settings.locate_timeout_s * 0.8,  # its own bound inside the pipeline's
    )
    return locator


async def build_proxy(
    settings: RouterSettings,
    *,
    ledger: Ledger | None = None,
    limiter: Limiter | None = None,
    locator: PrefixLocator | None = None,
) -> Proxy:
    """Everything one router process needs, built from ``settings`` (injected pieces win):
    Redis connections (``--redis``), the cache daemon's locator (``--cache-socket``), the
    discovery source. Call inside the event loop that will serve."""
    check_settings(settings)
    if settings.redis:
        shared = _optional("router.shared", "--redis")
        if ledger is None:
            ledger = await shared.RedisLedger.connect(settings.redis)
        if limiter is None:
            limiter = await shared.RedisLimiter.connect(
                settings.redis,
                user_rpm=settings.user_rpm,
                user_tpm=settings.user_tpm,
                model_rps=settings.model_rps,
            )
    if settings.cache_socket and locator is None:
        locator = await _connect_locator(settings)
    ledger = ledger if ledger is not None else InMemoryLedger()
    limiter = (
        limiter
        if limiter is not None
        else InMemoryLimiter(
            user_rpm=settings.user_rpm, user_tpm=settings.user_tpm, model_rps=settings.model_rps
        )
    )
    discovery = None
    if settings.discovery == "static":
        specs = parse_engines(settings.engines)
    else:
        module = _optional("router.discovery", f"--discovery {settings.discovery}")
        discovery = module.make_discovery(
            settings.discovery,
            engines=settings.engines,
            discovery_file=settings.discovery_file,
            interval_s=settings.discovery_interval_s,
            token_file=settings.discovery_token_file,
        )
        specs = list(await discovery.engines())
    pool = EnginePool(specs, settings)
    api_keys = load_api_keys(settings.api_keys) if settings.api_keys else {}
    closers = [c.close for c in (locator, discovery) if c is not None]

    async def close_extras() -> None:
        for close in closers:
            await close()

    placement: PlanSource = NullPlanSource()
    if settings.placement_url:
        token = ""
        if settings.placement_token_file:
            token = read_token(settings.placement_token_file, "--placement-token-file")
        placement = PlanPoller(
            settings.placement_url, token=token, interval_s=settings.placement_interval_s
        )
    metrics = RouterMetrics()
    if settings.gpu_health_urls:
        token = ""
        if settings.gpu_health_token_file:
            token = read_token(settings.gpu_health_token_file, "--gpu-health-token-file")
        pool.gpu_health = GpuHealthPoller(
            settings.gpu_health_urls,
            token=token,
            interval_s=settings.gpu_health_interval_s,
            on_change=pool.set_unhealthy_gpus,
            on_poll=metrics.count_gpu_health_poll,
        )
        metrics.watch_gpu_health(pool.num_gpu_unhealthy, POLL_RESULTS)
    proxy = Proxy(
        settings,
        pool,
        _pipeline(settings, locator, placement.current, metrics.count_placement),
        ledger,
        limiter,
        metrics=metrics,
        api_keys=api_keys,
        on_cleanup=close_extras,
    )
    proxy.discovery = discovery
    proxy.placement = placement
    return proxy


async def _listen(
    app: web.Application, host: str, port: int, *, reuse_port: bool, shutdown_timeout_s: float
) -> web.AppRunner:
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return runner


async def _serve(settings: RouterSettings, *, reuse_port: bool) -> int:
    proxy = await build_proxy(settings)
    runner = await _listen(
        proxy.app(), settings.host, settings.port,
        reuse_port=reuse_port, shutdown_timeout_s=settings.shutdown_timeout_s,
    )  # fmt: skip
    admin: web.AppRunner | None = None
    if settings.admin_port:  # the admin routes, off the main port (router/proxy.py)
        token = ""
        if settings.admin_token_file:
            token = read_token(settings.admin_token_file, "--admin-token-file")
        try:
            admin = await _listen(
                proxy.admin_app(token), settings.admin_host, settings.admin_port,
                reuse_port=reuse_port, shutdown_timeout_s=1.0,
            )  # fmt: skip
        except ConfigError:
            await runner.cleanup()
            raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "router ready on http://%s:%d (pid %d, strategy %s, %d engine(s))",
        settings.host,
        settings.port,
        os.getpid(),
        proxy.pipeline.default,
        len(proxy.pool.engine_ids),
    )
    await stop.wait()
    log.info("router stopping")
    if admin is not None:
        await admin.cleanup()
    await runner.cleanup()
    return 0


def _run(settings: RouterSettings, reuse_port: bool) -> int:
    try:
        import uvloop
    except ModuleNotFoundError:
        return asyncio.run(_serve(settings, reuse_port=reuse_port))
    return int(uvloop.run(_serve(settings, reuse_port=reuse_port)))


def _worker(settings: RouterSettings, log_level: str) -> None:
    from shoal.logs import setup_logging

    setup_logging(log_level, settings.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    try:
        sys.exit(_run(settings, reuse_port=True))
    except ShoalError as exc:
        print(f"shoal router worker: {exc}", file=sys.stderr)
        sys.exit(2)


def serve(settings: RouterSettings) -> int:
    """Serve until SIGTERM/SIGINT; the exit code."""
    if settings.workers == 1:
        return _run(settings, reuse_port=False)
    check_settings(settings)  # configuration errors before forking
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker, args=(settings, settings.log_level), daemon=False)
        for _ in range(settings.workers)
    ]
    for worker in workers:
        worker.start()

    def forward(signum: int, frame: Any) -> None:
        for worker in workers:
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for worker in workers:
        worker.join()
        if worker.exitcode and not code:
            code = worker.exitcode
            forward(signal.SIGTERM, None)
    return code


# ---- the test and benchmark helper ----------------------------------------------------


@dataclass
class RouterProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    scratch: Path | None = None
    admin_port: int = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def admin_url(self) -> str:
        """Where the admin routes are: the admin listener (loopback), else the main port."""
        return f"http://127.0.0.1:{self.admin_port}" if self.admin_port else self.url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        timeout: float = 10.0,
        headers: dict[str, str] | None = None,
        admin: bool = False,
    ) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one request (``admin``: to ``admin_url``); an error
        status is returned."""
        import json

        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        base = self.admin_url if admin else self.url
        req = urllib.request.Request(base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for key, value in (headers or {}).items():
            req.add_header(key, value)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                return reply.status, dict(reply.headers.items()), reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers.items()), exc.read()

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            return self.request("GET", "/health", timeout=timeout)[0] == 200
        except OSError:
            return False

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.scratch is not None and code == 0:
            import shutil

            shutil.rmtree(self.scratch, ignore_errors=True)
        elif self.scratch is not None:
            log.warning("router on port %d exited with %d; log: %s", self.port, code, self.log_path)
        return code


def router_args(**flags: Any) -> list[str]:
    args: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        else:
            args += [flag, str(value)]
    return args


def start_router(
    port: int,
    *,
    engines: Sequence[str] = (),
    host: str = "127.0.0.1",
    log_path: str | Path | None = None,
    ready_timeout_s: float = 20.0,
    wait_healthy: bool = True,
    cpu: int | None = None,
    **flags: Any,
) -> RouterProcess:
    """Start ``shoal router serve`` and wait until it listens (and, with ``wait_healthy``,
    until ``/health`` is 200, i.e. an engine is healthy); ``cpu`` pins it to one core.
    Flags are ``RouterSettings`` fields with ``_`` for ``-`` (``True`` = a bare flag,
    ``False``/``None`` = left out)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"router-{port}-"))
    log_path = Path(log_path) if log_path is not None else scratch / "router.log"
    command = [sys.executable, "-m", "shoal", "router", "serve", "--host", host,
               "--port", str(port)]  # fmt: skip
    if engines:
        command += ["--engines", ",".join(engines)]
    command += router_args(**flags)
    process = spawn_logged(command, log_path, shoal_env(), cpu)
    admin_port = int(flags.get("admin_port") or 0)
    router = RouterProcess(process, host, port, log_path, scratch, admin_port)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ShoalError(f"router exited with {process.returncode}:\n{router.log()}")
        try:
            status = router.request("GET", "/health", timeout=0.5)[0]
        except OSError:
            status = 0
        if status == 200 or (status and not wait_healthy):
            return router
        time.sleep(0.05)
    router.stop()
    raise ShoalError(f"router not ready in {ready_timeout_s} s:\n{router.log()}")


@contextlib.contextmanager
def running_router(port: int, **kwargs: Any) -> Iterator[RouterProcess]:
    """``start_router`` for the length of a ``with`` block."""
    router = start_router(port, **kwargs)
    try:
        yield router
    finally:
        router.stop()
