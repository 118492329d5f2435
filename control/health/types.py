"""Values that cross the health modules (frozen, slotted; STYLE.md §4).

A backend reads one ``GpuSnapshot`` per GPU (raw readings; ``None`` = the GPU or driver
does not support it, never "zero") and delivers ``XidEvent`` values from NVML's event
API. The pure checks turn them into ``Problem`` values; ``GpuHealth`` and ``NodeHealth``
are what every tool prints and the watcher serves (``to_json``; ``from_json`` for the
clients, which check every field and raise ``ValueError`` on a malformed document, never
``TypeError``: a wrong-typed field is malformed too). ``parse_report(body)`` is the one
parser of a watcher's answer: JSON that nests too deep for the parser (``RecursionError``)
is a ``ValueError`` as well, so a consumer catches exactly one exception.

Severity: ``critical`` makes a GPU unhealthy (routing stops, groups on it are replaced);
``warning`` is reported and exported only; ``info`` is context (e.g. a power-cap
throttle). Remedy classes, mildest first: ``none``, ``restart_engine`` (the GPU is fine,
the process on it is not: e.g. XID 13/31/43), ``reset_gpu`` (the GPU needs a reset:
pending row remap, XID 48/63/64/94/95), ``drain_node`` (replace hardware: remap failure,
XID 79 fallen off the bus, degraded link).
"""

from __future__ import annotations

import enum
import json
import math
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GpuHealth",
    "GpuSnapshot",
    "NodeHealth",
    "Problem",
    "Remedy",
    "Severity",
    "XidEvent",
    "default_node_name",
    "gpu_name",
    "parse_report",
]


class Severity(enum.StrEnum):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class Remedy(enum.StrEnum):
    NONE = "none"
    RESTART_ENGINE = "restart_engine"
    RESET_GPU = "reset_gpu"
    DRAIN_NODE = "drain_node"


def gpu_name(node: str, index: int) -> str:
    """A GPU's cluster-wide name, ``NODE/gpuINDEX`` (the cache daemon's stream name)."""
    return f"{node}/gpu{index}"


def default_node_name() -> str:
    """The node name when none is given: ``socket.gethostname()`` exactly as it is (full,
    an FQDN where the host is named so; never shortened). The one rule for every side that
    names GPUs ``NODE/gpuI``: the health watcher and ``shoal health check`` without
    ``--node``, and the Ray side without a ``shoal.node`` label (control/ray/actors.py;
    control/ray/group.py reads Ray's ``NodeManagerHostname``, which Ray takes from the same
    call on that node). Rejected: the short name (``split(".")[0]``): Ray reports the full
    one, and two rules meant no GPU name ever matched on FQDN hosts."""
    return socket.gethostname()


@dataclass(frozen=True, slots=True)
class GpuSnapshot:
    """One GPU's readings at one moment. ``None``: not supported or not reported (never 0).
    ``unreadable`` names readings that failed with an error other than "not supported"."""

    index: int
    uuid: str = ""
    name: str = ""
    pci_bus_id: str = ""
    architecture: int | None = None  # nvmlDeviceArchitecture_t (7 = Ampere)
    # PCIe link
    link_gen_current: int | None = None
    link_gen_max: int | None = None
    link_width_current: int | None = None
    link_width_max: int | None = None
    # ECC counters (NVML: volatile = since driver load, aggregate = lifetime)
    ecc_volatile_sbe: int | None = None
    ecc_volatile_dbe: int | None = None
    ecc_aggregate_sbe: int | None = None
    ecc_aggregate_dbe: int | None = None
    # uncorrectable errors by memory location (AIBrix mock: sram_ue, dram_ue, dram_ce,
    # uncorrectable_agg_l1/l2/reg)
    sram_ue: int | None = None
    dram_ue: int | None = None
    dram_ce: int | None = None
    uncorrectable_l1: int | None = None
    uncorrectable_l2: int | None = None
    uncorrectable_reg: int | None = None
    # page retirement (before Ampere) and row remapping (Ampere and newer)
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remapping_pending: bool | None = None
    remapping_failure: bool | None = None
    # thermals and clocks
    temperature_c: int | None = None
    slowdown_temp_c: int | None = None
    shutdown_temp_c: int | None = None
    throttle_reasons: int | None = None  # NVML clocks-event-reasons bitmask
    # NVLink, one entry per link
    nvlink_active: tuple[bool, ...] = ()
    nvlink_errors: tuple[int, ...] = ()  # CRC + replay + recovery errors per link
    unreadable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class XidEvent:
    """One critical-error event NVML delivered: GPU ``index`` had XID ``xid`` at ``time``
    (the watcher's wall clock, seconds)."""

    index: int
    xid: int
    time: float
    uuid: str = ""


_SEVERITIES = {s.value: s for s in Severity}
_REMEDIES = {r.value: r for r in Remedy}


@dataclass(frozen=True, slots=True)
class Problem:
    check: str  # e.g. "ecc", "xid", "pcie_link", "temperature"
    severity: Severity
    detail: str
    remedy: Remedy = Remedy.NONE

    def to_json(self) -> dict[str, str]:
        return {
            "check": self.check,
            "severity": self.severity.value,
            "detail": self.detail,
            "remedy": self.remedy.value,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Problem:
        if not isinstance(doc, Mapping):
            raise ValueError("a problem must be an object")
        check, severity = doc.get("check"), doc.get("severity")
        detail, remedy = doc.get("detail", ""), doc.get("remedy", "none")
        if not isinstance(check, str) or not check:
            raise ValueError("problem.check must be a non-empty string")
        if not isinstance(severity, str) or severity not in _SEVERITIES:
            raise ValueError(f"problem.severity must be one of {sorted(_SEVERITIES)}")
        if not isinstance(remedy, str) or remedy not in _REMEDIES:
            raise ValueError(f"problem.remedy must be one of {sorted(_REMEDIES)}")
        if not isinstance(detail, str):
            raise ValueError("problem.detail must be a string")
        return cls(check, _SEVERITIES[severity], detail, _REMEDIES[remedy])


def _problems(doc: Any, where: str) -> tuple[Problem, ...]:
    if not isinstance(doc, Sequence) or isinstance(doc, str):
        raise ValueError(f"{where}.problems must be a list")
    return tuple(Problem.from_json(p) for p in doc)


@dataclass(frozen=True, slots=True)
class GpuHealth:
    index: int
    uuid: str = ""
    problems: tuple[Problem, ...] = ()

    @property
    def healthy(self) -> bool:
        return not any(p.severity is Severity.CRITICAL for p in self.problems)

    @property
    def remedy(self) -> Remedy:
        """The strongest remedy among critical problems (``none`` when healthy)."""
        order = list(Remedy)
        worst = Remedy.NONE
        for p in self.problems:
            if p.severity is Severity.CRITICAL and order.index(p.remedy) > order.index(worst):
                worst = p.remedy
        return worst

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "uuid": self.uuid,
            "healthy": self.healthy,
            "problems": [p.to_json() for p in self.problems],
        }

    @classmethod
    def from_json(cls, doc: Any) -> GpuHealth:
        if not isinstance(doc, Mapping):
            raise ValueError("a gpu must be an object")
        index, uuid = doc.get("index"), doc.get("uuid", "")
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
            raise ValueError("gpu.index must be an integer in [0, 1024)")
        if not isinstance(uuid, str):
            raise ValueError("gpu.uuid must be a string")
        return cls(index, uuid, _problems(doc.get("problems", []), "gpu"))


@dataclass(frozen=True, slots=True)
class NodeHealth:
    """One node's full check. ``problems`` are node-level (NVML missing, GPU count short);
    a critical node-level problem makes every GPU of the node count as unhealthy."""

    node: str
    time: float
    gpus: tuple[GpuHealth, ...] = ()
    problems: tuple[Problem, ...] = field(default=())

    @property
    def healthy(self) -> bool:
        node_ok = not any(p.severity is Severity.CRITICAL for p in self.problems)
        return node_ok and all(g.healthy for g in self.gpus)

    def unhealthy_gpus(self) -> frozenset[str]:
        """``NODE/gpuI`` of every GPU that is unhealthy (all of them on a sick node)."""
        node_ok = not any(p.severity is Severity.CRITICAL for p in self.problems)
        return frozenset(
            gpu_name(self.node, g.index) for g in self.gpus if not (node_ok and g.healthy)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "time": self.time,
            "healthy": self.healthy,
            "problems": [p.to_json() for p in self.problems],
            "gpus": [g.to_json() for g in self.gpus],
        }

    @classmethod
    def from_json(cls, doc: Any) -> NodeHealth:
        if not isinstance(doc, Mapping):
            raise ValueError("a node health document must be an object")
        node, at = doc.get("node"), doc.get("time", 0.0)
        if not isinstance(node, str) or not node or "/" in node:
            raise ValueError("node must be a non-empty string without '/'")
        if not isinstance(at, (int, float)) or isinstance(at, bool) or not math.isfinite(at):
            raise ValueError("time must be a finite number")
        gpus = doc.get("gpus", [])
        if not isinstance(gpus, Sequence) or isinstance(gpus, str) or len(gpus) > 1024:
            raise ValueError("gpus must be a list of at most 1024 entries")
        return cls(
            node,
            float(at),
            tuple(GpuHealth.from_json(g) for g in gpus),
            _problems(doc.get("problems", []), "node"),
        )


def parse_report(body: bytes | str) -> NodeHealth:
    """A watcher's ``/v1/gpus`` body as a ``NodeHealth``; ``ValueError`` for anything
    malformed (bad UTF-8, bad JSON, JSON nested past the parser's recursion limit, a
    document of the wrong shape or types)."""
    try:
        doc = json.loads(body)
    except RecursionError:
        raise ValueError("JSON nested too deep") from None
    return NodeHealth.from_json(doc)
