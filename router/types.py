"""Values that cross the router's module boundaries (frozen, slotted; STYLE.md §4).

The proxy turns a client's body into a ``RouteRequest``; the engine pool, the ledger and
the scraper turn what they know into one ``EngineView`` per candidate engine; the precise
locator (or the approximate index) turns the prompt into a ``PrefixView``; a strategy
scores candidates and the pipeline returns a ``RouteDecision``. After the response, the
proxy reports a ``RouteOutcome`` to the strategies that learn (``Strategy.observe``).
The placement planner's plan reaches the ``slo`` strategy as a ``PlacementPlan``
(``router/plan.py`` polls it; ``router/strategies/placement.py`` reads it).

Units: tokens are counts, times are seconds (``*_s``), ``now`` is ``time.monotonic()``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EngineMetrics",
    "EnginePrefix",
    "EngineSpec",
    "EngineView",
    "PlacementPlan",
    "PrefixView",
    "RouteDecision",
    "RouteOutcome",
    "RouteRequest",
]


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs to know of one client request (never the whole body).

    ``prompt_text`` is the prompt as the approximate prefix index hashes it (a chat's
    messages rendered role by role); ``prompt_tokens`` is exact when ``token_ids`` is set
    (the precise path tokenized it) and an estimate otherwise. ``model`` is what the client
    asked for: a base model or a LoRA adapter's name.
    """

    request_id: str
    route: str  # "completions", "chat" or "embeddings"
    model: str
    prompt_text: str
    prompt_tokens: int
    max_tokens: int = 16
    user: str = ""  # the rate-limit and fairness identity ("" = anonymous)
    session_id: str = ""  # session-affinity key ("" = none)
    stream: bool = False
    arrival_s: float = 0.0
    token_ids: tuple[int, ...] | None = None
    # a chat's messages as the client sent them: the precise path renders the model's
    # chat template over them (``router/precise.py``); empty for other routes
    messages: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """One engine as discovery names it: its base URL, its cache-daemon stream
    (``<node>/gpu<i>``, empty when unknown: precise routing then sees no GPU prefix), its
    GPU type (``"A100"``: the placement plan's name for it, issue 14; empty when
    unknown: the plan then never picks it specifically) and the GPUs it runs on
    (``"NODE/gpuI"`` names, issue 15: an engine one of whose GPUs a health watcher reports
    unhealthy gets no new requests, ``router/gpu_health.py``). ``gpus`` defaults to the
    stream when one is set (a one-GPU engine); empty = unknown (never taken out for GPU
    health: the router's own ``/health`` checks remain)."""

    url: str
    stream: str = ""
    gpu_type: str = ""
    gpus: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.gpus and self.stream:
            object.__setattr__(self, "gpus", (self.stream,))

    @property
    def node(self) -> str:
        return self.stream.split("/", 1)[0] if self.stream else ""


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """An engine's own view of its load, from its ``/metrics`` (``scrape.py``).

    Only fresh scrapes become an ``EngineMetrics``; a stale or failed scrape is ``None``
    in ``EngineView.metrics`` (unknown), never zeros. Fields an engine does not export
    are ``None`` too.
    """

    age_s: float  # since the scrape that produced it
    num_running: float | None = None
    num_waiting: float | None = None
    kv_cache_usage: float | None = None  # 0..1 (vllm:kv_cache_usage_perc, or the old name)
    ttft_mean_s: float | None = None  # over the last scrape interval, when requests finished
    tpot_mean_s: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    loras_loaded: frozenset[str] = frozenset()  # vllm:lora_requests_info running/waiting


@dataclass(frozen=True, slots=True)
class EngineView:
    """One candidate engine as a strategy sees it, at one instant.

    ``in_flight`` and ``in_flight_tokens`` (uncached prompt tokens of requests sent and not
    yet answered with a first token) are the router's own accounting, summed over every
    router replica when they share a ledger; they are the primary load signal. ``stream``
    is the cache daemon's name for this engine's GPU (``<node>/gpu<i>``) when known.
    """

    engine_id: str
    url: str
    models: frozenset[str]
    in_flight: int = 0
    in_flight_tokens: int = 0
    metrics: EngineMetrics | None = None
    node: str = ""
    stream: str = ""
    gpu_type: str = ""  # discovery's (EngineSpec.gpu_type); "" = unknown


@dataclass(frozen=True, slots=True)
class EnginePrefix:
    """How many of a request's leading prompt tokens each tier can supply to one engine."""

    gpu_tokens: int = 0  # already on this engine's GPU (its prefix cache)
    node_tokens: int = 0  # in its node's cache daemon (shm, DRAM or SSD): a local load
    peer_tokens: int = 0  # on a peer node's daemon: a fetch, then a load


@dataclass(frozen=True, slots=True)
class PrefixView:
    """Where a request's prefix lives, per engine id (engines absent hold nothing).

    ``source`` is ``"precise"`` (the cluster index: KV events and daemons) or
    ``"approximate"`` (the router's own index of where it sent prompts).
    """

    source: str
    prompt_tokens: int
    engines: Mapping[str, EnginePrefix] = field(default_factory=dict)

    def of(self, engine_id: str) -> EnginePrefix:
        return self.engines.get(engine_id, _NOTHING)


_NOTHING = EnginePrefix()


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The engine chosen, why, and every strategy's scores (for the debug log line)."""

    engine_id: str
    strategy: str  # the profile or mix that decided, as the client or default named it
    reason: str  # e.g. "affinity", "load", "cold", "session", "only-candidate"
    # strategy -> engine id -> cost
    scores: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    cached_tokens: int = 0  # prefix tokens expected to be reused on the chosen engine
    prompt_tokens: int = 0  # the prompt's length as routing knew it (exact when precise)


@dataclass(frozen=True, slots=True)
class RouteOutcome:
    """What happened to a routed request; strategies that learn read it."""

    request: RouteRequest
    engine_id: str
    ok: bool
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class PlacementPlan:
    """The placement planner's plan as routing reads it (issue 14, ``GET /v1/plan``).

    ``shares[gpu_type][i][j]`` is the share of the requests of cell ``(i, j)`` (output
    length ``out_ticks[i]``, prompt length ``in_ticks[j]``) the plan sends to that GPU
    type; over types a cell's shares sum to 1 where it has traffic, to 0 where it has
    none. ``model`` is the model the plan was made for ("" = every model).
    """

    out_ticks: tuple[int, ...]
    in_ticks: tuple[int, ...]
    shares: Mapping[str, tuple[tuple[float, ...], ...]]
    model: str = ""
    created: float | None = None  # unix time the planner made it (informational)
