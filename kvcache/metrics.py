"""Prometheus metrics of the cache daemon (all named ``shoal_kvcache_*``) and its HTTP port.

Counters and gauges that the store already keeps are not double-booked: a custom
collector turns the latest ``StoreStats`` snapshot (refreshed by the daemon thread, so
the scrape thread never walks live dictionaries) into metric families at scrape time.
Only the request latency histogram and protocol-error counter are observed directly.

====================================================  =========  ===========================
metric                                                type       labels
====================================================  =========  ===========================
shoal_kvcache_hits_total                              counter    tier (where the hit was)
shoal_kvcache_misses_total                            counter    -
shoal_kvcache_bytes_in_total / _bytes_out_total       counter    tier
shoal_kvcache_evictions_total                         counter    tier
shoal_kvcache_blocks / _used_bytes / _capacity_bytes  gauge      tier
shoal_kvcache_fragmentation_ratio                     gauge      tier
shoal_kvcache_leases / _reservations / _sessions      gauge      -
shoal_kvcache_no_space_total                          counter    -
shoal_kvcache_checksum_failures_total                 counter    -
shoal_kvcache_expired_reservations_total              counter    -
shoal_kvcache_io_errors_total                         counter    - (a tier's read/write failed)
shoal_kvcache_callback_errors_total                   counter    - (a tier move's completion
                                                                 or a read parked on it raised)
shoal_kvcache_dropped_total                           counter    - (blocks forgotten: evicted
                                                                 from the bottom tier, deleted,
                                                                 corrupt or lost to I/O errors)
shoal_kvcache_sessions_ended_total                    counter    reason (bye, ttl, exit)
shoal_kvcache_resident_bytes                          gauge      - (the daemon's RSS)
shoal_kvcache_gc_frozen_objects                       gauge      - (see the daemon's gc note)
shoal_kvcache_request_seconds                         histogram  op
shoal_kvcache_protocol_errors_total                   counter    code
====================================================  =========  ===========================

The same HTTP port (``metrics_port``) answers the probes an orchestrator asks:

``/healthz``  200 while the process is alive and its loop turned within ``health_stall_s``
              (a loop stuck on one request for longer is unhealthy: restart it), else 503.
``/readyz``   200 once the arena is reserved, the socket bound and the cluster (if any)
              joined, and until a shutdown or drain starts (then 503: send no new work).

Probe answers are computed by callables the daemon passes in, read from the HTTP thread:
they only read a float and a few flags the daemon thread writes, never the store.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from kvcache.store import StoreStats

__all__ = ["CacheMetrics", "Probe", "ProbeServer"]

Probe = Callable[[], tuple[bool, str]]  # (ok, reason shown in the body)

_LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0,
)  # fmt: skip


class _StoreCollector(Collector):
    def __init__(self) -> None:
        self.snapshot: StoreStats | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.snapshot
        if stats is None:
            return
        per_tier = {
            ("hits_total", "counter", "Blocks served, by the tier they were found in"): "hits",
            ("bytes_in_total", "counter", "Bytes written into a tier"): "bytes_in",
            ("bytes_out_total", "counter", "Bytes read out of a tier"): "bytes_out",
            ("evictions_total", "counter", "Blocks evicted from a tier"): "evictions",
            ("blocks", "gauge", "Blocks resident in a tier"): "num_blocks",
            ("used_bytes", "gauge", "Bytes of allocated slots in a tier"): "used_bytes",
            ("capacity_bytes", "gauge", "Capacity of a tier"): "capacity_bytes",
            ("fragmentation_ratio", "gauge", "Share of class-owned bytes holding no payload"):
                "fragmentation",
        }  # fmt: skip
        for (name, kind, doc), attr in per_tier.items():
            family_cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            full = f"shoal_kvcache_{name.removesuffix('_total')}"
            family = family_cls(full, doc, labels=["tier"])
            for tier in stats.tiers:
                family.add_metric([tier.tier], getattr(tier, attr))
            yield family
        yield CounterMetricFamily(
            "shoal_kvcache_misses", "Blocks asked for but not served", stats.misses
        )
        yield CounterMetricFamily(
            "shoal_kvcache_no_space", "Reservations refused for lack of space", stats.no_space
        )
        yield CounterMetricFamily(
            "shoal_kvcache_checksum_failures",
            "Blocks dropped for a bad checksum",
            stats.checksum_failures,
        )
        yield CounterMetricFamily(
            "shoal_kvcache_expired_reservations",
            "Uncommitted slots reclaimed",
            stats.expired_reservations,
        )
        yield CounterMetricFamily(
            "shoal_kvcache_io_errors", "Tier reads or writes that failed", stats.io_errors
        )
        yield CounterMetricFamily(
            "shoal_kvcache_dropped", "Committed blocks the store forgot", stats.dropped
        )
        yield CounterMetricFamily(
            "shoal_kvcache_callback_errors",
            "Tier-move completions or reads parked on them that raised (logged)",
            stats.callback_errors,
        )
        yield GaugeMetricFamily("shoal_kvcache_leases", "Leases held by readers", stats.num_leases)
        yield GaugeMetricFamily(
            "shoal_kvcache_reservations", "Slots reserved, not committed", stats.num_reservations
        )
        yield GaugeMetricFamily(
            "shoal_kvcache_sessions", "Connected client sessions", stats.num_sessions
        )


class _ProcessCollector(Collector):
    """Read at scrape time: both values are safe to read from another thread."""

    def collect(self) -> Iterator[Metric]:
        try:
            with open("/proc/self/statm") as statm:
                rss = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            rss = 0
        yield GaugeMetricFamily(
            "shoal_kvcache_resident_bytes", "Resident memory of the daemon process", rss
        )
        yield GaugeMetricFamily(
            "shoal_kvcache_gc_frozen_objects",
            "Objects moved out of garbage collection by gc.freeze",
            gc.get_freeze_count(),
        )


class CacheMetrics:
    """The daemon's registry; one per daemon so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._store = _StoreCollector()
        self.registry.register(self._store)
        self.registry.register(_ProcessCollector())
        self.sessions_ended = Counter(
            "shoal_kvcache_sessions_ended",
            "Client sessions ended: bye (the client said so), ttl (silent for session_ttl_s), "
            "exit (its process exited, seen through a pidfd)",
            ["reason"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "shoal_kvcache_request_seconds",
            "Time to handle one request in the daemon",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._latency: dict[str, Histogram] = {}
        self.protocol_errors = Counter(
            "shoal_kvcache_protocol_errors",
            "Requests rejected with an error reply",
            ["code"],
            registry=self.registry,
        )

    def request_latency(self, op: str) -> Histogram:
        """The ``request_seconds`` child of ``op``, looked up once per op: ``labels()``
        validates and locks on every call, microseconds per request (issue 17). ``op``
        comes from a decoded request, so there are as many children as ops."""
        child = self._latency.get(op)
        if child is None:
            child = self._latency[op] = self.request_seconds.labels(op)
        return child

    def update(self, stats: StoreStats) -> None:
        self._store.snapshot = stats


class ProbeServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on one port, served from a thread.

    Binding happens in the constructor, so a port already in use is an ``OSError`` there
    (the daemon turns it into a one-line startup error), never a traceback later.
    """

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, *, health: Probe, ready: Probe
    ) -> None:
        probes = {"/healthz": health, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path in ("/metrics", "/"):
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path in probes:
                    ok, reason = probes[path]()
                    self._reply(200 if ok else 503, f"{reason}\n".encode(), "text/plain")
                else:
                    self._reply(
                        404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"
                    )

            def _reply(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood the daemon's log

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="shoal-metrics", daemon=True
        )
        self._thread.start()

    def shutdown(self) -> None:
        self._server.shutdown()
        self._server.server_close()
