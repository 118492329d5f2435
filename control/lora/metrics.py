"""The LoRA manager's Prometheus metrics (``shoal_lora_*``), one registry per manager.

::

    shoal_lora_adapters_registered            gauge     adapters in the registry
    shoal_lora_adapters_loaded{engine}        gauge     adapters each engine lists now
    shoal_lora_engines{state}                 gauge     healthy / unreachable engines
    shoal_lora_loads_total{reason}            counter   loads done: place, replicate,
                                                        restore, wake, manual
    shoal_lora_unloads_total{reason}          counter   unloads done: idle, evict, shrink,
                                                        manual, removed
    shoal_lora_evictions_total                counter   unloads to make room (evict, and a
                                                        wake's eviction)
    shoal_lora_load_failures_total            counter   loads that raised (retried later)
    shoal_lora_load_seconds                   histogram one successful load's latency
    shoal_lora_wakes_total{result}            counter   POST /v1/wake: loaded, already,
                                                        unknown, failed, started (answered
                                                        while the load still runs)
    shoal_lora_round_seconds                  histogram one round: poll, place, apply
    shoal_lora_round_errors_total             counter   rounds that raised (a bug; logged)
    shoal_lora_unplaced_adapters              gauge     adapters with traffic and no room

A registry per instance so tests can run several managers in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["LoraMetrics"]

LOAD_REASONS = ("place", "replicate", "restore", "wake", "manual")
UNLOAD_REASONS = ("idle", "evict", "shrink", "manual", "removed")
WAKE_RESULTS = ("loaded", "already", "unknown", "failed", "started")


class LoraMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.registered = Gauge(
            "shoal_lora_adapters_registered", "Registered adapters.", registry=r
        )
        self.loaded = Gauge(
            "shoal_lora_adapters_loaded", "Adapters an engine lists.", ["engine"], registry=r
        )
        self.engines = Gauge("shoal_lora_engines", "Engines by state.", ["state"], registry=r)
        self.loads = Counter("shoal_lora_loads", "Adapter loads.", ["reason"], registry=r)
        self.unloads = Counter("shoal_lora_unloads", "Adapter unloads.", ["reason"], registry=r)
        self.evictions = Counter("shoal_lora_evictions", "Unloads to make room.", registry=r)
        self.load_failures = Counter(
            "shoal_lora_load_failures", "Loads that failed (retried with backoff).", registry=r
        )
        self.load_seconds = Histogram(
            "shoal_lora_load_seconds",
            "Seconds of one adapter load.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.wakes = Counter("shoal_lora_wakes", "Wakes by result.", ["result"], registry=r)
        self.round_seconds = Histogram(
            "shoal_lora_round_seconds",
            "Seconds of one manager round.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.round_errors = Counter(
            "shoal_lora_round_errors", "Rounds that raised (logged).", registry=r
        )
        self.unplaced = Gauge(
            "shoal_lora_unplaced_adapters", "Adapters with traffic and no room.", registry=r
        )
        for reason in LOAD_REASONS:
            self.loads.labels(reason=reason)
        for reason in UNLOAD_REASONS:
            self.unloads.labels(reason=reason)
        for result in WAKE_RESULTS:
            self.wakes.labels(result=result)
        for state in ("healthy", "unreachable"):
            self.engines.labels(state=state)

    def render(self) -> bytes:
        return generate_latest(self.registry)
