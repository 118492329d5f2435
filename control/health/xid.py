"""XID codes (what each means, how bad it is, what to do) and ``XidLedger``, the record of
XIDs seen per GPU.

An XID is the driver's report of a GPU or application fault (``NVRM: Xid (PCI:...): 79``);
NVML delivers them through its event API (``nvmlEventTypeXidCriticalError``, which despite
the name carries every XID). The table below decides, per code:

* ``critical`` — the GPU is not fit to serve until someone acts (``reset_gpu``: the driver
  asks for a GPU reset, e.g. a pending row remap after XID 63/94/95; ``drain_node``: the
  hardware needs service, e.g. XID 79 "fallen off the bus", XID 64 "remap failed");
* ``warning`` — the *process* on the GPU hit the fault (XID 13/31/43: an application's
  exception, page fault or killed channel). The GPU is fine; the engine may have to restart
  (``restart_engine``), which its own health checks already notice;
* ``info`` — a consequence of an earlier fault (XID 45: channels cleaned up after a kill).

A code missing from the table is ``critical`` with remedy ``reset_gpu``, as NVIDIA's
device plugin treats every XID outside its application-error list (13, 31, 43, 45, 68,
all in the table as warnings or info): a new fatal code (109 context-switch timeout, 143
GPU init failure, the Blackwell NVLink/C2C codes 144-150) must take the GPU out, and a
driver newer than this table is more likely to add fatal codes than harmless ones.
Rejected: unknown = warning (a new fatal XID left the GPU serving).

Sources: NVIDIA's Xid catalogue (docs.nvidia.com/deploy/xid-errors, and for Ampere and
newer its catalogue with resolution buckets RESTART_APP / RESET_GPU / RESTART_BM /
CONTACT_SUPPORT: analyzing-xid-catalog.html); NVIDIA's k8s-device-plugin
(internal/rm/health.go), which treats 13, 31, 43, 45 and 68 as application errors that
leave the GPU healthy and every other XID as making it unhealthy; the critical list in
Shoal issue 15 (48, 63, 64, 74, 79, 92, 94, 95, 119, 120). Where NVIDIA's bucket is
RESET_GPU we say ``reset_gpu``; where the fault is in the hardware or the bus (64, 79)
``drain_node``. Deviation from the device
plugin: 32 and 69 are warnings here (an application's corrupt push buffer or bad class
call is far more common than the bus fault 32 can also mean; XID 79 catches the latter).

Ledger invariant: a critical XID stays in ``problems(index)`` until ``clear(index)``; a
non-critical XID leaves ``window_s`` after it was last seen. How a critical XID clears,
exactly: the watcher calls ``clear`` only on ``POST /v1/clear {"gpu": I}`` (an operator, or
automation, after resetting the GPU or restarting its engine); nothing clears it on its
own (no reset detection yet: a reset GPU stays out until someone posts). The ledger lives
in the watcher's memory only: a watcher restart (a DaemonSet rollout, a crash) forgets
every XID, so an XID-only fault (74, 92, 119, 120: nothing in the readings shows it)
reads healthy again after a restart, unless the watcher keeps the ledger in a state file
(``--state-file``: ``to_json``/``restore``, written atomically after each check that
changed it; bounded like the ledger).
Memory is bounded: at most ``max_codes`` distinct codes per GPU (the least recently seen
non-critical one makes room for a new code; when all are critical a new non-critical one
is dropped and a new critical one replaces the least recently seen) and GPU indexes below
1024. Rejected: a list of every event (unbounded on a flapping GPU).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from control.health.types import Problem, Remedy, Severity, XidEvent

__all__ = ["XID_TABLE", "XidInfo", "XidLedger", "describe"]

MAX_GPU_INDEX = 1024


@dataclass(frozen=True, slots=True)
class XidInfo:
    code: int
    description: str
    severity: Severity
    remedy: Remedy


_C, _W, _I = Severity.CRITICAL, Severity.WARNING, Severity.INFO
_RESTART, _RESET, _DRAIN = Remedy.RESTART_ENGINE, Remedy.RESET_GPU, Remedy.DRAIN_NODE

_ROWS: tuple[tuple[int, str, Severity, Remedy], ...] = (
    (
        13,
        "graphics engine exception (an application fault, e.g. out-of-range access)",
        _W,
        _RESTART,
    ),
    (31, "GPU memory page fault (an application's illegal address)", _W, _RESTART),
    (32, "invalid or corrupted push buffer stream (PCIe or driver trouble)", _W, _RESTART),
    (43, "GPU stopped processing: the application's channel was reset", _W, _RESTART),
    (45, "preemptive cleanup after an earlier fault or a killed process", _I, Remedy.NONE),
    (46, "GPU stopped processing", _C, _RESET),
    (48, "double-bit ECC error (uncorrectable memory error)", _C, _RESET),
    (61, "internal micro-controller breakpoint/warning", _C, _RESET),
    (62, "internal micro-controller halt", _C, _RESET),
    (63, "row remapping / page retirement recorded: reset the GPU to apply it", _C, _RESET),
    (64, "row remapping / page retirement failed", _C, _DRAIN),
    (68, "video decoder (NVDEC) exception", _W, _RESTART),
    (69, "graphics engine class error", _W, _RESTART),
    (74, "NVLink error", _C, _RESET),
    (79, "GPU has fallen off the bus", _C, _DRAIN),
    (92, "high single-bit ECC error rate", _C, _RESET),
    (94, "contained uncorrectable ECC error (the application was stopped)", _C, _RESET),
    (95, "uncontained uncorrectable ECC error (every application on the GPU)", _C, _RESET),
    (119, "GSP RPC timeout", _C, _RESET),
    (120, "GSP error", _C, _RESET),
    (121, "C2C link corrected error", _W, Remedy.NONE),
    (140, "unrecovered ECC error", _C, _RESET),
    (154, "GPU recovery action changed: the driver asks for a reset or a reboot", _C, _RESET),
)

XID_TABLE: Mapping[int, XidInfo] = MappingProxyType(
    {code: XidInfo(code, text, sev, rem) for code, text, sev, rem in _ROWS}
)


def describe(code: int) -> XidInfo:
    """The table's entry, or ``critical`` with remedy ``reset_gpu`` for a code it lacks
    (the device plugin's rule: only the known application errors leave a GPU healthy)."""
    known = XID_TABLE.get(code)
    if known is not None:
        return known
    return XidInfo(code, "not in Shoal's XID table (see NVIDIA's Xid catalogue)", _C, _RESET)


@dataclass(slots=True)
class _Seen:
    count: int
    first: float
    last: float


class XidLedger:
    """XIDs seen per GPU, turned into ``Problem`` values (check ``xid``)."""

    def __init__(
        self,
        *,
        window_s: float = 3600.0,
        max_codes: int = 32,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert window_s > 0 and max_codes > 0, "window_s and max_codes must be positive"
        self._window_s = window_s
        self._max_codes = max_codes
        self._clock = clock
        self._seen: dict[int, dict[int, _Seen]] = {}

    def record(self, event: XidEvent) -> None:
        """Note one event. Events for an index outside [0, 1024) are ignored."""
        if not 0 <= event.index < MAX_GPU_INDEX:
            return
        codes = self._seen.setdefault(event.index, {})
        seen = codes.get(event.xid)
        if seen is not None:
            seen.count += 1
            seen.last = max(seen.last, event.time)
            return
        self._expire(codes)
        if len(codes) >= self._max_codes and not self._evict_one(codes):
            if describe(event.xid).severity is not Severity.CRITICAL:
                return
            # all kept codes are critical: the new critical one replaces the oldest
            del codes[min(codes, key=lambda c: codes[c].last)]
        codes[event.xid] = _Seen(1, event.time, event.time)

    def problems(self, index: int) -> list[Problem]:
        """One problem per XID code seen on GPU ``index`` and not expired, by code."""
        codes = self._seen.get(index)
        if not codes:
            return []
        self._expire(codes)
        out = []
        for code in sorted(codes):
            info, seen = describe(code), codes[code]
            times = "" if seen.count == 1 else f" ({seen.count} times)"
            out.append(
                Problem("xid", info.severity, f"XID {code}: {info.description}{times}", info.remedy)
            )
        return out

    def clear(self, index: int) -> None:
        """Forget GPU ``index``'s XIDs (it was reset, or its engine restarted)."""
        self._seen.pop(index, None)

    def to_json(self) -> dict[str, Any]:
        """The ledger as a JSON document (the watcher's ``--state-file``)."""
        return {
            "version": 1,
            "gpus": {
                str(index): [[code, s.count, s.first, s.last] for code, s in sorted(codes.items())]
                for index, codes in sorted(self._seen.items())
                if codes
            },
        }

    def restore(self, doc: Any) -> None:
        """Record what ``to_json`` wrote (through ``record``, so the bounds hold);
        ``ValueError`` for a document of another shape."""
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ValueError("not an XID ledger document (version 1)")
        gpus = doc.get("gpus")
        if not isinstance(gpus, dict):
            raise ValueError("gpus must be an object")
        for index, rows in gpus.items():
            if not isinstance(index, str) or not index.isdigit() or not isinstance(rows, list):
                raise ValueError(f"bad entry for GPU {index!r}")
            for row in rows:
                if not (
                    isinstance(row, list)
                    and len(row) == 4
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)
                    and isinstance(row[0], int)
                    and isinstance(row[1], int)
                    and row[1] >= 1
                ):
                    raise ValueError(f"bad XID row {row!r} for GPU {index}")
                code, count, first, last = row
                self.record(XidEvent(int(index), code, float(first)))
                seen = self._seen.get(int(index), {}).get(code)
                if seen is not None:
                    seen.count, seen.last = count, max(float(last), seen.last)

    def indexes(self) -> list[int]:
        """GPUs with XIDs on record."""
        return sorted(i for i, codes in self._seen.items() if codes)

    def _expire(self, codes: dict[int, _Seen]) -> None:
        horizon = self._clock() - self._window_s
        for code in [c for c, s in codes.items() if s.last < horizon]:
            if describe(code).severity is not Severity.CRITICAL:
                del codes[code]

    def _evict_one(self, codes: dict[int, _Seen]) -> bool:
        mild = [c for c in codes if describe(c).severity is not Severity.CRITICAL]
        if not mild:
            return False
        del codes[min(mild, key=lambda c: codes[c].last)]
        return True
