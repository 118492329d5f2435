"""``shoal engines serve``: the daemon that owns one fleet of engine groups, and its HTTP API.

::

    GET  /v1/fleet    {"spec": {model, engine_command, tp, pp, ..., revision, replicas,
                       max_replicas, max_surge, max_unavailable}, "ready", "pending",
                       "endpoints": [ready engines' URLs], "groups": [{id, phase, revision,
                       url, nodes, gpus, waiting_for, reason, detail, age_s}, ...]}
    POST /v1/scale    {"replicas": N} -> 202 {"replicas": N}; 400 unless 0 <= N <= max
    POST /v1/update   {"engine_command"?, "env"?, "tp"?, "pp"?, ...} -> 202 {"revision",
                      "previous"} (a rolling update starts); 200 {"revision", "changed":
                      false} when the template is unchanged; 400 for an unknown key or value
    GET  /v1/discovery  [{"url", "gpus", "gpu_type"?}, ...]: the ready groups, the list
                      the discovery file holds (``EngineFleet.discovery()``), for a router
                      that cannot read the file (``--discovery http``: another pod, host)
    GET  /metrics     shoal_engines_* (Prometheus text)
    GET  /healthz     {"ok": true}

A fleet has one owner, this daemon (the autoscaler and the placement planner ask it through
``control/autoscale/actuators/ray.py``, as they ask Kubernetes' scale subresource; two
loops reconciling one set of Ray groups would fight). Bodies are read with
``shoal.bodies.read_capped`` (413 over 64 KiB); every error answer is JSON ``{"error"}``.

Auth as the autoscaler's: loopback by default; with ``--auth-token-file`` every route but
``/metrics`` and ``/healthz`` needs ``Authorization: Bearer TOKEN`` (``control.http``);
beyond loopback a token is required unless ``--insecure-no-auth`` (``EnginesSettings``).

``EnginesDaemon`` is the loop: each round ``fleet.reconcile_once()``, timed, then the
fleet's statuses into the metrics. It keeps the ``FleetSpec`` it gave the fleet (scale and
update change both together), so the API answers the spec as asked, not as inferred.
Rejected: running ``EngineFleet.run`` and reading metrics from a second task (the round's
duration would be invisible, and two tasks would race on the statuses).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.autoscale.types import ReplicaState
from control.http import require_token, start_site
from control.ray.config import (
    EnginesSettings,
    apply_update,
    check_serve,
    fleet_spec,
    gpu_health_urls,
)
from control.ray.metrics import EnginesMetrics
from control.ray.types import FleetSpec, GroupSpec, GroupStatus
from shoal.bodies import read_capped
from shoal.config import read_secret
from shoal.errors import ConfigError, ShoalError

__all__ = [
    "EnginesDaemon",
    "FleetLike",
    "group_json",
    "make_app",
    "serve",
    "spec_json",
]

log = logging.getLogger("shoal." + __name__)

MAX_BODY_BYTES = 64 << 10


class CountersLike(Protocol):
    """What the metrics read of ``EngineFleet.counters()``."""

    @property
    def groups_replaced(self) -> Mapping[str, int]: ...


class FleetLike(Protocol):
    """What the daemon needs of ``control.ray.fleet.EngineFleet``."""

    async def reconcile_once(self) -> None: ...

    def scale(self, replicas: int) -> None: ...

    def update(self, template: GroupSpec) -> str: ...

    def counters(self) -> CountersLike: ...

    def state(self) -> ReplicaState: ...

    def status(self) -> list[GroupStatus]: ...

    def discovery(self) -> list[dict[str, Any]]: ...

    async def close(self) -> None: ...


def spec_json(spec: FleetSpec, max_replicas: int) -> dict[str, Any]:
    t = spec.template
    return {
        "model": t.model,
        "engine_command": t.engine_command,
        "tp": t.tensor_parallel,
        "pp": t.pipeline_parallel,
        "strategy": t.strategy,
        "accelerator_type": t.accelerator_type,
        "gpu_type": t.gpu_type,
        "driver_cpus": t.driver_cpus,
        "wait_deadline_s": t.wait_deadline_s,
        "ready_timeout_s": t.ready_timeout_s,
        "env": dict(t.env),
        "revision": t.revision,
        "replicas": spec.replicas,
        "max_replicas": max_replicas,
        "max_surge": spec.max_surge,
        "max_unavailable": spec.max_unavailable,
        "workers": t.workers,
    }


def group_json(status: GroupStatus, now: float) -> dict[str, Any]:
    return {
        "id": status.group_id,
        "phase": status.phase.value,
        "revision": status.revision,
        "url": status.url,
        "nodes": list(status.nodes),
        "gpus": list(status.gpus),
        "waiting_for": status.waiting_for,
        "reason": status.reason,
        "detail": status.detail,
        "age_s": round(max(0.0, now - status.created), 3),
    }


class EnginesDaemon:
    """The fleet's one owner: its spec, its rounds, its metrics."""

    def __init__(
        self,
        fleet: FleetLike,
        spec: FleetSpec,
        *,
        max_replicas: int,
        interval_s: float = 2.0,
        metrics: EnginesMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert 0 <= spec.replicas <= max_replicas, "settings check the replicas"
        self.fleet = fleet
        self.spec = spec
        self.max_replicas = max_replicas
        self.interval_s = interval_s
        self.metrics = metrics or EnginesMetrics()
        self.clock = clock
        self.rounds = 0

    def scale(self, replicas: int) -> None:
        """Ask for ``replicas`` groups; ``ConfigError`` outside ``0..max_replicas``."""
        if not 0 <= replicas <= self.max_replicas:
            raise ConfigError(
                f"replicas must be between 0 and {self.max_replicas} (--max-replicas), "
                f"got {replicas}"
            )
        self.fleet.scale(replicas)
        self.spec = dataclasses.replace(self.spec, replicas=replicas)
        log.info("scaled to %d groups", replicas)

    def update(self, changes: dict[str, Any]) -> tuple[str, bool]:
        """Apply ``changes`` to the template; (the revision now, whether it changed).
        ``ConfigError`` for an unknown key or a bad value (nothing changes then)."""
        template = apply_update(self.spec.template, changes)
        if template.revision == self.spec.template.revision:
            return template.revision, False
        revision = self.fleet.update(template)
        template = dataclasses.replace(template, revision=revision)  # the fleet's word
        previous = self.spec.template.revision
        self.spec = dataclasses.replace(self.spec, template=template)
        log.info("template revision %s -> %s: rolling update", previous, template.revision)
        return template.revision, True

    def fleet_json(self) -> dict[str, Any]:
        state = self.fleet.state()
        now = self.clock()
        return {
            "spec": spec_json(self.spec, self.max_replicas),
            "ready": state.ready,
            "pending": state.pending,
            "endpoints": list(state.endpoints),
            "groups": [group_json(s, now) for s in self.fleet.status()],
        }

    async def run_round(self) -> None:
        """One fleet round, timed; the fleet's failures to reach Ray or write its file are
        logged and the next round tries again (the daemon never dies of its cluster)."""
        start = self.clock()
        try:
            await self.fleet.reconcile_once()
        except (ShoalError, OSError) as exc:
            log.warning("fleet round failed: %s", exc)
        end = self.clock()
        self.rounds += 1
        self.metrics.observe_round(end - start)
        self.metrics.observe(
            self.spec, self.fleet.status(), end, self.fleet.counters().groups_replaced
        )

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.run_round()
            with contextlib.suppress(TimeoutError):  # the interval passed: the next round
                await asyncio.wait_for(stop.wait(), self.interval_s)


# -- HTTP ---------------------------------------------------------------------------------

_DAEMON = web.AppKey("daemon", EnginesDaemon)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_body(request: web.Request) -> dict[str, Any] | web.Response:
    raw = await read_capped(request, MAX_BODY_BYTES)
    if raw is None:
        return _error(f"body over {MAX_BODY_BYTES} bytes", 413)
    try:
        body = json.loads(raw.decode() or "{}")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return _error("body must be a JSON object", 400)
    if not isinstance(body, dict):
        return _error("body must be a JSON object", 400)
    return body


async def _fleet(request: web.Request) -> web.Response:
    return web.json_response(request.app[_DAEMON].fleet_json())


async def _discovery(request: web.Request) -> web.Response:
    return web.json_response(request.app[_DAEMON].fleet.discovery())


async def _scale(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    replicas = body.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or set(body) != {"replicas"}:
        return _error('body must be {"replicas": N} with N an integer', 400)
    try:
        request.app[_DAEMON].scale(replicas)
    except ConfigError as exc:
        return _error(str(exc), 400)
    return web.json_response({"replicas": replicas}, status=202)


async def _update(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if isinstance(body, web.Response):
        return body
    daemon = request.app[_DAEMON]
    previous = daemon.spec.template.revision
    try:
        revision, changed = daemon.update(body)
    except ConfigError as exc:
        return _error(str(exc), 400)
    if not changed:
        return web.json_response({"revision": revision, "changed": False})
    return web.json_response({"revision": revision, "previous": previous}, status=202)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_DAEMON].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def make_app(daemon: EnginesDaemon, token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[require_token(token)] if token else [], client_max_size=MAX_BODY_BYTES
    )
    app[_DAEMON] = daemon
    app.router.add_get("/v1/fleet", _fleet)
    app.router.add_get("/v1/discovery", _discovery)
    app.router.add_post("/v1/scale", _scale)
    app.router.add_post("/v1/update", _update)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    return app


async def start_server(
    daemon: EnginesDaemon, host: str, port: int, token: str | None = None
) -> web.AppRunner:
    """Listen on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if it cannot."""
    runner = await start_site(make_app(daemon, token), host, port)
    log.info("engines daemon on http://%s:%d (/v1/fleet, /v1/discovery, /v1/scale, ...)",
             host, port)  # fmt: skip
    return runner


# -- wiring -------------------------------------------------------------------------------


async def _poll_health(health: Any, interval_s: float, stop: asyncio.Event) -> None:
    """The health feed's owner polls it (the fleet only reads it: a slow watcher must not
    stretch a fleet round)."""
    while not stop.is_set():
        await health.poll()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)


async def _serve(settings: EnginesSettings, token: str | None) -> int:
    from control.ray.fleet import EngineFleet
    from control.ray.group import RayEngineGroup, size_pools

    spec = fleet_spec(settings)
    size_pools(settings.max_replicas + settings.max_surge)  # every group polled at once
    health = None
    urls = gpu_health_urls(settings.gpu_health)
    if urls:
        from control.health.client import HealthFeed

        health_token = (
            read_secret(settings.gpu_health_token_file, "--gpu-health-token-file")
            if settings.gpu_health_token_file
            else None
        )
        health = HealthFeed(urls, token=health_token, interval_s=settings.gpu_health_interval_s)
    fleet = EngineFleet(
        spec,
        group_factory=RayEngineGroup,
        discovery_file=Path(settings.discovery_file) if settings.discovery_file else None,
        health=health,
        drain_s=settings.drain_s,
        stop_grace_s=settings.stop_grace_s,
    )
    daemon = EnginesDaemon(
        fleet, spec, max_replicas=settings.max_replicas, interval_s=settings.interval_s
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    health_task = None
    try:
        if settings.port:
            runner = await start_server(daemon, settings.host, settings.port, token)
        if health is not None:
            health_task = asyncio.create_task(
                _poll_health(health, settings.gpu_health_interval_s, stop)
            )
        log.info(
            "engines fleet: %d x %s (tp %d, pp %d, revision %s), every %.1f s",
            spec.replicas, spec.template.model, spec.template.tensor_parallel,
            spec.template.pipeline_parallel, spec.template.revision, settings.interval_s,
        )  # fmt: skip
        await daemon.run(stop)
    finally:
        log.info("engines daemon stopping: stopping every group")
        stop.set()
        if runner is not None:
            await runner.cleanup()
        await fleet.close()
        if health_task is not None:
            await health_task
        if health is not None:
            await health.close()
        log.info("engines daemon stopped")
    return 0


def serve(settings: EnginesSettings) -> int:
    """Join Ray, run the daemon until SIGTERM/SIGINT (every group stopped then); the exit
    code. ``RayUnavailable`` when Ray cannot be joined, ``ConfigError`` for bad settings."""
    check_serve(settings)
    token = (
        read_secret(settings.auth_token_file, "--auth-token-file")
        if settings.auth_token_file
        else None
    )
    from control.ray.group import connect

    connect(settings.ray_address or None)  # before the loop: ray.init wants the main thread
    return asyncio.run(_serve(settings, token))
