"""The watcher's Prometheus series (``shoal_gpu_*``), one registry per watcher.

::

    per GPU, labels {node, gpu, uuid} (gpu = the index as text):
    shoal_gpu_healthy                           gauge    1 healthy, 0 not (node-level critical
                                                         problems make every GPU 0)
    shoal_gpu_problems{check,severity}          gauge    problems of that check on that GPU
    shoal_gpu_temperature_celsius               gauge
    shoal_gpu_ecc_errors{scope,bit}             gauge    NVML's ECC counters: scope volatile
                                                         (since driver load) or aggregate
                                                         (lifetime), bit sbe or dbe
    shoal_gpu_retired_pages{cause}              gauge    cause sbe or dbe (before Ampere)
    shoal_gpu_remapped_rows{kind}               gauge    correctable, uncorrectable (Ampere+)
    shoal_gpu_pcie_link_width{which}            gauge    which current or max
    shoal_gpu_pcie_link_gen{which}              gauge
    shoal_gpu_xid_events_total{xid}             counter  XID events this watcher received
    per node, label {node}:
    shoal_gpu_node_problems{check,severity}     gauge    node-level problems (nvml, gpu count)
    shoal_gpu_check_seconds                     histogram one full check
    shoal_gpu_check_errors_total                counter  rounds whose backend could not be
                                                         opened or was lost, XID watch failures
    shoal_gpu_cordon_actions_total{result}      counter  applied, dry_run, error

Invariant: the per-GPU series are exactly those of the GPUs in the latest check. They are
produced by a custom collector from the latest ``NodeHealth`` and the raw snapshots of that
check, so a GPU that disappears (fell off the bus, NVML lost) has its series removed at the
next check, and a reading the GPU does not support (``None``) is absent, never 0.
Rejected: one labelled ``Gauge`` per reading, which keeps a vanished GPU's last values for
ever unless each label set is remembered and removed by hand.

The ECC, retired-page and remapped-row readings are NVML's own counters, exported as
gauges: the watcher does not count them, NVML does (and a driver reload resets the
volatile ones, which a Prometheus counter must never do).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from control.health.types import GpuSnapshot, NodeHealth, XidEvent

__all__ = ["CORDON_RESULTS", "HealthMetrics"]

CORDON_RESULTS = ("applied", "dry_run", "error")
_GPU_LABELS = ["node", "gpu", "uuid"]


class _GpuCollector(Collector):
    """Series built at scrape time from the latest check (see the module docstring)."""

    def __init__(self) -> None:
        self.health: NodeHealth | None = None
        self.snapshots: Mapping[int, GpuSnapshot] = {}
        self.xids: dict[tuple[int, str, int], int] = {}  # (index, uuid, xid) -> count

    def collect(self) -> Iterator[Metric]:
        health = self.health
        if health is None:
            return
        node = health.node
        healthy = GaugeMetricFamily(
            "shoal_gpu_healthy", "1 if the GPU is healthy.", labels=_GPU_LABELS
        )
        problems = GaugeMetricFamily(
            "shoal_gpu_problems",
            "Problems found on the GPU at the last check.",
            labels=[*_GPU_LABELS, "check", "severity"],
        )
        families: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            if name not in families:
                families[name] = GaugeMetricFamily(name, doc, labels=[*_GPU_LABELS, *extra])
            return families[name]

        sick = health.unhealthy_gpus()
        for gpu in health.gpus:
            labels = [node, str(gpu.index), gpu.uuid]
            healthy.add_metric(labels, 0.0 if f"{node}/gpu{gpu.index}" in sick else 1.0)
            counts: dict[tuple[str, str], int] = {}
            for p in gpu.problems:
                key = (p.check, p.severity.value)
                counts[key] = counts.get(key, 0) + 1
            for (check, severity), n in sorted(counts.items()):
                problems.add_metric([*labels, check, severity], float(n))
            snap = self.snapshots.get(gpu.index)
            if snap is not None:
                _readings(snap, labels, gauge)
        node_problems = GaugeMetricFamily(
            "shoal_gpu_node_problems",
            "Node-level problems (NVML, GPU count) at the last check.",
            labels=["node", "check", "severity"],
        )
        counts = {}
        for p in health.problems:
            key = (p.check, p.severity.value)
            counts[key] = counts.get(key, 0) + 1
        for (check, severity), n in sorted(counts.items()):
            node_problems.add_metric([node, check, severity], float(n))
        yield healthy
        yield problems
        yield node_problems
        yield from families.values()
        xids = CounterMetricFamily(
            "shoal_gpu_xid_events", "XID events received.", labels=[*_GPU_LABELS, "xid"]
        )
        for (index, uuid, xid), n in sorted(self.xids.items()):
            xids.add_metric([node, str(index), uuid, str(xid)], float(n))
        yield xids


def _readings(snap: GpuSnapshot, labels: list[str], gauge: Any) -> None:
    def put(name: str, doc: str, value: int | bool | None, **extra: str) -> None:
        if value is not None:
            family = gauge(name, doc, tuple(extra))
            family.add_metric([*labels, *extra.values()], float(value))

    put("shoal_gpu_temperature_celsius", "GPU temperature.", snap.temperature_c)
    ecc = "NVML ECC error counters."
    put("shoal_gpu_ecc_errors", ecc, snap.ecc_volatile_sbe, scope="volatile", bit="sbe")
    put("shoal_gpu_ecc_errors", ecc, snap.ecc_volatile_dbe, scope="volatile", bit="dbe")
    put("shoal_gpu_ecc_errors", ecc, snap.ecc_aggregate_sbe, scope="aggregate", bit="sbe")
    put("shoal_gpu_ecc_errors", ecc, snap.ecc_aggregate_dbe, scope="aggregate", bit="dbe")
    pages = "Retired memory pages."
    put("shoal_gpu_retired_pages", pages, snap.retired_pages_sbe, cause="sbe")
    put("shoal_gpu_retired_pages", pages, snap.retired_pages_dbe, cause="dbe")
    rows = "Remapped memory rows."
    put("shoal_gpu_remapped_rows", rows, snap.remapped_rows_correctable, kind="correctable")
    put("shoal_gpu_remapped_rows", rows, snap.remapped_rows_uncorrectable, kind="uncorrectable")
    pending = "1 while a row remap awaits a reset."
    put("shoal_gpu_remapping_pending", pending, snap.remapping_pending)
    put("shoal_gpu_remapping_failure", "1 if a row remap failed.", snap.remapping_failure)
    width = "PCIe link width (lanes)."
    put("shoal_gpu_pcie_link_width", width, snap.link_width_current, which="current")
    put("shoal_gpu_pcie_link_width", width, snap.link_width_max, which="max")
    gen = "PCIe link generation."
    put("shoal_gpu_pcie_link_gen", gen, snap.link_gen_current, which="current")
    put("shoal_gpu_pcie_link_gen", gen, snap.link_gen_max, which="max")


class HealthMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._gpus = _GpuCollector()
        r.register(self._gpus)
        self.check_seconds = Histogram(
            "shoal_gpu_check_seconds",
            "Seconds of one full check.",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=r,
        )
        self.check_errors = Counter(
            "shoal_gpu_check_errors",
            "Rounds whose backend could not be opened or was lost; XID watch failures.",
            registry=r,
        )
        self.cordon_actions = Counter(
            "shoal_gpu_cordon_actions", "Cordon actions by result.", ["result"], registry=r
        )
        for result in CORDON_RESULTS:
            self.cordon_actions.labels(result=result)

    def observe(
        self, health: NodeHealth, snapshots: Mapping[int, GpuSnapshot], seconds: float | None
    ) -> None:
        """The latest check: replaces every per-GPU series; XID counts of GPUs no longer
        listed (or listed with another UUID: a different card) are dropped."""
        self._gpus.health = health
        self._gpus.snapshots = dict(snapshots)
        present = {(g.index, g.uuid) for g in health.gpus}
        for key in [k for k in self._gpus.xids if (k[0], k[1]) not in present]:
            del self._gpus.xids[key]
        if seconds is not None:
            self.check_seconds.observe(seconds)

    def count_xid(self, event: XidEvent) -> None:
        """One XID event, labelled with its GPU's UUID from the latest check (the event's
        own when the GPU was not in it)."""
        uuid = event.uuid
        if self._gpus.health is not None:
            uuid = next((g.uuid for g in self._gpus.health.gpus if g.index == event.index), uuid)
        key = (event.index, uuid, event.xid)
        self._gpus.xids[key] = self._gpus.xids.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
