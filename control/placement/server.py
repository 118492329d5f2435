"""The planner's HTTP endpoint: ``GET /v1/plan``, ``GET /status``, ``GET /metrics``.

::

    GET /v1/plan   formats.plan_to_json(plan) + {"model", "created"}: the plan in force
                   (gpus, cost, lp_bound, greedy_cost, solve_s, status, assignment
                   [gpu][out][in], indexes [out_ticks, in_ticks]); 404 {"error"} before
                   the first plan
    GET /status    {"plan", "mix", "reason", "workload", "pools": {TYPE: {target, spec,
                   ready, pending}}, "rounds": [...], "errors": [...]}
    GET /metrics   shoal_placement_* (Prometheus text)

The router's placement-aware ``slo`` strategy (``--placement-url``) polls ``/v1/plan``.
Listens on loopback by default. The authentication is the autoscaler's, reused, not
copied (``control.autoscale.server._require_token``): with a token (``--auth-token-file``)
every route but ``/metrics`` needs ``Authorization: Bearer TOKEN`` (401 otherwise,
compared in constant time); beyond loopback a token is required unless
``--insecure-no-auth`` (``PlacementSettings``). The plan is not secret the way a wake is
dangerous, but it tells anyone who reads it the fleet's shape and traffic mix.
"""

from __future__ import annotations

import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.autoscale.server import _require_token
from control.placement.planner import Planner
from shoal.errors import ConfigError

__all__ = ["make_app", "start_server"]

log = logging.getLogger("shoal." + __name__)

_PLANNER = web.AppKey("planner", Planner)


async def _plan(request: web.Request) -> web.Response:
    plan = request.app[_PLANNER].plan_json()
    if plan is None:
        return web.json_response(
            {"error": "no plan yet: the first round has not solved"}, status=404
        )
    return web.json_response(plan)


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[_PLANNER].status())


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_PLANNER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(planner: Planner, token: str | None = None) -> web.Application:
    app = web.Application(middlewares=[_require_token(token)] if token else [])
    app[_PLANNER] = planner
    app.router.add_get("/v1/plan", _plan)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    return app


async def start_server(
    planner: Planner, host: str, port: int, token: str | None = None
) -> web.AppRunner:
    """Listen on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if it cannot."""
    runner = web.AppRunner(make_app(planner, token), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info("placement endpoint on http://%s:%d (/v1/plan, /status, /metrics)", host, port)
    return runner
