"""The controller's HTTP endpoint: ``GET /metrics``, ``GET /status``, ``POST /v1/wake``.

::

    GET  /metrics    shoal_autoscale_* (Prometheus text)
    GET  /status     {"target", "policy", "replicas": {spec, ready, pending}, "decisions": [...]}
    POST /v1/wake    {"model": "M"} -> 202 {"desired": n}; 503 when the target cannot be scaled;
                     404 {"error": "this controller scales model M..."} for another model
                     (with --model; the target is not touched); 400 for a body that is not
                     UTF-8 JSON; 413 over 64 KiB

The router (``--autoscaler-url``) posts a wake when it starts holding a request for a model
with no engine; the controller scales from zero at once (``Controller.wake``). Listens on
loopback by default: a wake can start engines, so it is not for the open network. With a
token (``--auth-token-file``) ``/v1/wake`` and ``/status`` need ``Authorization: Bearer
TOKEN`` (401 otherwise, compared in constant time); ``/metrics`` stays open for Prometheus,
as the router's does. Beyond loopback a token is required unless ``--insecure-no-auth``
(``AutoscaleSettings``).
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.autoscale.controller import Controller
from control.autoscale.errors import ActuatorError, WrongModel
from control.http import require_token, start_site

__all__ = ["make_app", "start_server"]

log = logging.getLogger("shoal." + __name__)

MAX_BODY_BYTES = 64 << 10  # a wake body is {"model": ...}; larger ones get 413

_CONTROLLER = web.AppKey("controller", Controller)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_CONTROLLER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[_CONTROLLER].status())


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
        desired = await request.app[_CONTROLLER].wake(model)
    except WrongModel as exc:
        log.debug("wake refused: %s", exc)
        return web.json_response({"error": str(exc)}, status=404)
    except ActuatorError as exc:
        log.warning("wake failed: %s", exc)
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response({"desired": desired}, status=202)


def make_app(controller: Controller, token: str | None = None) -> web.Application:
    app = web.Application(
        middlewares=[require_token(token)] if token else [], client_max_size=MAX_BODY_BYTES
    )
    app[_CONTROLLER] = controller
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", _status)
    app.router.add_post("/v1/wake", _wake)
    return app


async def start_server(
    controller: Controller, host: str, port: int, token: str | None = None
) -> web.AppRunner:
    """Listen on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if it cannot."""
    runner = await start_site(make_app(controller, token), host, port)
    log.info("autoscaler endpoint on http://%s:%d (/metrics, /status, /v1/wake)", host, port)
    return runner
