"""What every control daemon's HTTP endpoint shares: the bearer-token check and listening.

Invariant: with a token, every path except the open ones (``/metrics`` for Prometheus,
``/healthz`` for probes) answers 401 unless ``Authorization: Bearer TOKEN`` matches,
compared in constant time (``hmac.compare_digest``); a port that cannot be bound is a
``ConfigError`` naming the address, never a traceback.

Used by the autoscaler's, the placement planner's, the LoRA manager's and ``shoal engines
serve``'s endpoints (one copy, not four).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

from shoal.errors import ConfigError

__all__ = ["OPEN_PATHS", "require_token", "start_site"]

log = logging.getLogger("shoal." + __name__)

OPEN_PATHS = frozenset({"/metrics", "/healthz"})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def require_token(token: str, open_paths: Collection[str] = OPEN_PATHS) -> Middleware:
    """A middleware answering 401 (JSON ``{"error"}``) without the right bearer token."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if request.path not in open_paths:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "missing or wrong bearer token (Authorization: Bearer TOKEN)"},
                    status=401,
                )
        return await handler(request)

    return check


async def start_site(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port``; the runner to ``cleanup()``. ``ConfigError`` if the
    address cannot be bound."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return runner
