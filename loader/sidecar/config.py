"""Settings of the loader sidecar (``shoal loader serve``) and of the commands that call it.

One dataclass, read through ``shoal.config``: flags (``--capacity-bytes 32GiB``),
environment (``SHOAL_LOADER_CAPACITY_BYTES=32GiB``) or the ``[loader]`` table of the TOML
file named by ``--config`` / ``SHOAL_CONFIG``.

Paths derive from ``name`` so several sidecars can share a machine (tests do): segments are
``<shm_dir>/shoal-loader-<name>-<checkpoint id>`` and the default socket is
``<runtime_dir>/shoal-loader-<name>.sock``. ``runtime_dir`` is created with mode 0700: a
Unix socket's own mode is not a reliable guard, the directory's is.

``listen`` picks the transport: empty (that socket), ``unix:/path``, or ``tcp://host:port``.
TCP serves a controller warming a node from elsewhere (``Prefetch``, ``List``, ``Health``);
mapping the staged tensors still needs the engine on the sidecar's host. TCP needs TLS
(``tls_cert`` + ``tls_key``) unless the host is a loopback address; ``tls_client_ca`` makes
it mutual: only clients presenting a certificate that CA signed get a connection (clients
present ``tls_client_cert`` + ``tls_client_key``). Serving on such an address needs mutual
TLS too, like the cache's cluster port (M5): without ``tls_client_ca`` any client that can
reach the port could Read, Evict and Prefetch staged weights, so ``check_serving`` refuses
to start unless ``insecure_clients`` says so explicitly (the server then logs a WARNING).
The check is the server's, not ``__post_init__``'s: the verbs that dial a sidecar read the
same settings and present a certificate, not a CA. On such a port the allow-list is
deny-by-default: without ``allow`` nothing can be staged (``allow_rules``; the rules are
``loader.sidecar.allow``'s), while a Unix socket or loopback port admits any URI unless
``allow`` narrows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loader.sidecar.allow import AllowRule, parse_rule
from shoal.config import default_runtime_dir, is_loopback, setting

__all__ = ["LoaderConfig", "default_runtime_dir", "is_loopback", "keepalive_options"]


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    name: str = setting("default", "sidecar instance name; socket and segment paths derive from it")
    shm_dir: str = setting("/dev/shm", "directory (tmpfs) holding the staged segments")
    runtime_dir: str = setting(
        "", "directory (mode 0700) for the socket; empty = $XDG_RUNTIME_DIR (or /tmp)/shoal-UID"
    )
    listen: str = setting(
        "", "where to serve: empty = the Unix socket in runtime_dir, unix:/path or tcp://host:port"
    )
    tls_cert: str = setting("", "PEM certificate chain the sidecar presents over TCP")
    tls_key: str = setting("", "PEM private key of tls_cert")
    tls_client_ca: str = setting(
        "", "PEM CA bundle: when set, TCP clients must present a certificate it signed (mTLS)"
    )
    tls_ca: str = setting("", "clients: PEM CA bundle that verifies the sidecar's certificate")
    tls_client_cert: str = setting(
        "", "clients: PEM certificate to present to a sidecar that requires one"
    )
    tls_client_key: str = setting("", "clients: PEM private key of tls_client_cert")
    insecure_clients: bool = setting(
        False, "serve a TCP address other hosts can reach without tls_client_ca: any client "
        "that reaches it may Read, Evict and Prefetch staged weights (logs a warning)",
    )  # fmt: skip
    capacity_bytes: int = setting(
        8 << 30, "bound on staged plus staging bytes in shared memory", size=True
    )
    concurrency: int = setting(16, "reads in flight per staging")
    chunk_bytes: int = setting(
        0, "largest single read; 0 = the source's (16MiB local, 64MiB S3 and HTTP)", size=True
    )
    rate_bytes_per_s: int = setting(
        0, "bytes per second per staging (0: unlimited); a request may only ask for less",
        size=True,
    )  # fmt: skip
    allow: str = setting(
        "", "URIs clients may stage from, comma-separated, compared by parsed component "
        "(scheme, host, port or :*, bucket, path on a segment boundary; local paths resolved); "
        "* = any; empty = any on a Unix socket or loopback, none on another TCP address; a "
        "URI checked against it is refused if it has percent-encoded dots, slashes or "
        "backslashes, a backslash, whitespace or a control character",
    )  # fmt: skip
    redirect_hosts: str = setting(
        "", "hosts an http(s) source may redirect to besides its own, comma-separated (* any)"
    )
    s3_endpoint: str = setting("", "S3-compatible endpoint URL for s3:// URIs")
    workers: int = setting(32, "gRPC worker threads (each streaming call holds one)")
    max_streams: int = setting(
        0, "streaming calls (Load, Prefetch, Read) served at once, more are refused "
        "(RESOURCE_EXHAUSTED); 0 = workers - 2, leaving threads for List/Evict/Health probes",
    )  # fmt: skip
    max_concurrent_rpcs: int = setting(
        0, "RPCs admitted at once, queued ones included (more: RESOURCE_EXHAUSTED); 0 = 4 x workers"
    )
    keepalive_time_s: float = setting(
        30.0, "seconds between HTTP/2 keepalive pings (server and clients): a peer that "
        "vanished without closing its connection is noticed",
    )  # fmt: skip
    keepalive_timeout_s: float = setting(
        10.0, "seconds a keepalive ping may go unanswered before the connection is dropped"
    )
    metrics_port: int = setting(0, "port of the Prometheus endpoint (shoal_loader_*); 0 = none")
    metrics_host: str = setting("127.0.0.1", "address of the Prometheus endpoint")
    progress_interval_s: float = setting(0.1, "seconds between progress messages of a staging")
    timeout_s: float = setting(10.0, "clients: seconds a List/Evict/Health call may take")
    log_level: str = setting("info", "debug, info, warning or error")
    log_format: str = setting("json", "json (structured) or text")

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"name {self.name!r} must be non-empty and contain no '/'")
        if self.capacity_bytes <= 0 or self.concurrency < 1 or self.chunk_bytes < 0:
            raise ValueError("capacity_bytes and concurrency must be positive, chunk_bytes >= 0")
        if self.workers < 2 or self.progress_interval_s <= 0 or self.timeout_s <= 0:
            raise ValueError("workers must be >= 2; progress_interval_s, timeout_s positive")
        if self.rate_bytes_per_s < 0:
            raise ValueError("rate_bytes_per_s must be >= 0")
        if self.max_streams < 0 or self.max_concurrent_rpcs < 0:
            raise ValueError("max_streams and max_concurrent_rpcs must be >= 0 (0: derived)")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port {self.metrics_port} must be 0 (none) or 1..65535")
        if self.keepalive_time_s <= 0 or self.keepalive_timeout_s <= 0:
            raise ValueError("keepalive_time_s and keepalive_timeout_s must be positive")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError("tls_client_cert and tls_client_key go together")
        if self.listen.startswith("tcp://"):
            _, port = self.tcp_address
            if not 0 < port < 65536:
                raise ValueError(f"listen {self.listen!r}: port must be 1..65535")
        elif self.listen and not self.listen.startswith("unix:"):
            raise ValueError(f"listen {self.listen!r} must be empty, unix:/path or tcp://host:port")
        self.allow_rules  # noqa: B018  (a bad --allow entry fails at startup, named)

    def check_serving(self) -> None:
        """``ValueError`` naming the fix if a sidecar should not serve with these settings:
        a TCP address other hosts can reach without TLS, or without mutual TLS
        (``tls_client_ca``) and an explicit ``insecure_clients``. Checked when serving, not
        in ``__post_init__``: the client verbs (``list``, ``prefetch``, ...) read the same
        settings to dial a remote sidecar, and a client needs ``tls_ca``, not a server
        certificate (``SidecarClient`` refuses a remote target without it)."""
        if self.listen.startswith("tcp://"):
            host, _ = self.tcp_address
            if not self.tls_cert and not is_loopback(host):
                raise ValueError(
                    f"listen {self.listen!r} is reachable from other hosts: give --tls-cert "
                    "and --tls-key, or listen on 127.0.0.1"
                )
        if self.reachable_from_other_hosts and not self.tls_client_ca and not self.insecure_clients:
            raise ValueError(
                f"refusing to serve {self.listen} without client certificates: any host that "
                "can reach it could Read, Evict and Prefetch staged weights. Give "
                "--tls-client-ca CA.pem (mutual TLS), listen on 127.0.0.1 or a Unix socket, "
                "or say --insecure-clients on a network you trust"
            )

    @property
    def runtime_path(self) -> Path:
        return Path(self.runtime_dir or default_runtime_dir())

    @property
    def socket_path(self) -> Path | None:
        """The Unix socket served on (None over TCP)."""
        if self.listen.startswith("tcp://"):
            return None
        if self.listen:
            return Path(self.listen.removeprefix("unix:").removeprefix("//"))
        return self.runtime_path / f"shoal-loader-{self.name}.sock"

    @property
    def tcp_address(self) -> tuple[str, int]:
        rest = self.listen.removeprefix("tcp://")
        host, sep, port = rest.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"listen {self.listen!r} must be tcp://host:port")
        return host.strip("[]"), int(port)

    @property
    def target(self) -> str:
        """The gRPC target clients dial."""
        path = self.socket_path
        if path is not None:
            return f"unix:{path}"
        host, port = self.tcp_address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def allowed_prefixes(self) -> list[str]:
        return [p.strip() for p in self.allow.split(",") if p.strip()]

    @property
    def reachable_from_other_hosts(self) -> bool:
        """Whether the sidecar listens on a TCP address that is not loopback."""
        return self.listen.startswith("tcp://") and not is_loopback(self.tcp_address[0])

    @property
    def allow_rules(self) -> list[AllowRule] | None:
        """The parsed allow-list (``loader.sidecar.allow``): ``None`` (anything) when none
        is given on a Unix socket or loopback port, ``[]`` (nothing) when none is given on
        a port other hosts can reach: deny by default there."""
        entries = self.allowed_prefixes
        if not entries:
            return [] if self.reachable_from_other_hosts else None
        return [parse_rule(entry) for entry in entries]

    @property
    def stream_slots(self) -> int:
        """Streaming calls served at once (``max_streams``, or ``workers - 2``)."""
        return self.max_streams or max(1, self.workers - 2)

    @property
    def rpc_limit(self) -> int:
        return self.max_concurrent_rpcs or 4 * self.workers

    def segment_prefix(self) -> str:
        return f"shoal-loader-{self.name}-"


def keepalive_options(time_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """gRPC channel/server options for HTTP/2 keepalive, the same on both sides: pings
    every ``time_s`` even with no call open, dropped after ``timeout_s`` unanswered; a
    server accepts pings that often (its default, 5 minutes, would answer a client's
    pings with GOAWAY "too many pings")."""
    return [
        ("grpc.keepalive_time_ms", int(time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", int(time_s * 1000) // 2),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", int(time_s * 1000) // 2),
    ]
