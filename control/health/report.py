"""One full check of a node: a backend's readings + the XID ledger -> ``NodeHealth``.

Invariant: ``collect`` never raises for a GPU fault. A GPU that cannot be read at all
(``BackendError`` from ``snapshot``: fallen off the bus, or a transient NVML error) is
reported as that GPU's critical ``unreadable`` problem (remedy ``reset_gpu``; the
cordoner acts on it only when it persists), its XIDs kept; a
backend that cannot even count its GPUs (NVML lost) is a node-level critical ``nvml``
problem with no GPUs listed. With ``expect_gpus`` N and fewer visible, the indexes up to
N-1 are listed too, each critical ``missing`` (checks.missing_problem), so a consumer
takes their engines out by name (as well as through the node-level ``gpu_count``).
``check_once`` opens the backend itself and turns
``NvmlUnavailable`` into that same node-level problem, so ``shoal health check`` on a
machine without a driver answers "unhealthy: no NVML" instead of crashing.

``check_once`` always drains the XIDs already waiting (``wait_xid(0)``: the fake backend's
listed ones; NVML's queue is empty for a fresh event set), then waits up to
``xid_wait_s`` more for new ones.
"""

from __future__ import annotations

import time
from pathlib import Path

from control.health.backend import GpuBackend, open_backend
from control.health.checks import (
    DEFAULT_THRESHOLDS,
    Thresholds,
    check_gpu,
    check_node,
    missing_problem,
    nvml_problem,
)
from control.health.errors import BackendError, NvmlUnavailable
from control.health.types import GpuHealth, NodeHealth, Problem, Remedy, Severity
from control.health.xid import XidLedger

__all__ = ["check_once", "collect"]


def collect(
    backend: GpuBackend,
    *,
    node: str,
    ledger: XidLedger,
    expect_gpus: int | None,
    now: float,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> NodeHealth:
    try:
        num_gpus = backend.device_count()
    except BackendError as exc:
        return NodeHealth(node, now, (), (nvml_problem(f"cannot count the GPUs: {exc}"),))
    gpus = []
    for index in range(num_gpus):
        xids = ledger.problems(index)
        try:
            snap = backend.snapshot(index)
        except BackendError as exc:
            # reset_gpu, not drain_node: one failed handle read is often transient; the
            # cordoner treats it as fallen off the bus when it persists (cordon.py)
            lost = Problem("unreadable", Severity.CRITICAL, str(exc), Remedy.RESET_GPU)
            gpus.append(GpuHealth(index, "", (*xids, lost)))
            continue
        gpus.append(GpuHealth(index, snap.uuid, tuple(check_gpu(snap, xids, thresholds))))
    for index in range(num_gpus, expect_gpus or 0):  # expected but not visible
        gone = missing_problem(num_gpus, expect_gpus or 0)
        gpus.append(GpuHealth(index, "", (*ledger.problems(index), gone)))
    return NodeHealth(node, now, tuple(gpus), tuple(check_node(num_gpus, expect_gpus)))


def check_once(
    *,
    nvml_mock: Path | None,
    node: str,
    expect_gpus: int | None,
    xid_wait_s: float = 0.0,
    now: float,
) -> NodeHealth:
    """Open the backend, gather XIDs for ``xid_wait_s``, check every GPU, close."""
    try:
        backend = open_backend(nvml_mock)
    except NvmlUnavailable as exc:
        return NodeHealth(node, now, (), (nvml_problem(str(exc)),))
    try:
        ledger = XidLedger(clock=lambda: now)
        deadline = time.monotonic() + max(0.0, xid_wait_s)
        while True:
            try:
                events = backend.wait_xid(max(0.0, deadline - time.monotonic()))
            except BackendError:  # NVML lost: collect reports it
                break
            for event in events:
                ledger.record(event)
            if time.monotonic() >= deadline:
                break
        return collect(backend, node=node, ledger=ledger, expect_gpus=expect_gpus, now=now)
    finally:
        backend.close()
