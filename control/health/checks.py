"""Pure checks: one ``GpuSnapshot`` (+ the XID problems the ledger holds for it) -> the
``Problem`` list for that GPU; node-level checks for NVML and the GPU count.

A reading that is ``None`` (not supported) is never a finding; a reading that failed is
(check ``unreadable``, warning). Every rule, with its severity and remedy:

=============  ========================================================  ========  ===========
check          rule                                                      severity  remedy
=============  ========================================================  ========  ===========
pcie_link      width current <= max x ``link_width_critical_fraction``   critical  drain_node
               (default 1/4: x4 or less on an x16 card)
pcie_link      width current < max                                       warning   none
pcie_link      generation current < max (idle GPUs downshift to save     info      none
               power, so this alone is no fault)
ecc            volatile DBE > 0 (since driver load)                      critical  reset_gpu
ecc            aggregate DBE > 0, volatile DBE 0 (lifetime history: the  warning   none
               remap/retirement checks say whether action is pending)
ecc            volatile SBE >= ``sbe_volatile_warn`` (1000)              warning   none
ecc            aggregate SBE >= ``sbe_aggregate_warn`` (10000)           warning   none
memory         SRAM uncorrectable > 0                                    critical  reset_gpu
memory         DRAM uncorrectable > 0                                    critical  reset_gpu
memory         DRAM correctable >= ``sbe_volatile_warn``                 warning   none
memory         L1 / L2 / register-file uncorrectable (aggregate) > 0     warning   none
retired_pages  retirement pending                                        critical  reset_gpu
retired_pages  SBE + DBE retired pages >= ``retired_pages_max`` (60,     critical  drain_node
               NVIDIA's replacement threshold)
retired_pages  DBE retired pages > 0 (already retired: history)          warning   none
row_remap      remap failure                                             critical  drain_node
row_remap      remap pending                                             critical  reset_gpu
temperature    >= shutdown threshold                                     critical  drain_node
temperature    >= slowdown threshold                                     warning   none
throttle       HW slowdown / HW thermal / HW power brake                 warning   none
throttle       SW thermal slowdown / SW power cap                        info      none
               (idle, application clocks, sync boost, display: nothing)
nvlink         some links down while others are up (bridges partly       warning   none
               fitted on PCIe boards, or a link lost)
nvlink         every link down (no bridge, or the fabric is down)        warning   none
nvlink         one link's errors >= ``nvlink_errors_critical`` (10000)   warning   none
               ("high"; counters since driver load: see Choices)
nvlink         one link's errors >= ``nvlink_errors_warn`` (100)         warning   none
unreadable     a reading failed (not "not supported")                    warning   none
gpu_count      fewer GPUs than ``--expect-gpus``                         critical  drain_node
gpu_count      more GPUs than ``--expect-gpus``                          warning   none
nvml           NVML cannot start or was lost                             critical  drain_node
=============  ========================================================  ========  ===========

NVLink findings are never critical. A PCIe board with NVLink bridges (A100 PCIe, H100
NVL) reports the links without a bridge as inactive, so "some down" is the normal state
of a partly bridged node, and a reset cannot change it; a link that really failed shows
in XID 74 (critical, in the XID table) and in the engine's own errors. The error counters
(replay + recovery + CRC) count since the driver loaded, so a fixed limit is crossed by
any healthy fabric in time and then stays crossed until a driver reload: they are
warnings only. Rejected for now: critical on growth between two checks (needs each GPU's
previous snapshot in the pure check; the way to make them critical again), and critical
only for a link that was up earlier in this process (the same).

Choices: lifetime counters (aggregate DBE, DBE-retired pages) are warnings, not critical:
after the reset that applies a retirement the counter stays, and a critical finding on it
would keep a repaired GPU out of service for ever. Rejected: AIBrix's "any width mismatch
is unhealthy" (an x8 link halves host bandwidth but serves; x4 or less is broken).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from control.health.types import GpuSnapshot, Problem, Remedy, Severity

__all__ = [
    "THROTTLE_REASONS",
    "Thresholds",
    "check_gpu",
    "check_node",
    "missing_problem",
    "nvml_problem",
    "throttle_names",
]

# NVML's clocks-event (throttle) reason bits, nvmlClocksEventReason*.
THROTTLE_REASONS: Mapping[str, int] = MappingProxyType(
    {
        "gpu_idle": 0x1,
        "applications_clocks_setting": 0x2,
        "sw_power_cap": 0x4,
        "hw_slowdown": 0x8,
        "sync_boost": 0x10,
        "sw_thermal_slowdown": 0x20,
        "hw_thermal_slowdown": 0x40,
        "hw_power_brake_slowdown": 0x80,
        "display_clock_setting": 0x100,
    }
)
_THROTTLE_WARN = ("hw_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown")
_THROTTLE_INFO = ("sw_thermal_slowdown", "sw_power_cap")

_C, _W, _I = Severity.CRITICAL, Severity.WARNING, Severity.INFO


@dataclass(frozen=True, slots=True)
class Thresholds:
    link_width_critical_fraction: float = 0.25
    sbe_volatile_warn: int = 1000
    sbe_aggregate_warn: int = 10000
    retired_pages_max: int = 60
    nvlink_errors_warn: int = 100
    nvlink_errors_critical: int = 10000

    def __post_init__(self) -> None:
        if not 0 < self.link_width_critical_fraction < 1:
            raise ValueError("link_width_critical_fraction must be in (0, 1)")
        if not 0 < self.nvlink_errors_warn <= self.nvlink_errors_critical:
            raise ValueError("need 0 < nvlink_errors_warn <= nvlink_errors_critical")
        for name in ("sbe_volatile_warn", "sbe_aggregate_warn", "retired_pages_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


DEFAULT_THRESHOLDS = Thresholds()


def throttle_names(mask: int) -> list[str]:
    """The reason names set in ``mask``, in bit order (unknown bits as ``0x...``)."""
    names = [name for name, bit in THROTTLE_REASONS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_REASONS.values())
    return names + ([f"{rest:#x}"] if rest else [])


def check_gpu(
    snap: GpuSnapshot,
    xid_problems: Iterable[Problem] = (),
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> list[Problem]:
    """Every finding for one GPU: its XIDs first, then the readings' checks in table order."""
    out = list(xid_problems)
    for rule in (_pcie, _ecc, _memory, _retired, _remap, _temperature, _throttle, _nvlink):
        out.extend(rule(snap, thresholds))
    out.extend(Problem("unreadable", _W, f"cannot read {name}") for name in snap.unreadable)
    return out


def check_node(num_gpus: int, expect_gpus: int | None) -> list[Problem]:
    """The GPU-count check (NVML's own is ``nvml_problem``)."""
    if expect_gpus is None or num_gpus == expect_gpus:
        return []
    if num_gpus < expect_gpus:
        detail = f"{num_gpus} GPUs visible, {expect_gpus} expected"
        return [Problem("gpu_count", _C, detail, Remedy.DRAIN_NODE)]
    return [Problem("gpu_count", _W, f"{num_gpus} GPUs visible, only {expect_gpus} expected")]


def missing_problem(visible: int, wanted: int) -> Problem:
    """The finding on each GPU index in ``visible..wanted-1`` (``wanted``: ``--expect-gpus``
    or the GPUs seen earlier). NVML numbers the visible GPUs densely, so the index of the
    one that went away cannot be known: the top indexes are listed, and the node-level
    critical ``gpu_count`` makes every GPU of the node unhealthy anyway. Remedy
    ``drain_node`` while some GPUs are visible (one fell off the bus: hardware); ``none``
    when none is (more often the watcher's pod without the driver mounted, which must
    not cordon a whole cluster; the node-level problem says drain)."""
    detail = f"not visible: {visible} of {wanted} GPUs"
    return Problem("missing", _C, detail, Remedy.DRAIN_NODE if visible else Remedy.NONE)


def nvml_problem(reason: str) -> Problem:
    return Problem("nvml", _C, reason, Remedy.DRAIN_NODE)


def _pcie(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    out = []
    cur, top = s.link_width_current, s.link_width_max
    if cur is not None and top is not None and cur < top:
        detail = f"PCIe link width x{cur}, the card supports x{top}"
        if cur <= top * t.link_width_critical_fraction:
            out.append(Problem("pcie_link", _C, detail, Remedy.DRAIN_NODE))
        else:
            out.append(Problem("pcie_link", _W, detail))
    gen, gen_max = s.link_gen_current, s.link_gen_max
    if gen is not None and gen_max is not None and gen < gen_max:
        detail = f"PCIe link generation {gen}, max {gen_max} (normal while idle)"
        out.append(Problem("pcie_link", _I, detail))
    return out


def _ecc(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    out = []
    if s.ecc_volatile_dbe:
        detail = f"{s.ecc_volatile_dbe} double-bit ECC errors since the driver loaded"
        out.append(Problem("ecc", _C, detail, Remedy.RESET_GPU))
    elif s.ecc_aggregate_dbe:
        detail = f"{s.ecc_aggregate_dbe} double-bit ECC errors in the GPU's lifetime"
        out.append(Problem("ecc", _W, detail))
    if s.ecc_volatile_sbe is not None and s.ecc_volatile_sbe >= t.sbe_volatile_warn:
        detail = f"{s.ecc_volatile_sbe} single-bit ECC errors since the driver loaded"
        out.append(Problem("ecc", _W, detail))
    if s.ecc_aggregate_sbe is not None and s.ecc_aggregate_sbe >= t.sbe_aggregate_warn:
        detail = f"{s.ecc_aggregate_sbe} single-bit ECC errors in the GPU's lifetime"
        out.append(Problem("ecc", _W, detail))
    return out


def _memory(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    out = []
    if s.sram_ue:
        detail = f"{s.sram_ue} uncorrectable ECC errors in SRAM"
        out.append(Problem("memory", _C, detail, Remedy.RESET_GPU))
    if s.dram_ue:
        detail = f"{s.dram_ue} uncorrectable ECC errors in DRAM"
        out.append(Problem("memory", _C, detail, Remedy.RESET_GPU))
    if s.dram_ce is not None and s.dram_ce >= t.sbe_volatile_warn:
        out.append(Problem("memory", _W, f"{s.dram_ce} correctable ECC errors in DRAM"))
    for where, count in (
        ("L1 cache", s.uncorrectable_l1),
        ("L2 cache", s.uncorrectable_l2),
        ("register file", s.uncorrectable_reg),
    ):
        if count:
            detail = f"{count} uncorrectable ECC errors in the {where} (lifetime)"
            out.append(Problem("memory", _W, detail))
    return out


def _retired(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    out = []
    if s.retired_pages_pending:
        detail = "a page retirement is pending: reset the GPU to apply it"
        out.append(Problem("retired_pages", _C, detail, Remedy.RESET_GPU))
    total = (s.retired_pages_sbe or 0) + (s.retired_pages_dbe or 0)
    if total >= t.retired_pages_max:
        detail = f"{total} pages retired (replace the GPU at {t.retired_pages_max})"
        out.append(Problem("retired_pages", _C, detail, Remedy.DRAIN_NODE))
    elif s.retired_pages_dbe:
        out.append(Problem("retired_pages", _W, f"{s.retired_pages_dbe} pages retired for DBE"))
    return out


def _remap(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    out = []
    if s.remapping_failure:
        detail = "row remapping failed: the memory cannot be repaired"
        out.append(Problem("row_remap", _C, detail, Remedy.DRAIN_NODE))
    if s.remapping_pending:
        detail = "a row remap is pending: reset the GPU to apply it"
        out.append(Problem("row_remap", _C, detail, Remedy.RESET_GPU))
    return out


def _temperature(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    temp = s.temperature_c
    if temp is None:
        return []
    if s.shutdown_temp_c is not None and temp >= s.shutdown_temp_c:
        detail = f"{temp} C, at or above the shutdown threshold {s.shutdown_temp_c} C"
        return [Problem("temperature", _C, detail, Remedy.DRAIN_NODE)]
    if s.slowdown_temp_c is not None and temp >= s.slowdown_temp_c:
        detail = f"{temp} C, at or above the slowdown threshold {s.slowdown_temp_c} C"
        return [Problem("temperature", _W, detail)]
    return []


def _throttle(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    if not s.throttle_reasons:
        return []
    names = throttle_names(s.throttle_reasons)
    out = []
    hard = [n for n in names if n in _THROTTLE_WARN]
    soft = [n for n in names if n in _THROTTLE_INFO]
    if hard:
        out.append(Problem("throttle", _W, "clocks held down by " + ", ".join(hard)))
    if soft:
        out.append(Problem("throttle", _I, "clocks held down by " + ", ".join(soft)))
    return out


def _nvlink(s: GpuSnapshot, t: Thresholds) -> list[Problem]:
    out = []
    down = [i for i, up in enumerate(s.nvlink_active) if not up]
    if down and len(down) < len(s.nvlink_active):
        detail = f"NVLink links down: {', '.join(map(str, down))} of {len(s.nvlink_active)}"
        out.append(Problem("nvlink", _W, detail))
    elif down:
        out.append(Problem("nvlink", _W, f"all {len(down)} NVLink links are down"))
    worst = max(range(len(s.nvlink_errors)), key=lambda i: s.nvlink_errors[i], default=None)
    if worst is not None:
        errors = s.nvlink_errors[worst]
        detail = f"NVLink link {worst}: {errors} CRC/replay/recovery errors"
        if errors >= t.nvlink_errors_critical:
            out.append(Problem("nvlink", _W, detail + " (high; counted since driver load)"))
        elif errors >= t.nvlink_errors_warn:
            out.append(Problem("nvlink", _W, detail))
    return out
