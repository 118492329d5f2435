"""The connector's counters and the ``shoal_connector_*`` Prometheus family they feed.

Where the numbers go. vLLM runs the connector's scheduler side in the engine-core process
and its worker side in each worker process, while ``/metrics`` is served by the API server
process; none of them shares a prometheus registry with another. So the connector uses
vLLM's own route for connector telemetry instead of a registry of its own:

    worker  Counters.take_deltas() ─► get_kv_connector_stats() ─► KVConnectorOutput ─┐
    scheduler Counters.take_deltas() ─► get_kv_connector_stats() ─────────────────────┤
                         (vLLM sums workers and scheduler: ShoalConnectorStats.aggregate)
    API server: SchedulerStats.kv_connector_stats ─► build_prom_metrics(...).observe()
                ─► shoal_connector_* in prometheus_client's default REGISTRY (or vLLM's
                   multiprocess collector when PROMETHEUS_MULTIPROC_DIR is set: vLLM hands
                   over its own metric classes), served by vLLM's /metrics

(``kvcache.connector.vllm``). Worker counts are summed over tensor-parallel ranks.

Invariant: counters only grow, and every add happens under one lock, so the save thread
and the engine's thread never lose an update (review m16); ``take_deltas`` hands each
increment out exactly once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

__all__ = ["METRICS", "Counters", "merge"]

METRICS: dict[str, tuple[str, str, str | None]] = {
    # counter key: (metric name without prefix/suffix, help, failure reason or None)
    "lookups": ("lookups", "cache lookups made for waiting requests", None),
    "deferred": ("deferred_lookups", "lookups answered 'not yet' (asked again later)", None),
    "hit_tokens": ("hit_tokens", "prompt tokens the cache supplied (scheduled loads)", None),
    "loaded_chunks": ("loaded_chunks", "chunks loaded into the KV cache and verified", None),
    "loaded_bytes": ("loaded_bytes", "bytes loaded into the KV cache", None),
    "load_seconds": ("load_seconds", "time spent loading (lease, copy, verify)", None),
    "saved_chunks": ("saved_chunks", "chunks saved and committed to the daemon", None),
    "saved_bytes": ("saved_bytes", "bytes copied into the arena for saves", None),
    "save_seconds": ("save_seconds", "time the engine's step spent saving", None),
    "save_skipped": ("skipped_save_chunks", "chunks not saved (daemon down, no space)", None),
    "load_errors": ("load_error_blocks", "vLLM blocks reported as not loaded", None),
    "lookup_failures": ("failures", "connector failures by reason", "lookup_failed"),
    "daemon_failures": ("failures", "connector failures by reason", "daemon_unavailable"),
    "rejected": ("failures", "connector failures by reason", "rejected"),
    "corrupt_chunks": ("failures", "connector failures by reason", "corrupt_chunk"),
    "unkeyable": ("failures", "connector failures by reason", "unkeyable_request"),
    "oversized": ("failures", "connector failures by reason", "chunk_too_large"),
}


class Counters:
    """Monotonic counters written by several threads (one lock; adds are rare and cheap)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float] = dict.fromkeys(names, 0)
        self._taken: dict[str, float] = dict.fromkeys(self._values, 0)

    def add(self, name: str, amount: float = 1) -> None:
        assert name in self._values, f"unknown connector counter {name!r}"
        with self._lock:
            self._values[name] += amount

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._values)

    def take_deltas(self) -> dict[str, float]:
        """What grew since the last call (non-zero entries only)."""
        with self._lock:
            deltas = {k: v - self._taken[k] for k, v in self._values.items() if v != self._taken[k]}
            self._taken = dict(self._values)
        return deltas


def merge(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    """Sum two delta maps (vLLM aggregates workers' and the scheduler's stats)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out
