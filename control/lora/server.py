"""The LoRA manager's HTTP endpoint: metrics, status, the adapter API and wakes.

::

    GET    /metrics                   shoal_lora_* (Prometheus text; open, as the router's)
    GET    /status                    engines, adapters, failures, the last rounds (JSON)
    GET    /v1/adapters               {"adapters": [{name, base_model, source, path,
                                      engines, pinned, rate, idle_s}, ...]}
    POST   /v1/adapters               {"name", "base_model", "source"} -> 201 {adapter};
                                      400 bad name/body, 409 registered otherwise, 422
                                      missing or corrupt adapter files, 502 the source
                                      failed
    DELETE /v1/adapters/NAME          unload everywhere, forget -> 200 {"engines": [...]};
                                      502 when an engine could not unload it (it stays
                                      registered; the error names the engines)
    POST   /v1/adapters/NAME/load     {"engine"?} -> 200 {"engines": [...]} (pinned there)
    POST   /v1/adapters/NAME/unload   {"engine"?} -> 200 {"engines": [...]} (unpinned)
    POST   /v1/wake                   {"model": NAME} -> 202 {"engines": [...]} once the
                                      load is done or at most ``wake_wait_s`` (1 s) after
                                      it began (the engines it goes to); 404 {"error"}
                                      when NAME is not a registered adapter

Errors are ``{"error": message}``: 404 unknown adapter, 503 no engine can take it, 502 the
engine refused or did not answer, 413 over 64 KiB, 400 a body that is not a JSON object,
500 a bug (logged with its traceback; still JSON).

Listens on loopback by default: the API loads adapters into engines. With a token
(``--auth-token-file``) every route but ``/metrics`` needs ``Authorization: Bearer
TOKEN`` (401 otherwise, compared in constant time); beyond loopback a token is required
unless ``--insecure-no-auth`` (``LoraSettings``), exactly as the autoscaler's endpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.http import require_token, start_site
from control.lora.errors import (
    AdapterConflict,
    AdapterCorrupt,
    AdapterFilesMissing,
    AdapterNotFound,
    AdapterSourceError,
    EngineError,
    LoraConfigError,
    LoraError,
    NoEngine,
    StateFileError,
)
from control.lora.manager import LoraManager

__all__ = ["make_app", "start_server"]

log = logging.getLogger("shoal." + __name__)

MAX_BODY_BYTES = 64 << 10

_MANAGER = web.AppKey("manager", LoraManager)

# most specific first: the first isinstance match answers
_STATUS: tuple[tuple[type[LoraError], int], ...] = (
    (AdapterNotFound, 404),
    (AdapterConflict, 409),
    (LoraConfigError, 400),
    (AdapterFilesMissing, 422),
    (AdapterCorrupt, 422),
    (AdapterSourceError, 502),
    (NoEngine, 503),
    (EngineError, 502),
    (StateFileError, 500),
)


def _error(message: str, status: int) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _answer(exc: LoraError) -> web.Response:
    status = next((code for kind, code in _STATUS if isinstance(exc, kind)), 500)
    if status >= 500:
        log.warning("%s", exc)
    return _error(str(exc), status)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = json.loads((await request.read()).decode() or "{}")
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        ) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "body must be a JSON object"}),
            content_type="application/json",
        )
    return body


def _text(body: dict[str, Any], key: str) -> str:
    value = body.get(key, "")
    return value if isinstance(value, str) else ""


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[_MANAGER].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(request.app[_MANAGER].status())


async def _list(request: web.Request) -> web.Response:
    return web.json_response({"adapters": request.app[_MANAGER].adapters_json()})


async def _register(request: web.Request) -> web.Response:
    body = await _body(request)
    manager = request.app[_MANAGER]
    try:
        spec = await manager.register(
            _text(body, "name"), _text(body, "base_model"), _text(body, "source")
        )
    except LoraError as exc:
        return _answer(exc)
    return web.json_response(spec.to_json(), status=201)


async def _remove(request: web.Request) -> web.Response:
    try:
        engines = await request.app[_MANAGER].remove(request.match_info["name"])
    except LoraError as exc:
        return _answer(exc)
    return web.json_response({"engines": engines})


async def _load(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        engines = await request.app[_MANAGER].load(
            request.match_info["name"], _text(body, "engine").rstrip("/") or None
        )
    except LoraError as exc:
        return _answer(exc)
    return web.json_response({"engines": engines})


async def _unload(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        engines = await request.app[_MANAGER].unload(
            request.match_info["name"], _text(body, "engine").rstrip("/") or None
        )
    except LoraError as exc:
        return _answer(exc)
    return web.json_response({"engines": engines})


async def _wake(request: web.Request) -> web.Response:
    body = await _body(request)
    try:
        engines = await request.app[_MANAGER].wake(_text(body, "model"))
    except LoraError as exc:
        return _answer(exc)
    return web.json_response({"engines": engines}, status=202)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _json_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """A bug answers a JSON 500 (and is logged with its traceback), as every error here."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:  # a bug: logged, answered; the server goes on
        log.exception("%s %s failed", request.method, request.path)
        return _error(f"internal error: {type(exc).__name__}: {exc}", 500)


def make_app(manager: LoraManager, token: str | None = None) -> web.Application:
    middlewares = [_json_errors, *([require_token(token)] if token else [])]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[_MANAGER] = manager
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/status", _status)
    app.router.add_get("/v1/adapters", _list)
    app.router.add_post("/v1/adapters", _register)
    app.router.add_delete("/v1/adapters/{name}", _remove)
    app.router.add_post("/v1/adapters/{name}/load", _load)
    app.router.add_post("/v1/adapters/{name}/unload", _unload)
    app.router.add_post("/v1/wake", _wake)
    return app


async def start_server(
    manager: LoraManager, host: str, port: int, token: str | None = None
) -> web.AppRunner:
    """Listen on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if it cannot."""
    runner = await start_site(make_app(manager, token), host, port)
    log.info("LoRA manager on http://%s:%d (/metrics, /status, /v1/adapters, /v1/wake)",
             host, port)  # fmt: skip
    return runner


def build_manager(settings: Any) -> LoraManager:
    """A manager wired from ``LoraSettings``: the router's discovery, vLLM's HTTP API, the
    router's traffic, the registry at ``--state-file``. ``ConfigError`` on bad settings."""
    from control.lora.engines import HttpEngineApi
    from control.lora.registry import Registry
    from control.lora.traffic import RouterTraffic
    from router.discovery import make_discovery

    discovery = make_discovery(
        settings.discovery,
        engines=settings.engines,
        discovery_file=settings.discovery_file,
        interval_s=settings.discovery_interval_s,
    )
    registry = Registry(settings.adapter_path, settings.state_path)
    return LoraManager(
        registry,
        discovery,
        HttpEngineApi(timeout_s=settings.engine_timeout_s, poll_timeout_s=settings.poll_timeout_s),
        RouterTraffic(settings.router_url, window_s=settings.rate_window_s)
        if settings.router_url
        else None,
        interval_s=settings.interval_s,
        idle_unload_s=settings.idle_unload_s,
        budget=settings.budget,
        replica_rate=settings.replica_rate,
        hysteresis=settings.hysteresis,
        balance=settings.balance,
        rate_window_s=settings.rate_window_s,
        max_concurrency=settings.max_concurrency,
        retry_base_s=settings.retry_base_s,
        retry_max_s=settings.retry_max_s,
    )


async def _serve(settings: Any) -> int:
    import asyncio
    import signal

    from control.lora.config import read_token

    token = read_token(settings.auth_token_file) if settings.auth_token_file else None
    manager = build_manager(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None
    try:
        runner = await start_server(manager, settings.host, settings.port, token)
        log.info("LoRA manager running: %d adapter(s) registered, a round every %.1f s",
                 len(manager.registry.adapters), settings.interval_s)  # fmt: skip
        await manager.run(stop)
    finally:
        log.info("LoRA manager stopping")
        if runner is not None:
            await runner.cleanup()
        await manager.close()
    return 0


def serve(settings: Any) -> int:
    """Run the manager until SIGTERM/SIGINT; the exit code (0 on a clean stop)."""
    import asyncio

    return asyncio.run(_serve(settings))
