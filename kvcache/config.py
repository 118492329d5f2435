"""Settings of the node-local cache daemon (``shoal cache serve``) and its clients.

One dataclass, read through ``shoal.config``: flags (``--shm-bytes 2GiB``), environment
(``SHOAL_CACHE_SHM_BYTES=2GiB``) or the ``[cache]`` table of the TOML file named by
``--config`` / ``SHOAL_CONFIG``. The README's configuration reference is generated from it.

Paths derive from ``name`` so several daemons (tests, or one per NUMA node) can share a
machine: the arena is ``<shm_dir>/shoal-<name>.arena`` and the control socket
``<runtime_dir>/shoal-<name>.sock``. ``runtime_dir`` is created with mode 0700, which is
what keeps the socket reachable only by the daemon's user (ZeroMQ ipc sockets have no
permission option of their own).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcache.keys import Namespace
from shoal.config import default_runtime_dir, setting

__all__ = ["CacheConfig", "default_runtime_dir"]


@dataclass(frozen=True, slots=True)
class CacheConfig:
    name: str = setting("default", "daemon instance name; arena and socket paths derive from it")
    shm_dir: str = setting("/dev/shm", "directory (tmpfs) holding the shared-memory arena")
    runtime_dir: str = setting(
        "", "directory (mode 0700) for the socket; empty = $XDG_RUNTIME_DIR (or /tmp)/shoal-UID"
    )
    shm_bytes: int = setting(1 << 30, "size of the shared-memory (hot) tier", size=True)
    dram_bytes: int = setting(
        4 << 30, "size of the daemon-private DRAM (warm) tier; 0 = off", size=True
    )
    ssd_dir: str = setting("", "directory for the SSD spill tier; empty = no SSD tier")
    ssd_bytes: int = setting(16 << 30, "size of the SSD spill file (with --ssd-dir)", size=True)
    io_threads: int = setting(
        4, "worker threads for SSD tier reads and writes (off the request loop)"
    )
    io_staging_bytes: int = setting(
        256 << 20,
        "memory for blocks on their way to the SSD tier; past it, evicted blocks are dropped",
        size=True,
    )
    slab_bytes: int = setting(64 << 20, "allocator slab size = largest block", size=True)
    policy: str = setting("default", "eviction policy: default, lru or s3fifo")
    reservation_ttl_s: float = setting(30.0, "seconds a reserved, uncommitted slot is kept")
    session_ttl_s: float = setting(30.0, "seconds without a request before a client is dropped")
    lease_ttl_s: float = setting(
        30.0, "seconds a client's leases outlive its last get/release (heartbeats do not count)"
    )
    max_request_bytes: int = setting(16 << 20, "largest request frame accepted", size=True)
    populate: bool = setting(
        True,
        "prefault the arena mapping for writing (MADV_POPULATE_WRITE); the arena's "
        "pages are reserved (posix_fallocate) either way",
    )
    metrics_host: str = setting("127.0.0.1", "address of the Prometheus endpoint")
    metrics_port: int = setting(
        9500, "port of the Prometheus endpoint and of /healthz and /readyz; 0 = off"
    )
    health_stall_s: float = setting(
        10.0, "/healthz fails once the daemon's loop has not turned for this many seconds"
    )
    shutdown_timeout_s: float = setting(
        5.0,
        "on SIGTERM, seconds to wait for leases and writes in flight (and a cluster "
        "drain) before exiting",
    )
    cluster_port: int = setting(
        0, "cluster port (ROUTER; PUB is the next port); 0 = no cluster, this node alone"
    )
    cluster_host: str = setting(
        "127.0.0.1",
        "address the cluster sockets bind to; a non-loopback one needs cluster_curve_dir "
        "(or cluster_insecure)",
    )
    cluster_advertise: str = setting(
        "", "host:port peers reach this node on; empty = cluster_host (or this host's IP)"
    )
    cluster_node: str = setting("", "this node's name in the cluster; empty = HOSTNAME:name")
    cluster_discovery: str = setting("static", "how peers are found: static, dns or k8s")
    cluster_peers: str = setting("", "static discovery: comma-separated host:port of peers")
    cluster_dns_name: str = setting("", "dns discovery: headless Service name resolving to peers")
    cluster_k8s_service: str = setting("", "k8s discovery: Service whose Endpoints are peers")
    cluster_k8s_namespace: str = setting("default", "k8s discovery: namespace of the Service")
    cluster_heartbeat_s: float = setting(1.0, "seconds between heartbeats")
    cluster_member_timeout_s: float = setting(
        3.0, "seconds without a message before a peer is declared dead"
    )
    cluster_fetch_timeout_s: float = setting(
        0.5, "seconds a peer fetch may take before it fails into a miss"
    )
    cluster_curve_dir: str = setting(
        "",
        "directory with the CurveZMQ cluster keypair and the members/ and operators/ "
        "allow-lists of public keys; empty = off",
    )
    cluster_curve_key: str = setting(
        "",
        "this node's (or operator's) CurveZMQ keypair file; empty = "
        "<cluster_curve_dir>/node.key_secret",
    )
    cluster_key_reload_s: float = setting(
        10.0, "seconds between re-reads of the allow-lists in cluster_curve_dir"
    )
    cluster_insecure: bool = setting(
        False,
        "allow a non-loopback cluster bind without CurveZMQ (unauthenticated peers; logs a "
        "warning)",
    )
    engine_events: str = setting(
        "",
        "vLLM KV-event publishers (their kv-events endpoint), comma-separated, each one "
        "engine (gpu0, gpu1, ...) beside this daemon; empty = off",
    )
    engine_events_replay: str = setting(
        "",
        "their replay endpoints, comma-separated in the same order; empty = no replay "
        "(a lost batch then resets that engine's entries)",
    )
    engine_events_topic: str = setting("", "topic those publishers use (kv-events topic)")
    engine_model: str = setting(
        "", "model of the engines' Shoal keys (required with engine_events)"
    )
    engine_kv_dtype: str = setting("bfloat16", "KV dtype of the engines' Shoal keys")
    engine_layout: str = setting("default", "KV layout of the engines' Shoal keys")
    engine_tp_rank: int = setting(0, "tensor-parallel rank whose Shoal keys are published")
    engine_tp_size: int = setting(1, "tensor-parallel size of the engines")
    engine_namespace_extra: str = setting("", "namespace extra of the engines' Shoal keys")
    engine_chunk_tokens: int = setting(
        256, "tokens per Shoal key for the engines, as their connector cuts chunks"
    )
    engine_replay_timeout_s: float = setting(
        2.0, "seconds a replay may take before the lost batches count as a hole"
    )
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("json", "json (structured) or text")

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name {self.name!r} must be non-empty and contain no '/'")
        if self.slab_bytes < 4096 or self.slab_bytes % 4096:
            raise ValueError(f"slab_bytes {self.slab_bytes} must be a positive multiple of 4 KiB")
        for field in ("shm_bytes", "dram_bytes", "ssd_bytes"):
            value = getattr(self, field)
            minimum = 1 << 20 if field == "shm_bytes" else 0
            if value < minimum or value % 4096:
                raise ValueError(f"{field} {value} must be a multiple of 4 KiB, >= {minimum}")
        if min(self.reservation_ttl_s, self.session_ttl_s, self.lease_ttl_s) <= 0:
            raise ValueError("reservation_ttl_s, session_ttl_s and lease_ttl_s must be positive")
        if self.io_threads < 1:
            raise ValueError(f"io_threads {self.io_threads} must be at least 1")
        if self.health_stall_s <= 0 or self.shutdown_timeout_s < 0:
            raise ValueError("health_stall_s must be positive and shutdown_timeout_s >= 0")
        if not 0 <= self.cluster_port < 65535:
            raise ValueError(f"cluster_port {self.cluster_port} must be 0 (off) or 1..65534")
        if self.cluster_discovery not in ("static", "dns", "k8s"):
            raise ValueError(
                f"cluster_discovery {self.cluster_discovery!r} must be static, dns or k8s"
            )
        if min(self.cluster_heartbeat_s, self.cluster_fetch_timeout_s,
               self.cluster_key_reload_s) <= 0:  # fmt: skip
            raise ValueError(
                "cluster_heartbeat_s, cluster_fetch_timeout_s and cluster_key_reload_s must "
                "be positive"
            )
        if self.cluster_member_timeout_s < 2 * self.cluster_heartbeat_s:
            raise ValueError("cluster_member_timeout_s must be at least 2 heartbeats")
        if "/" in self.cluster_node:
            raise ValueError(
                f"cluster_node {self.cluster_node!r} must contain no '/' (it separates a node "
                "from its engines' streams)"
            )
        if self.engine_events:
            self.engine_namespace()  # raises on a bad model or rank
            replays = self.engine_replay_endpoints
            if replays and len(replays) != len(self.engine_endpoints):
                raise ValueError(
                    f"engine_events_replay lists {len(replays)} endpoints for "
                    f"{len(self.engine_endpoints)} engine_events; give one per engine or none"
                )
        if self.engine_chunk_tokens <= 0 or self.engine_replay_timeout_s <= 0:
            raise ValueError("engine_chunk_tokens and engine_replay_timeout_s must be positive")

    @property
    def engine_endpoints(self) -> list[str]:
        return [e.strip() for e in self.engine_events.split(",") if e.strip()]

    @property
    def engine_replay_endpoints(self) -> list[str]:
        return [e.strip() for e in self.engine_events_replay.split(",") if e.strip()]

    def engine_namespace(self) -> Namespace:
        """The namespace the engines' GPU prefixes are keyed in (as their clients key them)."""
        if not self.engine_model:
            raise ValueError(
                "engine_events needs engine_model: the model the engines serve, as their "
                "Shoal clients name it (with kv dtype, layout and tp rank if not the defaults)"
            )
        return Namespace(
            self.engine_model, self.engine_kv_dtype, self.engine_layout, self.engine_tp_rank,
            self.engine_tp_size, self.engine_namespace_extra,
        )  # fmt: skip

    @property
    def arena_path(self) -> Path:
        return Path(self.shm_dir) / f"shoal-{self.name}.arena"

    @property
    def runtime_path(self) -> Path:
        return Path(self.runtime_dir or default_runtime_dir())

    @property
    def socket_path(self) -> Path:
        return self.runtime_path / f"shoal-{self.name}.sock"

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket_path}"
