"""Prometheus metrics of a cluster member (``shoal_kvcache_cluster_*``) and of the engines'
KV-event feed (``shoal_kvcache_engine_*``, label ``engine``: gpu0, gpu1, ...).

==================================================  =========  ==============================
metric                                              type       labels
==================================================  =========  ==============================
shoal_kvcache_cluster_events_published_total        counter    -
shoal_kvcache_cluster_events_applied_total          counter    -
shoal_kvcache_cluster_messages_dropped_total        counter    reason (malformed, version,
                                                               forbidden, impersonation,
                                                               serve_bound, late_reply, ...)
shoal_kvcache_cluster_syncs_total                   counter    kind (replay, snapshot)
shoal_kvcache_cluster_fetch_blocks_total            counter    result (ok, miss, checksum, ...)
shoal_kvcache_cluster_fetch_bytes_total             counter    -
shoal_kvcache_cluster_served_blocks_total           counter    -
shoal_kvcache_cluster_members                       gauge      -
shoal_kvcache_cluster_index_blocks                  gauge      -
shoal_kvcache_cluster_propagation_seconds           histogram  -
shoal_kvcache_engine_batches_total                  counter    engine
shoal_kvcache_engine_events_total                   counter    engine, kind (stored, removed,
                                                               cleared)
shoal_kvcache_engine_dropped_total                  counter    engine, reason (frames, seq,
                                                               malformed, unknown_event)
shoal_kvcache_engine_skipped_blocks_total           counter    engine, reason (lora, medium,
                                                               unknown_parent, ...)
shoal_kvcache_engine_gaps_total                     counter    engine
shoal_kvcache_engine_replays_total                  counter    engine, result (asked,
                                                               complete, timeout)
shoal_kvcache_engine_resets_total                   counter    engine, reason (restart,
                                                               disconnect, hole, malformed)
shoal_kvcache_engine_connected                      gauge      engine
shoal_kvcache_engine_gpu_keys                       gauge      engine
==================================================  =========  ==============================
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ClusterMetrics", "EngineMetrics"]


class ClusterMetrics:
    """``shoal_kvcache_cluster_*`` metrics, registered in the daemon's registry."""

    def total(self, counter: str, **labels: str) -> float:
        """Sum of a counter over the label values matching ``labels`` (for status)."""
        name = f"shoal_kvcache_cluster_{counter}_total"
        return sum(
            sample.value
            for metric in self._registry.collect()
            for sample in metric.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"shoal_kvcache_cluster_{name}", doc, labels, registry=registry)

        self.events_published = counter("events_published", "Block events published")
        self.events_applied = counter("events_applied", "Peer block events applied to the index")
        self.dropped = counter("messages_dropped", "Cluster frames dropped", ["reason"])
        self.syncs = counter("syncs", "Resyncs asked of peers, by answer kind", ["kind"])
        self.fetched = counter("fetch_blocks", "Peer-fetched blocks by result", ["result"])
        self.fetched_bytes = counter("fetch_bytes", "Bytes fetched from peers")
        self.served = counter("served_blocks", "Blocks sent to fetching peers")
        self.members = Gauge("shoal_kvcache_cluster_members", "Live peers", registry=registry)
        self.index_blocks = Gauge(
            "shoal_kvcache_cluster_index_blocks", "Peer blocks in the index", registry=registry
        )
        self.propagation = Histogram(
            "shoal_kvcache_cluster_propagation_seconds",
            "Event age when applied here (publisher's record to our index)",
            buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.5, 2.0),
            registry=registry,
        )


class EngineMetrics:
    """``shoal_kvcache_engine_*``: what the daemon learns from its engines' KV events."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(
                f"shoal_kvcache_engine_{name}", doc, ["engine", *labels], registry=registry
            )

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"shoal_kvcache_engine_{name}", doc, ["engine"], registry=registry)

        self.batches = counter("batches", "vLLM KV-event batches applied")
        self.events = counter("events", "vLLM KV events applied, by kind", ["kind"])
        self.dropped = counter("dropped", "vLLM KV-event messages dropped", ["reason"])
        self.skipped = counter(
            "skipped_blocks", "vLLM blocks not mapped to Shoal keys, by reason", ["reason"]
        )
        self.gaps = counter("gaps", "Sequence gaps in a vLLM KV-event stream")
        self.replays = counter("replays", "Replays asked of a vLLM publisher", ["result"])
        self.resets = counter("resets", "Times an engine's GPU entries were dropped", ["reason"])
        self.connected = gauge("connected", "1 while connected to the engine's publisher")
        self.gpu_keys = gauge("gpu_keys", "Shoal keys on the engine's GPU")
