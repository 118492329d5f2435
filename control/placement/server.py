"""The planner's HTTP endpoint: ``GET /v1/plan``, ``GET /status``, ``GET /metrics``.

::

    GET /v1/plan   formats.plan_to_json(plan) + {"model", "created"}: the plan in force
                   (gpus, cost, lp_bound, greedy_cost, solve_s, status, assignment
                   [gpu][out][in], indexes [out_ticks, in_ticks]); 404 {"error"} before
                   the first plan
    GET /status    {"plan", "mix", "reason", "workload", "pools": {TYPE: {target, spec,
                   ready, pending}}, "rounds": [...], "errors": [...]}
    GET /metrics   shoal_placement_* (Prometheus text)
    POST /v1/wake  {"model": "M"} -> 202 {"targets": {TYPE: n}}: with no replica ready or
                   starting in any pool, the cheapest type serving the smallest cell goes
                   to max(1, its minimum) at once (``Planner.wake``); 404 {"error"} for
                   another model (with --model; nothing scaled); 503 when a pool cannot
                   be read or scaled; 400 for a body that is not UTF-8 JSON; 413 over
                   64 KiB. The autoscaler's wake, so the router's ``--autoscaler-url``
                   can point at the planner: from zero replicas no request finishes, the
                   request-size window stays empty, and without a wake nothing would
                   ever scale the fleet up again.

The router's placement-aware ``slo`` strategy (``--placement-url``) polls ``/v1/plan``.
Listens on loopback by default. The authentication is every control daemon's
(``control.http.require_token``): with a token (``--auth-token-file``) every route but
``/metrics`` needs ``Authorization: Bearer TOKEN`` (401 otherwise,
compared in constant time); beyond loopback a token is required unless
``--insecure-no-auth`` (``PlacementSettings``). A wake starts engines, and the plan tells
anyone who reads it the fleet's shape and traffic mix: neither is for the open network.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.autoscale.errors import ActuatorError
from control.autoscale.server import MAX_BODY_BYTES
from control.http import require_token, start_site
from control.placement.errors import WrongModel
from control.placement.planner import Planner

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


async def _wake(request: web.Request) -> web.Response:
    model = ""
    if request.can_read_body:
        try:
            body = json.loads((await request.read()).decode() or "{}")
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            return web.json_response({"error": 'body must be JSON: {"model": ...}'}, status=400)
        if isinstance(body, dict):
            model = str(body.get("model", ""))
    try:
        targets = await request.app[_PLANNER].wake(model)
    except WrongModel as exc:
        log.debug("wake refused: %s", exc)
        return web.json_response({"error": str(exc)}, status=404)
    except ActuatorError as exc:
        log.warning("wake failed: %s", exc)
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response({"targets": targets}, status=202)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_PLANNER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def make_app(planner: Planner, token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[require_token(token)] if token else [], client_max_size=MAX_BODY_BYTES
    )
    app[_PLANNER] = planner
    app.router.add_get("/v1/plan", _plan)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/wake", _wake)
    return app


async def start_server(
    planner: Planner, host: str, port: int, token: str | None = None
) -> web.AppRunner:
    """Listen on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if it cannot."""
    runner = await start_site(make_app(planner, token), host, port)
    log.info(
        "placement endpoint on http://%s:%d (/v1/plan, /status, /metrics, /v1/wake)", host, port
    )
    return runner
