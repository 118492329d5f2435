"""Prometheus metrics of the loader sidecar (M10), served on ``--metrics-port`` (0, the
default, serves none; ``--metrics-host`` defaults to 127.0.0.1).

Names and labels (all ``shoal_loader_*``)::

    shoal_loader_stagings_total{outcome}          counter  stagings that ended: outcome is
                                                           ready, failed or cancelled
    shoal_loader_staged_bytes_total{source}       counter  bytes staged into shared memory,
                                                           by source: local, s3, http, peer
    shoal_loader_stage_seconds                    histogram  seconds from request to ready
    shoal_loader_reads_served_total{rpc}          counter  streaming calls served to the end:
                                                           Load, Prefetch (a table handed
                                                           out), Read (a peer's range)
    shoal_loader_read_bytes_served_total          counter  bytes sent to peers by Read
    shoal_loader_errors_total{kind}               counter  calls that ended in an error, by
                                                           its class (CapacityExceeded,
                                                           AccessDenied, ObjectNotFound, ...)
    shoal_loader_capacity_bytes                   gauge    the configured capacity
    shoal_loader_staged_bytes                     gauge    bytes of ready checkpoints
    shoal_loader_staging_bytes                    gauge    bytes reserved by stagings under way
    shoal_loader_checkpoints                      gauge    checkpoints held (staging or ready)

The gauges are read from ``Stager.statistics()`` at scrape time (a collector), so they are
never out of date and cost nothing between scrapes. Events come up as calls on a
``StagingEvents`` the stager is given (the null one, ``NO_EVENTS``, by default): the stager
knows nothing of Prometheus. One registry per sidecar (not the global one), so tests can
run several in a process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from loader.sidecar.staging import StagerStatistics

__all__ = ["NO_EVENTS", "LoaderMetrics", "StagingEvents", "source_label"]

_STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class StagingEvents(Protocol):
    """What the stager reports as stagings end."""

    def staged(self, uri: str, nbytes: int, seconds: float) -> None: ...

    def ended(self, outcome: str) -> None: ...


class _NoEvents:
    def staged(self, uri: str, nbytes: int, seconds: float) -> None:
        pass

    def ended(self, outcome: str) -> None:
        pass


NO_EVENTS: StagingEvents = _NoEvents()


def source_label(uri: str) -> str:
    """The ``source`` label of a checkpoint URI: its scheme, ``local`` for paths."""
    if uri.startswith(("peer://", "peer+unix://")):
        return "peer"
    if uri.startswith(("http://", "https://")):
        return "http"
    if uri.startswith("s3://"):
        return "s3"
    return "local"


class _Gauges(Collector):
    def __init__(self, statistics: Callable[[], StagerStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        yield GaugeMetricFamily(
            "shoal_loader_capacity_bytes", "Configured shared-memory capacity",
            stats.capacity_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "shoal_loader_staged_bytes", "Bytes of ready checkpoints", stats.staged_bytes
        )
        yield GaugeMetricFamily(
            "shoal_loader_staging_bytes", "Bytes reserved by stagings under way",
            stats.staging_bytes,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "shoal_loader_checkpoints", "Checkpoints held (staging or ready)",
            stats.num_checkpoints,
        )  # fmt: skip


class LoaderMetrics:
    """The sidecar's metrics, in their own registry; also its ``StagingEvents``."""

    def __init__(self, statistics: Callable[[], StagerStatistics]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stagings = Counter(
            "shoal_loader_stagings", "Stagings that ended, by outcome", ["outcome"], registry=r
        )
        self.staged_bytes = Counter(
            "shoal_loader_staged_bytes", "Bytes staged into shared memory, by source",
            ["source"], registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "shoal_loader_stage_seconds", "Seconds from request to ready",
            buckets=_STAGE_BUCKETS, registry=r,
        )  # fmt: skip
        self.reads_served = Counter(
            "shoal_loader_reads_served", "Streaming calls served to the end", ["rpc"],
            registry=r,
        )  # fmt: skip
        self.read_bytes_served = Counter(
            "shoal_loader_read_bytes_served", "Bytes sent to peers by Read", registry=r
        )
        self.errors = Counter(
            "shoal_loader_errors", "Calls that ended in an error, by kind", ["kind"], registry=r
        )
        r.register(_Gauges(statistics))

    # StagingEvents
    def staged(self, uri: str, nbytes: int, seconds: float) -> None:
        self.staged_bytes.labels(source_label(uri)).inc(nbytes)
        self.stage_seconds.observe(seconds)

    def ended(self, outcome: str) -> None:
        self.stagings.labels(outcome).inc()

    # calls from the service
    def served(self, rpc: str, nbytes: int = 0) -> None:
        self.reads_served.labels(rpc).inc()
        if nbytes:
            self.read_bytes_served.inc(nbytes)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()
