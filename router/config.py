"""Settings of ``shoal router serve``: one frozen value, read through ``shoal.config``.

Flags (``--strategy least-request``), environment (``SHOAL_ROUTER_STRATEGY=...``) or the
``[router]`` table of the TOML file named by ``--config`` / ``SHOAL_CONFIG``; the later
source wins in the order file < environment < flags, as every Shoal component does it
(``kvcache/config.py``). The README's reference table is generated from this class.

Invariant: a ``RouterSettings`` that constructs is internally consistent (positive
intervals, a known discovery kind, limits >= 0); the strategy name is checked where the
strategies are known (``pipeline.py``), so this module imports no strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

from control.health.targets import check_watcher_url
from shoal.config import setting

__all__ = ["DISCOVERY_KINDS", "RouterSettings"]

DISCOVERY_KINDS = ("static", "dns", "k8s", "file", "http")


@dataclass(frozen=True, slots=True)
class RouterSettings:
    host: str = setting("127.0.0.1", "listen address")
    port: int = setting(8080, "listen port")
    admin_port: int = setting(
        0,
        "second listener for the routes that are not the OpenAI API (/metrics, /router/engines, "
        "/v1/request_sizes), which then leave --port; 0 = they stay on --port, without a key",
    )
    admin_host: str = setting(
        "127.0.0.1",
        "admin listener's address; beyond loopback it needs --admin-token-file (or "
        "--insecure-no-auth)",
    )
    admin_token_file: str = setting(
        "",
        "file holding the bearer token the admin listener requires on every route but "
        "/metrics (Prometheus and the autoscaler scrape without one); needs --admin-port",
    )
    engines: str = setting(
        "",
        "comma-separated engines: URL[=NODE/gpuI] (static; NODE/gpuI = the engine's "
        "cache-daemon stream), http://NAME:PORT (dns), [NAMESPACE/]SERVICE[:PORT_NAME]"
        "[@GPU_TYPE] (k8s), the discovery URL (http: shoal engines serve's "
        "http://HOST:8093/v1/discovery)",
    )
    discovery: str = setting("static", "how engines are found: static, dns, k8s, file or http")
    discovery_file: str = setting(
        "", "file discovery: JSON or YAML list of {url, stream?, gpu_type?}; re-read on change"
    )
    discovery_interval_s: float = setting(
        5.0, "seconds between discovery reads (dns, k8s, file, http)"
    )
    discovery_token_file: str = setting(
        "", "http discovery: file holding the bearer token its URL requires (the fleet's)"
    )
    strategy: str = setting("shoal", "default routing strategy or weighted mix (a:2,b:1)")
    workers: int = setting(1, "processes sharing the port (SO_REUSEPORT), each its own pool")
    redis: str = setting("", "Redis URL for state shared between router replicas; empty = memory")
    cache_socket: str = setting(
        "", "the local cache daemon's engine socket; enables precise prefix routing"
    )
    tokenizer: str = setting("", "directory with the served model's tokenizer.json")
    tokenizer_dialect: str = setting(
        "vllm", "how the engines render chat prompts: vllm, or simulator for sim fleets"
    )
    chunk_tokens: int = setting(256, "tokens per Shoal key (as the engines' connector cuts)")
    engine_model: str = setting(
        "", "the engines' Shoal key namespace model; empty = what the daemon learned"
    )
    api_keys: str = setting("", "file mapping API keys to users (JSON object or KEY USER lines)")
    insecure_no_auth: bool = setting(
        False,
        "listen beyond loopback without --api-keys (anyone who reaches the port may use the "
        "engines; logs a warning)",
    )
    user_rpm: int = setting(0, "requests per minute per user; 0 = unlimited")
    user_tpm: int = setting(0, "prompt+max tokens per minute per user; 0 = unlimited")
    model_rps: float = setting(0.0, "requests per second per model; 0 = unlimited")
    max_body_bytes: int = setting(32 << 20, "largest request body accepted (413 above)", size=True)
    max_header_bytes: int = setting(
        64 << 10, "largest request header block accepted (400 above)", size=True
    )
    health_interval_s: float = setting(1.0, "seconds between active health checks")
    health_timeout_s: float = setting(1.0, "seconds a health check may take")
    models_interval_s: float = setting(10.0, "seconds between /v1/models polls per engine")
    metrics_interval_s: float = setting(1.0, "seconds between engine /metrics scrapes")
    metrics_timeout_s: float = setting(1.0, "seconds one /metrics scrape may take")
    metrics_stale_s: float = setting(5.0, "a scrape older than this is unknown (never zeros)")
    breaker_failures: int = setting(3, "consecutive failures that open an engine's circuit breaker")
    breaker_cooldown_s: float = setting(
        5.0, "seconds an open breaker waits before one half-open probe"
    )
    max_retries: int = setting(2, "other engines tried when one fails before the first byte")
    connect_timeout_s: float = setting(2.0, "seconds to connect to an engine")
    upstream_timeout_s: float = setting(
        600.0, "seconds an engine may take to answer a request's headers"
    )
    max_in_flight_per_engine: int = setting(256, "an engine with this many is saturated")
    retry_after_s: float = setting(1.0, "Retry-After when saturated or no engine is healthy")
    hold_timeout_s: float = setting(
        120.0,
        "scale from zero: seconds a request waits for a first engine of its model (with "
        "--discovery dns, k8s, file or http, or --autoscaler-url); 0 = answer 503 at once",
    )
    hold_max_requests: int = setting(
        256, "scale from zero: requests held at most, all models together (503 beyond)"
    )
    autoscaler_url: str = setting(
        "",
        "scale from zero: the autoscaler to ask for an engine (POST URL/v1/wake) when a "
        "request is held; empty = none",
    )
    autoscaler_token_file: str = setting(
        "",
        "file holding the bearer token the autoscaler's /v1/wake requires (its --auth-token-file)",
    )
    lora_url: str = setting(
        "",
        "LoRA on demand: the LoRA manager (shoal lora serve) asked to load an adapter (POST "
        "URL/v1/wake) when no healthy engine lists a requested model; the request is held "
        "meanwhile (--hold-timeout-s, --hold-max-requests), a name it does not know is a "
        "404 at once; empty = none",
    )
    lora_token_file: str = setting(
        "", "file holding the bearer token the LoRA manager's /v1/wake requires"
    )
    placement_url: str = setting(
        "",
        "the placement planner (shoal placement run) whose plan (GET URL/v1/plan) the slo "
        "strategy follows: each request's GPU type from its size cell's shares; empty = none",
    )
    placement_token_file: str = setting(
        "", "file holding the bearer token the placement planner's /v1/plan requires"
    )
    placement_interval_s: float = setting(
        5.0,
        "seconds between plan polls; a plan not confirmed for 3 intervals, or a failed poll, "
        "means no plan",
    )
    gpu_health: str = setting(
        "",
        "GPU health watchers (shoal health watch) to poll, URL[,URL...]; dns+http://NAME:PORT "
        "= every address NAME resolves to, re-resolved each poll (a headless Service): an "
        "engine one of whose GPUs (discovery's gpus, else its stream) is unhealthy gets no "
        "new requests; empty = none",
    )
    gpu_health_token_file: str = setting(
        "", "file holding the bearer token the watchers' /v1/gpus requires"
    )
    gpu_health_interval_s: float = setting(
        5.0,
        "seconds between polls of each watcher; one unreadable for 3 intervals is forgotten "
        "(unknown is not sick)",
    )
    ledger_refresh_s: float = setting(
        0.05, "seconds between pulls of other replicas' in-flight counts (with --redis)"
    )
    session_header: str = setting("x-session-id", "request header naming a session")
    locate_timeout_s: float = setting(
        0.05, "seconds the precise prefix lookup may take before it counts as unknown"
    )
    shutdown_timeout_s: float = setting(
        10.0, "on SIGTERM, seconds requests in flight may take to finish before they are cut"
    )
    # strategy tunables: the fields of router.strategies.StrategyDeps of the same names
    prefill_s_per_token: float = setting(
        2e-4, "cost model: seconds an engine takes to prefill one uncached prompt token"
    )
    node_load_s_per_token: float = setting(
        1e-5, "cost model: seconds to load one token's KV from the engine's node cache"
    )
    peer_fetch_s_per_token: float = setting(
        4e-5, "cost model: seconds to fetch one token's KV from a peer node's cache"
    )
    running_request_tokens: int = setting(
        32, "cost model: queued prompt tokens one running request is worth (decode share)"
    )
    shoal_load_factor: float = setting(
        1.5, "shoal: refuse an engine above this x the mean in flight (hot prefixes spread)"
    )
    balance_abs_requests: int = setting(
        8, "load gate: affinity holds until an engine has this many more in flight than the least"
    )
    balance_rel: float = setting(1.5, "load gate: ... and this many times the least loaded's")
    prefix_block_chars: int = setting(256, "approximate prefix index: characters per block")
    prefix_index_entries: int = setting(
        200_000, "approximate prefix index: block hashes kept (bounded memory)"
    )
    bounded_load_factor: float = setting(
        1.25, "session-affinity: an engine takes at most this x the mean load"
    )
    ttft_slo_s: float = setting(2.0, "slo strategy: time-to-first-token target")
    tpot_slo_s: float = setting(0.2, "slo strategy: time-per-output-token target")
    seed: int = setting(-1, "random seed for tie-breaks; -1 = from the OS")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("text", "json (structured) or text")

    def __post_init__(self) -> None:
        if self.discovery not in DISCOVERY_KINDS:
            raise ValueError(
                f"discovery {self.discovery!r} must be one of {', '.join(DISCOVERY_KINDS)}"
            )
        if self.discovery == "file" and not self.discovery_file:
            raise ValueError("discovery file needs discovery_file (--discovery-file F)")
        if self.discovery == "http" and not self.engines.startswith(("http://", "https://")):
            raise ValueError(
                "discovery http needs engines = the discovery URL (--engines "
                "http://FLEET:8093/v1/discovery)"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port {self.port} must be 0..65535")
        if not 0 <= self.admin_port < 65536:
            raise ValueError(f"admin_port {self.admin_port} must be 0..65535 (0 = none)")
        if self.admin_port and self.admin_port == self.port:
            raise ValueError(f"admin_port {self.admin_port} must differ from port")
        if self.admin_token_file and not self.admin_port:
            raise ValueError("admin_token_file needs admin_port (the admin listener it guards)")
        if self.workers < 1:
            raise ValueError(f"workers {self.workers} must be at least 1")
        positive = (
            "prefill_s_per_token",
            "node_load_s_per_token",
            "peer_fetch_s_per_token",
            "shoal_load_factor",
            "balance_rel",
            "prefix_block_chars",
            "prefix_index_entries",
            "bounded_load_factor",
            "ttft_slo_s",
            "tpot_slo_s",
            "chunk_tokens",
            "max_body_bytes",
            "max_header_bytes",
            "health_interval_s",
            "health_timeout_s",
            "models_interval_s",
            "metrics_interval_s",
            "metrics_timeout_s",
            "metrics_stale_s",
            "breaker_failures",
            "breaker_cooldown_s",
            "connect_timeout_s",
            "upstream_timeout_s",
            "max_in_flight_per_engine",
            "retry_after_s",
            "ledger_refresh_s",
            "discovery_interval_s",
            "shutdown_timeout_s",
            "locate_timeout_s",
            "placement_interval_s",
            "gpu_health_interval_s",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("user_rpm", "user_tpm", "model_rps", "max_retries", "running_request_tokens",
                     "balance_abs_requests", "hold_timeout_s", "hold_max_requests"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = off), got {getattr(self, name)}")
        if not self.strategy.strip():
            raise ValueError("strategy must name a strategy or a mix")
        for name in ("autoscaler_url", "lora_url", "placement_url"):
            url = getattr(self, name)
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} {url!r} must be http(s)://HOST:PORT")
        for url in self.gpu_health_urls:
            check_watcher_url(url, "gpu_health")  # ValueError naming the two forms

    @property
    def gpu_health_urls(self) -> tuple[str, ...]:
        """``--gpu-health`` split: the watchers' base URLs, in order, without repeats."""
        urls = (u.strip().rstrip("/") for u in self.gpu_health.split(","))
        return tuple(dict.fromkeys(u for u in urls if u))

    @property
    def holds(self) -> bool:
        """Whether requests wait for an engine when none serves their model: only where
        engines can appear (dynamic discovery, or an autoscaler to ask); a static fleet
        answers 503 at once, as before scale from zero existed."""
        can_appear = self.discovery != "static" or bool(self.autoscaler_url)
        return can_appear and self.hold_timeout_s > 0 and self.hold_max_requests > 0

    @property
    def holds_adapters(self) -> bool:
        """Whether a request for a model no healthy engine lists waits while the LoRA
        manager loads it (``--lora-url``), rather than answering 404 at once."""
        return bool(self.lora_url) and self.hold_timeout_s > 0 and self.hold_max_requests > 0
