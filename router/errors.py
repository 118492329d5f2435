"""The router's exception tree.

::

    ShoalError
     ├── ConfigError               bad flag, environment variable or file (shoal.errors)
     └── RouterError
          ├── BadRequest           the client's request is malformed or too large (400/413)
          │    └── ModelNotFound   no engine serves the model and none will (404)
          ├── Unauthorized         no or an unknown API key while --api-keys is set (401)
          ├── UnknownStrategy      a strategy name or mix that does not parse (400 per request,
          │                        ConfigError at start)
          ├── NoEngineAvailable    no healthy engine serves the model (503, Retry-After)
          │    ├── HoldTimedOut    held for an engine (scale from zero) past --hold-timeout-s
          │    └── HoldFull        --hold-max-requests are held already
          ├── Saturated            every engine serving the model is saturated (429/503,
          │                        Retry-After)
          ├── RateLimited          a user's RPM/TPM or a model's RPS is spent (429,
          │                        Retry-After)
          ├── UpstreamError        an engine failed before the first byte (retried on
          │                        another engine when the request allows)
          └── BadPlan              the placement planner's /v1/plan is malformed (the
                                   router then routes without a plan; router/plan.py)

aiohttp's client errors and ``asyncio.TimeoutError`` are translated to ``UpstreamError`` in
``proxy.py``; Redis errors are translated in ``ledger.py``/``limits.py`` (a Redis outage
degrades to this replica's local view, with a log line and a metric, never a failed request).
"""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = [
    "BadPlan",
    "BadRequest",
    "HoldFull",
    "HoldTimedOut",
    "ModelNotFound",
    "NoEngineAvailable",
    "RateLimited",
    "RouterError",
    "Saturated",
    "Unauthorized",
    "UnknownStrategy",
    "UpstreamError",
]


class RouterError(ShoalError):
    """Base of every error the router raises on purpose.

    ``status`` is the HTTP status the proxy answers with; ``retry_after_s`` (when set) goes
    into a ``Retry-After`` header.
    """

    status: int = 500
    code: str = "router_error"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadRequest(RouterError):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ModelNotFound(BadRequest):
    """Healthy engines serve other models only (and, with ``--lora-url``, the LoRA
    manager does not know the name either): vLLM's 404 for an unknown model."""

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist.", status=404)
        self.model = model


class Unauthorized(RouterError):
    status = 401
    code = "invalid_api_key"


class UnknownStrategy(RouterError):
    status = 400
    code = "unknown_strategy"


class NoEngineAvailable(RouterError):
    status = 503
    code = "no_engine_available"


class HoldTimedOut(NoEngineAvailable):
    """No engine for the model came up while the request was held (router/hold.py)."""

    code = "hold_timeout"


class HoldFull(NoEngineAvailable):
    """The holding queue is full: the request is refused at once (router/hold.py)."""

    code = "hold_full"


class Saturated(RouterError):
    status = 429
    code = "saturated"


class RateLimited(RouterError):
    status = 429
    code = "rate_limited"


class UpstreamError(RouterError):
    """An engine failed: connection refused or reset, timeout, or a 5xx before the first
    byte. ``engine_id`` names it (the pool counts it against the engine's breaker)."""

    status = 502
    code = "upstream_error"

    def __init__(self, message: str, *, engine_id: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.engine_id = engine_id
        self.retryable = retryable


class BadPlan(RouterError):
    """A placement plan that cannot be used; the message names the field."""

    code = "bad_plan"
