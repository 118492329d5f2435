"""The controller's HTTP endpoint: ``GET /metrics``, ``GET /status``, ``POST /v1/wake``.

::

    GET  /metrics    shoal_autoscale_* (Prometheus text)
    GET  /status     {"target", "policy", "replicas": {spec, ready, pending}, "decisions": [...]}
    POST /v1/wake    {"model": "M"} -> 202 {"desired": n}; 503 when the target cannot be scaled

The router (``--autoscaler-url``) posts a wake when it starts holding a request for a model
with no engine; the controller scales from zero at once (``Controller.wake``). Listens on
loopback by default: a wake can start engines, so it is not for the open network.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.autoscale.controller import Controller
from control.autoscale.errors import ActuatorError
from shoal.errors import ConfigError

__all__ = ["make_app", "start_server"]

log = logging.getLogger("shoal." + __name__)

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
            body = json.loads(await request.content.read(65536) or b"{}")
        except json.JSONDecodeError:
            return web.json_response({"error": 'body must be JSON: {"model": ...}'}, status=400)
        if isinstance(body, dict):
            model = str(body.get("model", ""))
    try:
        desired = await request.app[_CONTROLLER].wake(model)
    except ActuatorError as exc:
        log.warning("wake failed: %s", exc)
        return web.json_response({"error": str(exc)}, status=503)
    return web.json_response({"desired": desired}, status=202)


def make_app(controller: Controller) -> web.Application:
    app = web.Application()
    app[_CONTROLLER] = controller
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", _status)
    app.router.add_post("/v1/wake", _wake)
    return app


async def start_server(controller: Controller, host: str, port: int) -> web.AppRunner:
    """Listen on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if it cannot."""
    runner = web.AppRunner(make_app(controller), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    log.info("autoscaler endpoint on http://%s:%d (/metrics, /status, /v1/wake)", host, port)
    return runner
