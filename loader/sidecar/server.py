"""``shoal loader serve``: the sidecar process: one ``Stager`` behind one gRPC server.

Startup, in order: refuse settings it must not serve with (``LoaderConfig.check_serving``:
a TCP address other hosts can reach needs mutual TLS, ``--tls-client-ca``, or an explicit
``--insecure-clients``, which logs a WARNING at every start); create the runtime directory
(0700); take an exclusive ``flock`` on ``<runtime_dir>/shoal-loader-<name>.lock`` for the
process's life (a second sidecar of
the same name fails with a clear error; a lock, unlike a pid file, cannot be fooled by pid
reuse); unlink segments a dead sidecar of this name left in ``shm_dir``; bind the Unix
socket (replacing a stale one, which the lock proves is dead) or the TCP port, with TLS
when a certificate is configured; log ``loader sidecar ready``.

Besides the Loader service it serves the standard ``grpc.health.v1.Health`` service
(``grpc_health_probe``, Kubernetes' ``grpc:`` probes) for the empty service name and
``shoal.loader.v1.Loader``: SERVING once started, NOT_SERVING while shutting down. The
custom ``Loader.Health`` RPC stays, for its statistics and for older clients. Without the
``grpcio-health-checking`` package only the custom RPC is served (logged once).

Metrics (M10): ``shoal_loader_*`` on ``--metrics-host``:``--metrics-port`` when a port is
given (none by default; loopback by default), names in ``loader.sidecar.metrics``.

Limits (m19): ``maximum_concurrent_rpcs`` (``--max-concurrent-rpcs``) bounds what gRPC
admits, queued calls included; ``--max-streams`` bounds the streaming calls, which hold a
worker thread each for their whole life, below the worker count, so unary calls and probes
always find a thread; HTTP/2 keepalive on both sides (``--keepalive-time-s``) notices a
peer that vanished without closing its connection.

Shutdown (SIGTERM, SIGINT): stop taking calls, give calls in flight a short grace, cancel
stagings, unlink every segment and the socket. Clients that mapped a segment keep their
tensors (see ``staging``).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from loader.errors import LoaderError
from loader.sidecar._proto import loader_pb2_grpc as pb_grpc
from loader.sidecar.config import LoaderConfig, keepalive_options
from loader.sidecar.metrics import LoaderMetrics
from loader.sidecar.service import LoaderService
from loader.sidecar.staging import Stager
from loader.sources.base import Source
from loader.stream import StreamOptions

__all__ = ["LOADER_SERVICE", "SidecarServer"]

LOADER_SERVICE = "shoal.loader.v1.Loader"  # the proto's package and service

log = logging.getLogger("shoal." + __name__)


class SidecarServer:
    def __init__(self, config: LoaderConfig) -> None:
        config.check_serving()  # ValueError: mutual TLS or --insecure-clients off loopback
        self.config = config
        runtime = config.runtime_path
        runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(runtime, 0o700)
        self._lock_fd = self._lock(runtime / f"shoal-loader-{config.name}.lock")
        self._stopped = threading.Event()
        self._metrics_server: Any = None
        try:
            self.metrics = LoaderMetrics(lambda: self.stager.statistics())  # noqa: PLW0108 (made next)
            self.stager = Stager(
                config.shm_dir, config.segment_prefix(), config.capacity_bytes,
                open_source=self._open_source,
                options=StreamOptions(concurrency=config.concurrency,
                                      chunk_bytes=config.chunk_bytes),
                rate_bytes_per_s=float(config.rate_bytes_per_s),
                allow=config.allow_rules,
                events=self.metrics,
            )  # fmt: skip
            stale = self.stager.remove_stale_segments()
            if stale:
                log.warning("removed segments a dead sidecar left", extra={"count": stale})
            self._server = grpc.server(
                ThreadPoolExecutor(config.workers, thread_name_prefix="shoal-rpc"),
                options=[("grpc.so_reuseport", 0),
                         *keepalive_options(config.keepalive_time_s, config.keepalive_timeout_s)],
                maximum_concurrent_rpcs=config.rpc_limit,
            )  # fmt: skip
            pb_grpc.add_LoaderServicer_to_server(  # type: ignore[no-untyped-call]
                LoaderService(self.stager, progress_interval_s=config.progress_interval_s,
                              max_streams=config.stream_slots, metrics=self.metrics),
                self._server,
            )  # fmt: skip
            self._health = _standard_health(self._server)
            self.target = self._bind()
            self._serve_metrics()
        except BaseException:
            os.close(self._lock_fd)
            raise

    @staticmethod
    def _lock(path: Path) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LoaderError(
                f"another loader sidecar holds {path}; stop it or choose another --name"
            ) from None
        return fd

    def _open_source(self, uri: str) -> tuple[Source, str | None]:
        from loader.sources import open_source

        options: dict[str, Any] = {}
        if uri.startswith("s3://") and self.config.s3_endpoint:
            options["endpoint_url"] = self.config.s3_endpoint
        if uri.startswith(("http://", "https://")) and self.config.redirect_hosts:
            hosts = self.config.redirect_hosts.split(",")
            options["redirect_hosts"] = [h.strip() for h in hosts if h.strip()]
        return open_source(uri, **options)

    def _bind(self) -> str:
        config = self.config
        socket_path = config.socket_path
        if socket_path is not None:
            socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            socket_path.unlink(missing_ok=True)  # stale: the lock proves no sidecar owns it
            address = f"unix:{socket_path}"
            port = self._add_port(address, None)
        else:
            host, wanted = config.tcp_address
            address = f"[{host}]:{wanted}" if ":" in host else f"{host}:{wanted}"
            credentials = None
            if config.tls_cert:
                try:
                    key = Path(config.tls_key).read_bytes()
                    chain = Path(config.tls_cert).read_bytes()
                    clients = (
                        Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
                    )
                except OSError as exc:
                    raise LoaderError(f"cannot read a TLS key, certificate or CA: {exc}") from None
                credentials = grpc.ssl_server_credentials(
                    [(key, chain)], root_certificates=clients, require_client_auth=bool(clients)
                )
            port = self._add_port(address, credentials)
        if port == 0:
            raise LoaderError(f"cannot listen on {address}")
        return config.target

    def _add_port(self, address: str, credentials: grpc.ServerCredentials | None) -> int:
        try:
            if credentials is None:
                return int(self._server.add_insecure_port(address))
            return int(self._server.add_secure_port(address, credentials))
        except RuntimeError as exc:
            raise LoaderError(f"cannot listen on {address}: {exc}") from None

    def _serve_metrics(self) -> None:
        """The Prometheus endpoint (``loader.sidecar.metrics``), if a port is configured;
        a port in use is a ``LoaderError`` naming it, not a traceback."""
        port = self.config.metrics_port
        if not port:
            return
        from prometheus_client import start_http_server

        try:
            self._metrics_server, _ = start_http_server(
                port, addr=self.config.metrics_host, registry=self.metrics.registry
            )
        except OSError as exc:
            self._server.stop(0)
            raise LoaderError(
                f"cannot serve metrics on {self.config.metrics_host}:{port}: {exc.strerror}; "
                "choose another --metrics-port (0 = none)"
            ) from None

    def start(self) -> None:
        if self.config.reachable_from_other_hosts and not self.config.tls_client_ca:
            log.warning(
                "listening on a port other hosts can reach without client certificates "
                "(--insecure-clients): any client that reaches it can Prefetch (within "
                "--allow), Read and Evict; give --tls-client-ca to admit only clients with "
                "a certificate its CA signed",
                extra={"listen": self.config.listen},
            )
        self._server.start()
        log.info(
            "loader sidecar ready",
            extra={"target": self.target, "tls": bool(self.config.tls_cert),
                   "mutual_tls": bool(self.config.tls_client_ca),
                   "capacity_bytes": self.config.capacity_bytes, "pid": os.getpid()},
        )  # fmt: skip

    def stop(self) -> None:
        self._stopped.set()

    def serve_forever(self, *, handle_signals: bool = True) -> None:
        if handle_signals:
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda *_: self.stop())
        self.start()
        try:
            self._stopped.wait()
        finally:
            self.close()

    def close(self) -> None:
        if self._health is not None:
            self._health.enter_graceful_shutdown()  # probes see NOT_SERVING while we drain
        self._server.stop(grace=1.0).wait()
        self.stager.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self.config.socket_path is not None:
            self.config.socket_path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
        log.info("loader sidecar stopped")


def _standard_health(server: grpc.Server) -> Any:
    """Register ``grpc.health.v1.Health`` (SERVING); ``None`` without grpcio-health-checking."""
    try:
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    except ImportError:
        log.warning("grpcio-health-checking is not installed: no grpc.health.v1 service")
        return None
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", LOADER_SERVICE):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer
