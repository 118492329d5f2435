"""The router's HTTP face: OpenAI routes in, the chosen engine's bytes out.

::

    POST /v1/completions, /v1/chat/completions, /v1/embeddings
        read the body (bounded) -> RouteRequest (parsed once) -> limits -> pipeline
        -> send the client's bytes unchanged to the engine -> stream its answer back
    GET  /v1/models      union over healthy engines (base models and LoRA adapters)
    GET  /health         200 when at least one engine is healthy, or when requests are held
                         for a first engine (scale from zero), else 503
    GET  /metrics        shoal_router_* (this process)
    GET  /router/engines per engine: url, stream, gpu type, health, breaker, in flight,
                         metrics age; and the placement plan's state (router/plan.py)
    GET  /v1/request_sizes?model=&window_s=   the rolling (prompt, completion) token
                         histogram of finished requests (router/sizes.py; the placement
                         planner's input, issue 14)

The last three are the admin routes (``ADMIN_PATHS``): not the OpenAI API, and served
without an API key, since Prometheus, the autoscaler and the placement planner read them.
With ``--admin-port`` they leave the main port (404 there) for ``admin_app()``, a second
listener (router/server.py) that a load balancer never exposes; beyond loopback it
requires ``--admin-token-file``'s bearer token on every route but ``/metrics``, which stays
open like every control daemon's (control/http.py): ``/router/engines`` names the engines'
addresses and ``/v1/request_sizes`` the traffic's shape, while metrics are scraped by
Prometheus without credentials. Without ``--admin-port`` nothing changes (the main port
serves them, as before the split).

Invariants:

1. **No buffering.** The answer is copied chunk by chunk as it arrives
   (``iter_any`` -> ``StreamResponse.write``), SSE or not; the body is never re-encoded.
2. **Retries only before the first byte.** An attempt that fails before the response's
   headers were sent to the client (connection refused or reset, silence past
   ``upstream_timeout_s``, a 5xx from the engine) counts against the engine's breaker and
   moves to another engine that this request has not tried, at most ``max_retries`` times;
   the last attempt's 5xx is passed through. After the first byte, an engine that dies
   ends the client's stream with an SSE error event (``data: {"error": ...}``), never a
   hang.
3. **Cancellation goes upstream.** aiohttp cancels the handler when the client hangs up
   (``handler_cancellation=True``); the ``finally`` closes the upstream response, which
   drops its connection, so the engine aborts the request.
4. **The ledger balances.** Every attempt's ``acquire`` has one ``release`` in a
   ``finally``, cancellation included.

5. **Held, not refused, while no engine exists** (scale from zero, issue 13). When no
   healthy engine serves a request's model and engines can appear (dynamic discovery or
   ``--autoscaler-url``: ``RouterSettings.holds``), the request waits in
   ``router.hold.HoldQueue`` (bounded: ``--hold-max-requests``, ``--hold-timeout-s``) and
   is routed normally once a health check finds an engine (``EnginePool.on_health_change``
   wakes its model's waiters, first-come first-served); a full queue or the deadline is a
   503 with Retry-After, a client that hangs up is dropped from the queue. With
   ``--lora-url`` a request for a model that healthy engines do not list is held the
   same way while the LoRA manager loads it (``router.adapters``: 404 at once when the
   manager does not know the name). While anything
   is held, the autoscaler is asked for an engine (``router.wake``: ``POST URL/v1/wake``,
   at most once a second per model; a failure is logged, never the request's). A saturated
   fleet, or one whose engines' breakers are open, is not held: 429/503 at once.

Errors are OpenAI-style JSON, ``{"error": {"message", "type", "code"}}`` with the HTTP
status as ``code`` (vLLM's shape); 429/503 carry ``Retry-After``. Every proxied response
carries ``x-shoal-engine: <engine url>``.

HTTP stack, measured before choosing (issue 12). aiohttp 3.14 server and one shared
``ClientSession`` (keep-alive pool, no connection limit) on uvloop, per process. Setup: an
aiohttp server answering a fixed completion at once stands in for the engine; the client
sends 16 KiB prompts; router pinned to core 0, client and engine to core 1 of a 2-core
machine shared with other jobs (load average 5-7 during the runs, so absolute figures are
pessimistic and noisy; best of 2-3 rounds)::

                          concurrency 1            concurrency 64 (closed loop)
                          p50      p99     req/s    p50      p99      req/s
    direct to the engine  0.24 ms  0.53 ms  3,700   6.9 ms   31 ms    6,500
    minimal aiohttp proxy 0.57 ms  4.5 ms   1,130   25 ms    51 ms    2,200
    asyncio-streams proxy 0.48 ms  4.4 ms   1,660   18 ms    42 ms    3,000
    this router           0.68 ms  2.6 ms   1,300   27 ms    59 ms    2,100

    router time before the upstream request is sent (shoal_router_added_latency_seconds):
    mean 0.08-0.12 ms with least-request, 92% under 0.1 ms, 99% under 1 ms; 0.15 ms
    with the default ``shoal`` strategy (approximate prefix index of the 16 KiB prompt),
    whose req/s at concurrency 64 matched least-request's within the noise (2,400-2,900)

So the router adds ~0.44 ms at p50 per request (concurrency 1) over a direct call, of which
its own work (parse the 16 KiB body once, limits, routing, ledger) is ~0.1 ms and the rest
is the HTTP stack; at concurrency 64 a closed loop measures throughput (64 / req/s), and the
router keeps up with a minimal aiohttp proxy (~2,100 req/s on a contended core). Compared
and not taken: a hand-written HTTP/1.1 upstream client on asyncio streams (the third row, a
Content-Length-only prototype: ~1.4x the requests per second of aiohttp's client, but it
would need its own chunked/SSE framing, timeouts, keep-alive and error mapping; the next
step if the overhead targets are missed); uvicorn/httptools (not in the project's
dependencies). Rust anchors' figures on the same core are the benchmark's (bench/router.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from control.http import require_token
from router.adapters import OnDemandAdapters
from router.config import RouterSettings
from router.engines import EnginePool
from router.errors import (
    BadRequest,
    ModelNotFound,
    NoEngineAvailable,
    RateLimited,
    RouterError,
    Unauthorized,
    UpstreamError,
)
from router.hold import HoldQueue
from router.ledger import InMemoryLedger, Ledger
from router.limits import Limiter
from router.metrics import BREAKER_VALUES, RouterMetrics, RouterState
from router.pipeline import Pipeline
from router.plan import NullPlanSource, PlanSource
from router.requests import ROUTES, check_headers, parse_body, to_route_request
from router.sizes import DEFAULT_WINDOW_S, RequestSizes, ResponseTokens
from router.types import EngineView, RouteDecision, RouteOutcome, RouteRequest
from router.wake import AutoscalerWaker, NullWaker, Waker, read_token

__all__ = ["ADMIN_PATHS", "ENGINE_HEADER", "Proxy", "error_body"]

log = logging.getLogger("shoal." + __name__)

ENGINE_HEADER = "x-shoal-engine"
ADMIN_PATHS = frozenset({"/metrics", "/router/engines", "/v1/request_sizes"})
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_NOT_BACK = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "server"})


class _AttemptFailed(UpstreamError):
    """An attempt failed before the first byte; ``kind`` labels the metrics."""

    def __init__(self, message: str, *, engine_id: str, kind: str) -> None:
        super().__init__(message, engine_id=engine_id)
        self.kind = kind


def error_body(message: str, type_: str, status: int) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": status}}).encode()


def _error_response(exc: RouterError, headers: Mapping[str, str] | None = None) -> web.Response:
    extra = dict(headers or {})
    if exc.retry_after_s is not None:
        extra["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return web.Response(
        status=exc.status,
        body=error_body(str(exc), exc.code, exc.status),
        content_type="application/json",
        headers=extra,
    )


def _serves(view: EngineView, model: str) -> bool:
    """The pipeline's model filter: an engine whose models are not known yet serves any."""
    return not model or not view.models or model in view.models


def _sse_error(message: str) -> bytes:
    event = error_body(message, "upstream_error", 502)
    return b"data: " + event + b"\n\ndata: [DONE]\n\n"


class Proxy:
    """The aiohttp application of one router process."""

    def __init__(
        self,
        settings: RouterSettings,
        pool: EnginePool,
        pipeline: Pipeline,
        ledger: Ledger,
        limiter: Limiter,
        *,
        metrics: RouterMetrics | None = None,
        api_keys: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_cleanup: Callable[[], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.pipeline = pipeline
        self.ledger = ledger
        self.limiter = limiter
        self.metrics = metrics or RouterMetrics()
        self._api_keys = dict(api_keys or {})
        self._clock = clock
        self._extra_cleanup = on_cleanup
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count()
        self._id_prefix = f"shoal-{os.getpid():x}-"
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s,
            sock_read=settings.upstream_timeout_s,
        )  # fmt: skip
        self.pool.on_breaker_change = self._breaker_changed
        self.pool.on_health_change = self._health_changed
        self.hold = HoldQueue(
            max_requests=settings.hold_max_requests,
            timeout_s=settings.hold_timeout_s,
            retry_after_s=settings.retry_after_s,
            clock=clock,
        )
        self._holds = settings.holds
        self.sizes = RequestSizes(clock=clock)  # GET /v1/request_sizes (the planner's input)
        self.waker: Waker = NullWaker()
        if self._holds and settings.autoscaler_url:  # at most one wake a second per model
            token = read_token(settings.autoscaler_token_file) if (
                settings.autoscaler_token_file) else ""  # fmt: skip
            self.waker = AutoscalerWaker(settings.autoscaler_url, self.hold.held_models,
                                         token=token, clock=clock)  # fmt: skip
        # --lora-url: requests for a model no engine lists wait while the manager loads it
        self.adapters: OnDemandAdapters | None = None
        if settings.holds_adapters:
            token = read_token(settings.lora_token_file, "--lora-token-file") if (
                settings.lora_token_file) else ""  # fmt: skip
            self.adapters = OnDemandAdapters(self.pool, self.hold, settings.lora_url,
                                             token=token, clock=clock)  # fmt: skip
        # router.discovery's source when not static (``engines()``, ``close()``; closed
        # by ``on_cleanup``): its list is copied into the pool every discovery interval
        self.discovery: Any = None
        # the placement planner's plan (router/plan.py; --placement-url), read by the slo
        # strategy through StrategyDeps.placement; polled between startup and cleanup
        self.placement: PlanSource = NullPlanSource()
        self._follower: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self.metrics.watch(self._state)

    # ---- application ------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        for path in ROUTES:
            app.router.add_post(path, self._proxy)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        if not self.settings.admin_port:  # else on admin_app()'s listener only
            self._add_admin_routes(app)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    def admin_app(self, token: str = "") -> web.Application:
        """The admin routes (``ADMIN_PATHS``) for ``--admin-port``; with ``token`` every one
        but ``/metrics`` requires ``Authorization: Bearer TOKEN``. It shares the proxy's
        state and has no startup or cleanup of its own: ``app()``'s runner owns those."""
        app = web.Application(middlewares=[require_token(token)] if token else [])
        self._add_admin_routes(app)
        return app

    def _add_admin_routes(self, app: web.Application) -> None:
        handlers = {
            "/metrics": self._metrics,
            "/router/engines": self._engines,
            "/v1/request_sizes": self._request_sizes,
        }
        assert set(handlers) == ADMIN_PATHS
        for path, handler in handlers.items():
            app.router.add_get(path, handler)

    async def _startup(self, app: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True)
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",)
        )
        await self.pool.start(self._session)
        if self.discovery is not None:
            self._follower = asyncio.create_task(self._follow_discovery())
        if not isinstance(self.ledger, InMemoryLedger):  # other replicas' counts
            self._refresher = asyncio.create_task(self._refresh_ledger())
        self.waker.start(self._session)
        self.placement.start(self._session)
        if self.adapters is not None:
            self.adapters.start(self._session)

    async def _follow_discovery(self) -> None:
        """Discovery's list into the pool; a source never raises after construction (a
        failed read keeps its last list), so this loop only sleeps and copies."""
        while True:
            await asyncio.sleep(self.settings.discovery_interval_s)
            before = set(self.pool.engine_ids)
            self.pool.set_engines(await self.discovery.engines())
            joined = [e for e in self.pool.engine_ids if e not in before]
            if joined and self.hold.num_held():  # held requests need not wait a health round
                await asyncio.gather(*(self.pool.check_health(e) for e in joined))

    async def _refresh_ledger(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ledger_refresh_s)
            try:
                await self.ledger.refresh()
            except RouterError as exc:  # the shared ledger degrades to this replica's view
                log.warning("ledger refresh failed: %s", exc)

    async def _cleanup(self, app: web.Application) -> None:
        await self.waker.close()
        await self.placement.close()
        if self.adapters is not None:
            await self.adapters.close()
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        await self.pool.close()
        if self._session is not None:
            await self._session.close()
        await self.ledger.close()
        await self.limiter.close()
        if self._extra_cleanup is not None:
            await self._extra_cleanup()

    def _breaker_changed(self, engine_id: str, state: Any) -> None:
        self.metrics.breaker.labels(engine_id).set(BREAKER_VALUES[state.value])

    # ---- holding while no engine serves a model (scale from zero) ------------------------

    def _may_hold(self, model: str) -> bool:
        """Hold a request the pipeline found no engine for only when no healthy engine
        serves its model (none exists, or all are starting): engines with open breakers
        or a saturated fleet answer at once."""
        if not self._holds:
            return False
        return not any(
            self.pool.is_healthy(view.engine_id) and _serves(view, model)
            for view in self.pool.views({})
        )

    def _routable(self, model: str) -> bool:
        """Whether the pipeline would now find an engine for ``model`` (or answer 404
        because healthy engines serve only other models): its candidate filter."""
        views = self.pool.views({})
        serving = [view for view in views if _serves(view, model)] or views
        return any(self.pool.allows(view.engine_id) for view in serving)

    def _health_changed(self, engine_id: str, healthy: bool) -> None:
        if not healthy or not self.hold.num_held():
            return
        for model in self.hold.held_models():
            if self._routable(model):
                woken = self.hold.wake(model)
                log.info("engine %s is up: %d request(s) held for %s go on", engine_id,
                         len(woken), model or "any model")  # fmt: skip

    async def _route(
        self, route_request: RouteRequest, strategy: str, tried: set[str]
    ) -> RouteDecision:
        """The pipeline's decision; while no engine serves the model, held first (the
        whole wait, however it ends, is one ``held_seconds`` observation)."""
        held_since: float | None = None
        try:
            while True:
                try:
                    return await self.pipeline.route(
                        route_request,
                        self.pool.views(self.ledger.snapshot()),
                        self.pool.allows,
                        strategy=strategy,
                        exclude=tried,
                    )
                except NoEngineAvailable:
                    if tried or not self._may_hold(route_request.model):
                        raise
                except ModelNotFound:  # healthy engines list other models only
                    if tried or self.adapters is None:
                        raise
                    if not self.adapters.may_hold(route_request.model):
                        raise  # the LoRA manager said 404 within the last second
                    self.adapters.held()  # ask the manager, watch the engines' lists
                if held_since is None:
                    held_since = self._clock()
                    self.waker.notify()
                # a re-hold (woken, but the engine went away again) keeps the first deadline
                deadline = held_since + self.hold.timeout_s
                await self.hold.hold(route_request.model, deadline=deadline)
        finally:
            if held_since is not None:
                self.metrics.held_seconds.observe(self._clock() - held_since)

    # ---- small routes -----------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self.pool.model_cards()})

    async def _health(self, request: web.Request) -> web.Response:
        healthy = self.pool.num_healthy()
        status = 200 if healthy or self._holds else 503
        if healthy:
            text = "ok"
        elif self._holds:  # scale from zero: requests wait here for a first engine
            text = "no healthy engine yet; requests are held for one"
        else:
            text = "no healthy engine"
        return web.json_response(
            {
                "status": text,
                "healthy_engines": healthy,
                "held_requests": self.hold.num_held(),  # waiting for a first engine
                "pid": os.getpid(),  # which worker answered (--workers N)
            },
            status=status,
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        for engine_id in self.pool.engine_ids:
            state = self.pool.breaker_state(engine_id)
            self.metrics.breaker.labels(engine_id).set(BREAKER_VALUES[state.value])
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    def _state(self) -> RouterState:
        shared = {
            part: stats()
            for part, component in (("ledger", self.ledger), ("limiter", self.limiter))
            if (stats := getattr(component, "statistics", None)) is not None  # Redis ones
        }
        locator_stats = getattr(self.pipeline.locator, "statistics", None)
        served = [str(card.get("id", "")) for card in self.pool.model_cards()]
        self.metrics.serve_models(served)
        held = dict.fromkeys(self.metrics.models.served, 0)
        for model, count in self.hold.statistics().held.items():
            label = self.metrics.models.label(model)
            held[label] = held.get(label, 0) + count
        return RouterState(
            fresh={e: self.pool.scraper.metrics(e) is not None for e in self.pool.engine_ids},
            shared=shared,
            locator=locator_stats() if locator_stats is not None else None,
            held=held,
        )

    async def _engines(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "engines": self.pool.status(self.ledger.snapshot()),
                "placement": self.placement.status(),  # null without --placement-url
            }
        )

    async def _request_sizes(self, request: web.Request) -> web.Response:
        """The rolling size histogram (router/sizes.py): ``?model=M`` (absent: all models)
        ``&window_s=W`` (default 300). An admin route, like ``/router/engines`` and
        ``/metrics``: no API key (``--admin-port`` moves it to the admin listener)."""
        text = request.query.get("window_s", "")
        try:
            window_s = float(text) if text else DEFAULT_WINDOW_S
        except ValueError:
            return _error_response(
                BadRequest(f"window_s must be a number of seconds, got {text!r}")
            )
        model = request.query.get("model") or None
        try:  # a model beyond the label bound was recorded as "other" (router/metrics.py)
            snapshot = self.sizes.snapshot(model, window_s)
        except BadRequest as exc:
            return _error_response(exc)
        return web.json_response(snapshot.to_json())

    def _record_size(
        self, route_request: RouteRequest, prompt: int | None, completion: int
    ) -> None:
        """One finished request into the size histogram and its Prometheus histograms: the
        engine's prompt count when it sent usage, else the router's."""
        prompt_tokens = route_request.prompt_tokens if prompt is None else prompt
        label = self.metrics.models.label(route_request.model)
        self.sizes.record(label, prompt_tokens, completion)
        self.metrics.observe_sizes(label, prompt_tokens, completion)

    # ---- the proxied routes -----------------------------------------------------------

    def _user_of(self, request: web.Request) -> str:
        """The request's user. With an API key map every proxied request must carry a
        known key (``Authorization: Bearer KEY``) and the key's user is the user: neither
        ``x-user`` nor the body's ``user`` can then claim another user's limits."""
        if not self._api_keys:
            return request.headers.get("x-user", "")
        auth = request.headers.get("Authorization", "")
        user = self._api_keys.get(auth[7:].strip(), "") if auth[:7].lower() == "bearer " else ""
        if not user:
            raise Unauthorized("a known API key is required: Authorization: Bearer KEY")
        return user

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise BadRequest(f"request body is {length} bytes; the limit is {limit}", status=413)
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(
                f"request body is over the limit of {limit} bytes", status=413
            ) from None

    async def _proxy(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        route = ROUTES[request.path]
        try:
            check_headers(request.headers, self.settings.max_header_bytes)
            body = await self._read_body(request)
            route_request = to_route_request(
                route,
                parse_body(body),
                request_id=request.headers.get("x-request-id")
                or self._id_prefix + str(next(self._ids)),
                user=self._user_of(request),
                session_id=request.headers.get(self.settings.session_header, ""),
                arrival_s=self._clock(),
            )
            # the size window's demand (router/sizes.py): counted before admission, so
            # refused, held and failed requests are in it
            self.sizes.record_arrival(self.metrics.count_arrival(route_request.model))
            wait = await self.limiter.admit(
                route_request.user,
                route_request.model,
                route_request.prompt_tokens + route_request.max_tokens,
            )
            if wait is not None:
                raise RateLimited(
                    f"rate limit of user {route_request.user!r} or model "
                    f"{route_request.model!r} reached",
                    retry_after_s=wait,
                )
            response = await self._forward(request, route_request, body, started)
        except RouterError as exc:
            if exc.status in (429, 503):
                self.metrics.rejected.labels(exc.code).inc()
            self.metrics.count_request(route, exc.status)
            return _error_response(exc)
        self.metrics.count_request(route, response.status)
        return response

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}

    async def _forward(
        self, request: web.Request, route_request: RouteRequest, body: bytes, started: float
    ) -> web.StreamResponse:
        strategy = self.pipeline.choose_text(request.headers)
        headers = self._upstream_headers(request)
        tried: set[str] = set()
        attempts = self.settings.max_retries + 1
        last_error: UpstreamError | None = None
        for attempt in range(attempts):
            try:
                decision = await self._route(route_request, strategy, tried)
            except NoEngineAvailable:
                if last_error is not None:  # every engine left was tried: say why
                    raise last_error from None
                raise
            self.metrics.count_decision(decision.strategy, decision.reason)
            try:
                return await self._attempt(
                    request,
                    route_request,
                    body,
                    headers,
                    decision,
                    started if attempt == 0 else None,
                    last=attempt == attempts - 1,
                )
            except UpstreamError as exc:
                tried.add(exc.engine_id)
                last_error = exc
                if not exc.retryable or attempt == attempts - 1:
                    raise
                kind = exc.kind if isinstance(exc, _AttemptFailed) else exc.code
                self.metrics.retries.labels(kind).inc()
                log.info("retrying %s after %s", route_request.request_id, exc)
        assert last_error is not None, "the attempt loop returns or raises"
        raise last_error

    async def _died_mid_response(
        self,
        request: web.Request,
        response: web.StreamResponse,
        route_request: RouteRequest,
        engine_id: str,
        exc: Exception,
    ) -> None:
        """The engine failed after the client got the first byte: no retry is possible, so
        end the client's answer in a way it notices."""
        self.pool.record_failure(engine_id)
        self.metrics.upstream_errors.labels(engine_id, "mid-stream").inc()
        log.warning("engine %s failed mid-response: %r", engine_id, exc)
        if route_request.stream:
            with contextlib.suppress(ConnectionResetError):
                await response.write(_sse_error(f"engine {engine_id} failed: {exc!r}"))
                await response.write_eof()
        elif request.transport is not None:  # a truncated JSON body: the client must see
            request.transport.close()  # the connection drop

    def _failure(self, engine_id: str, kind: str, detail: str) -> UpstreamError:
        self.pool.record_failure(engine_id)
        self.metrics.upstream_errors.labels(engine_id, kind).inc()
        return _AttemptFailed(f"engine {engine_id}: {kind}: {detail}", engine_id=engine_id,
                              kind=kind)  # fmt: skip

    async def _attempt(
        self,
        request: web.Request,
        route_request: RouteRequest,
        body: bytes,
        headers: dict[str, str],
        decision: RouteDecision,
        started: float | None,
        *,
        last: bool,
    ) -> web.StreamResponse:
        assert self._session is not None, "the proxy serves only between startup and cleanup"
        engine_id = decision.engine_id
        # the ledger queues prefill: a prefix the engine is expected to reuse is not queued
        # (both counts from the decision: exact when the precise path tokenized the prompt)
        prompt_tokens = decision.prompt_tokens or route_request.prompt_tokens
        pending = max(0, prompt_tokens - decision.cached_tokens)
        self.pool.on_attempt(engine_id)
        await self.ledger.acquire(engine_id, pending)
        gauge = self.metrics.engine_in_flight(engine_id)
        gauge.inc()
        model_gauge = self.metrics.in_flight_of(self.metrics.models.label(route_request.model))
        model_gauge.inc()
        sent_at = self._clock()
        ttft: float | None = None
        completion_tokens = 0
        ok = False
        try:
            if started is not None:
                self.metrics.added_latency.observe(time.perf_counter() - started)
            try:
                upstream = await self._session.post(
                    engine_id + request.path, data=body, headers=headers, timeout=self._timeout
                )
            except aiohttp.ClientConnectorError as exc:
                raise self._failure(engine_id, "refused", str(exc)) from None
            except TimeoutError:
                raise self._failure(engine_id, "timeout", "no answer in time") from None
            except aiohttp.ClientError as exc:
                raise self._failure(engine_id, "reset", repr(exc)) from None
            try:
                if upstream.status >= 500:
                    if not last:
                        try:
                            detail = (await upstream.read())[:200].decode(errors="replace")
                        except (aiohttp.ClientError, TimeoutError) as exc:
                            detail = repr(exc)
                        raise self._failure(engine_id, str(upstream.status), detail)
                    self.pool.record_failure(engine_id)
                    self.metrics.upstream_errors.labels(engine_id, str(upstream.status)).inc()
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _NOT_BACK:
                        response.headers.add(name, value)
                response.headers[ENGINE_HEADER] = engine_id
                try:
                    await response.prepare(request)
                except ConnectionResetError:  # the client left while the engine answered
                    return response
                tokens = ResponseTokens(stream=route_request.stream)  # usage, as it passes
                while True:
                    try:
                        chunk = await upstream.content.readany()
                    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                            TimeoutError) as exc:  # fmt: skip
                        await self._died_mid_response(request, response, route_request,
                                                      engine_id, exc)  # fmt: skip
                        return response
                    if not chunk:
                        break
                    if ttft is None:
                        ttft = self._clock() - sent_at
                        await self.ledger.first_token(engine_id, pending)
                        pending = 0
                    try:
                        await response.write(chunk)
                    except ConnectionResetError:  # the client left (not the engine's fault)
                        log.debug("client of %s left mid-response", route_request.request_id)
                        return response
                    tokens.feed(chunk)
                try:
                    await response.write_eof()
                except ConnectionResetError:  # the client left after the last chunk
                    log.debug("client of %s left at the end", route_request.request_id)
                ok = upstream.status < 500
                if ok:
                    self.pool.record_success(engine_id)
                completion_tokens = tokens.completion_tokens()
                if upstream.status == 200 and route_request.route != "embeddings":
                    self._record_size(route_request, tokens.prompt_tokens(), completion_tokens)
                return response
            finally:
                if upstream.content.at_eof():
                    upstream.release()
                else:  # cancelled or failed: drop the connection so the engine aborts
                    upstream.close()
        finally:
            await self.ledger.release(engine_id, pending)
            gauge.dec()
            model_gauge.dec()
            self.pipeline.observe(
                decision,
                RouteOutcome(
                    request=route_request,
                    engine_id=engine_id,
                    ok=ok,
                    ttft_s=ttft,
                    latency_s=self._clock() - sent_at,
                    prompt_tokens=route_request.prompt_tokens,
                    completion_tokens=completion_tokens,
                ),
            )
