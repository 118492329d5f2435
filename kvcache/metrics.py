"""Prometheus metrics of the cache daemon (all named ``shoal_kvcache_*``).

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
shoal_kvcache_request_seconds                         histogram  op
shoal_kvcache_protocol_errors_total                   counter    code
====================================================  =========  ===========================
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvcache.store import StoreStats

__all__ = ["CacheMetrics"]

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
        yield GaugeMetricFamily("shoal_kvcache_leases", "Leases held by readers", stats.num_leases)
        yield GaugeMetricFamily(
            "shoal_kvcache_reservations", "Slots reserved, not committed", stats.num_reservations
        )
        yield GaugeMetricFamily(
            "shoal_kvcache_sessions", "Connected client sessions", stats.num_sessions
        )


class CacheMetrics:
    """The daemon's registry; one per daemon so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._store = _StoreCollector()
        self.registry.register(self._store)
        self.request_seconds = Histogram(
            "shoal_kvcache_request_seconds",
            "Time to handle one request in the daemon",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "shoal_kvcache_protocol_errors",
            "Requests rejected with an error reply",
            ["code"],
            registry=self.registry,
        )

    def update(self, stats: StoreStats) -> None:
        self._store.snapshot = stats
