"""NvmlBackend's mapping from NVML calls to GpuSnapshot fields, on a scripted NVML module
(pynvml's own constants and error classes; no GPU needed), and NVML missing on this host."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest

pynvml = pytest.importorskip("pynvml")

from control.health.errors import BackendError, NvmlUnavailable  # noqa: E402
from control.health.nvml import NvmlBackend  # noqa: E402
from control.health.report import collect  # noqa: E402
from control.health.types import GpuSnapshot, XidEvent  # noqa: E402
from control.health.xid import XidLedger  # noqa: E402

NS = pynvml.NVML_ERROR_NOT_SUPPORTED
UNKNOWN = pynvml.NVML_ERROR_UNKNOWN
LOST = pynvml.NVML_ERROR_GPU_IS_LOST
BAD_ARG = pynvml.NVML_ERROR_INVALID_ARGUMENT


class Err:
    """A scripted NVML failure."""

    def __init__(self, code: int) -> None:
        self.code = code


def h100(override: dict[tuple[Any, ...], Any] | None = None) -> dict[tuple[Any, ...], Any]:
    """Readings of one healthy H100 keyed by (function, *args after the handle)."""
    p = pynvml
    corr, unc = p.NVML_MEMORY_ERROR_TYPE_CORRECTED, p.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    vol, agg = p.NVML_VOLATILE_ECC, p.NVML_AGGREGATE_ECC
    mem = "nvmlDeviceGetMemoryErrorCounter"
    readings: dict[tuple[Any, ...], Any] = {
        ("nvmlDeviceGetUUID",): "GPU-abc",
        ("nvmlDeviceGetName",): b"NVIDIA H100 80GB HBM3",
        ("nvmlDeviceGetPciInfo",): types.SimpleNamespace(busId=b"00000000:1B:00.0"),
        ("nvmlDeviceGetArchitecture",): 9,
        ("nvmlDeviceGetCurrPcieLinkGeneration",): 5,
        ("nvmlDeviceGetMaxPcieLinkGeneration",): 5,
        ("nvmlDeviceGetCurrPcieLinkWidth",): 16,
        ("nvmlDeviceGetMaxPcieLinkWidth",): 16,
        ("nvmlDeviceGetTotalEccErrors", corr, vol): 3,
        ("nvmlDeviceGetTotalEccErrors", unc, vol): 0,
        ("nvmlDeviceGetTotalEccErrors", corr, agg): 30,
        ("nvmlDeviceGetTotalEccErrors", unc, agg): 1,
        (mem, unc, vol, p.NVML_MEMORY_LOCATION_SRAM): 0,
        (mem, unc, vol, p.NVML_MEMORY_LOCATION_DRAM): 0,
        (mem, corr, vol, p.NVML_MEMORY_LOCATION_DRAM): 2,
        (mem, unc, agg, p.NVML_MEMORY_LOCATION_L1_CACHE): Err(NS),
        (mem, unc, agg, p.NVML_MEMORY_LOCATION_L2_CACHE): 0,
        (mem, unc, agg, p.NVML_MEMORY_LOCATION_REGISTER_FILE): 0,
        (
            "nvmlDeviceGetRetiredPages",
            p.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
        ): Err(NS),
        ("nvmlDeviceGetRetiredPages", p.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR): Err(NS),
        ("nvmlDeviceGetRetiredPagesPendingStatus",): Err(NS),
        ("nvmlDeviceGetRemappedRows",): (4, 1, 1, 0),
        ("nvmlDeviceGetTemperature", p.NVML_TEMPERATURE_GPU): 41,
        ("nvmlDeviceGetTemperatureThreshold", p.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN): 87,
        ("nvmlDeviceGetTemperatureThreshold", p.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN): Err(UNKNOWN),
        ("nvmlDeviceGetCurrentClocksEventReasons",): 0x1 | 0x4,
    }
    for link in range(3):  # three links; NVML rejects the fourth
        readings[("nvmlDeviceGetNvLinkState", link)] = 0 if link == 1 else p.NVML_FEATURE_ENABLED
        for counter, count in zip(
            (
                p.NVML_NVLINK_ERROR_DL_REPLAY,
                p.NVML_NVLINK_ERROR_DL_RECOVERY,
                p.NVML_NVLINK_ERROR_DL_CRC_FLIT,
            ),
            (link, 10 * link, 100 * link),
            strict=True,
        ):
            readings[("nvmlDeviceGetNvLinkErrorCounter", link, counter)] = count
    readings[("nvmlDeviceGetNvLinkState", 3)] = Err(BAD_ARG)
    readings.update(override or {})
    return readings


class ScriptedNvml:
    """The subset of pynvml NvmlBackend calls, answering from per-GPU readings."""

    def __init__(
        self, devices: list[dict[tuple[Any, ...], Any]], init_error: int | None = None
    ) -> None:
        self.devices = devices
        self.init_error = init_error
        self.events: list[Any] = []
        self.registered: list[int] = []
        self.calls: list[str] = []

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("scripted_pynvml")
        for name in dir(pynvml):
            if name.startswith(("NVML_", "nvmlEventType", "NVMLError")):
                setattr(mod, name, getattr(pynvml, name))
        seen: set[str] = set()
        for device in self.devices:
            seen.update(key[0] for key in device)
        for fn in seen:
            setattr(mod, fn, self._reading(fn))
        mod.nvmlInit = self._init  # type: ignore[attr-defined]
        mod.nvmlShutdown = lambda: self.calls.append("shutdown")  # type: ignore[attr-defined]
        mod.nvmlDeviceGetCount = lambda: len(self.devices)  # type: ignore[attr-defined]
        mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
        mod.nvmlDeviceGetHandleByIndex = self._handle  # type: ignore[attr-defined]
        mod.nvmlDeviceGetIndex = lambda handle: handle  # type: ignore[attr-defined]
        mod.nvmlEventSetCreate = lambda: "set"  # type: ignore[attr-defined]
        mod.nvmlEventSetFree = lambda s: self.calls.append(f"free {s}")  # type: ignore[attr-defined]
        mod.nvmlDeviceRegisterEvents = self._register  # type: ignore[attr-defined]
        mod.nvmlEventSetWait_v2 = self._wait  # type: ignore[attr-defined]
        return mod

    def _init(self) -> None:
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)

    def _handle(self, index: int) -> int:
        if not 0 <= index < len(self.devices):
            raise pynvml.NVMLError(BAD_ARG)
        return index

    def _reading(self, fn: str) -> Callable[..., Any]:
        def call(handle: int, *args: Any) -> Any:
            value = self.devices[handle].get((fn, *args), Err(NS))
            if isinstance(value, Err):
                raise pynvml.NVMLError(value.code)
            return value

        return call

    def _register(self, handle: int, mask: int, event_set: str) -> None:
        assert mask == pynvml.nvmlEventTypeXidCriticalError and event_set == "set"
        if handle == 1:
            raise pynvml.NVMLError(NS)
        self.registered.append(handle)

    def _wait(self, event_set: str, timeout_ms: int) -> Any:
        self.calls.append(f"wait {timeout_ms}")
        if not self.events:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)
        event = self.events.pop(0)
        if isinstance(event, Err):
            raise pynvml.NVMLError(event.code)
        return event


def event(index: int, xid: int, kind: int = pynvml.nvmlEventTypeXidCriticalError) -> Any:
    return types.SimpleNamespace(device=index, eventType=kind, eventData=xid)


def test_every_snapshot_field_comes_from_its_nvml_call() -> None:
    backend = NvmlBackend(nvml=ScriptedNvml([h100()]).module())
    assert backend.device_count() == 1 and backend.driver_version() == "550.54.15"
    assert backend.snapshot(0) == GpuSnapshot(
        index=0,
        uuid="GPU-abc",
        name="NVIDIA H100 80GB HBM3",
        pci_bus_id="00000000:1B:00.0",
        architecture=9,
        link_gen_current=5,
        link_gen_max=5,
        link_width_current=16,
        link_width_max=16,
        ecc_volatile_sbe=3,
        ecc_volatile_dbe=0,
        ecc_aggregate_sbe=30,
        ecc_aggregate_dbe=1,
        sram_ue=0,
        dram_ue=0,
        dram_ce=2,
        uncorrectable_l1=None,  # NOT_SUPPORTED
        uncorrectable_l2=0,
        uncorrectable_reg=0,
        retired_pages_sbe=None,  # page retirement: not on Hopper
        retired_pages_dbe=None,
        retired_pages_pending=None,
        remapped_rows_correctable=4,
        remapped_rows_uncorrectable=1,
        remapping_pending=True,
        remapping_failure=False,
        temperature_c=41,
        slowdown_temp_c=87,
        shutdown_temp_c=None,
        throttle_reasons=0x5,
        nvlink_active=(True, False, True),
        nvlink_errors=(0, 111, 222),
        unreadable=("shutdown_temp_c",),
    )


def test_pre_ampere_readings_and_older_bindings() -> None:
    p = pynvml
    old = h100(
        {
            (
                "nvmlDeviceGetRetiredPages",
                p.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS,
            ): [1, 2],
            ("nvmlDeviceGetRetiredPages", p.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR): [3],
            ("nvmlDeviceGetRetiredPagesPendingStatus",): p.NVML_FEATURE_ENABLED,
            ("nvmlDeviceGetRemappedRows",): Err(NS),
            ("nvmlDeviceGetCurrentClocksThrottleReasons",): 0x40,
            ("nvmlDeviceGetNvLinkState", 0): Err(NS),
        }
    )
    del old[("nvmlDeviceGetCurrentClocksEventReasons",)]
    module = ScriptedNvml([old]).module()
    snap = NvmlBackend(nvml=module).snapshot(0)
    assert (snap.retired_pages_sbe, snap.retired_pages_dbe, snap.retired_pages_pending) == (
        2,
        1,
        True,
    )
    assert (snap.remapping_pending, snap.remapped_rows_correctable) == (None, None)
    assert snap.throttle_reasons == 0x40
    assert (snap.nvlink_active, snap.nvlink_errors) == ((), ())


def test_a_lost_gpu_is_a_backend_error_for_that_gpu() -> None:
    lost = h100({("nvmlDeviceGetTemperature", pynvml.NVML_TEMPERATURE_GPU): Err(LOST)})
    backend = NvmlBackend(nvml=ScriptedNvml([h100(), lost]).module())
    with pytest.raises(BackendError, match="GPU 1 is lost") as info:
        backend.snapshot(1)
    assert info.value.index == 1
    with pytest.raises(BackendError, match="GPU 2: nvmlDeviceGetHandleByIndex"):
        backend.snapshot(2)
    health = collect(backend, node="n", ledger=XidLedger(clock=lambda: 0.0), expect_gpus=2, now=1.0)
    assert [(g.index, g.healthy) for g in health.gpus] == [(0, False), (1, False)]
    # GPU 0: a lifetime DBE, a pending remap, a power cap, a link down, 222 errors on link 2,
    # the shutdown threshold that failed to read
    assert [(p.check, p.severity.value) for p in health.gpus[0].problems] == [
        ("ecc", "warning"),
        ("row_remap", "critical"),
        ("throttle", "info"),
        ("nvlink", "warning"),  # one link of three down: partly bridged
        ("nvlink", "warning"),
        ("unreadable", "warning"),
    ]
    assert [p.check for p in health.gpus[1].problems] == ["unreadable"]


def test_xids_arrive_through_the_event_set() -> None:
    nvml = ScriptedNvml([h100(), h100(), h100()])
    backend = NvmlBackend(nvml=nvml.module(), clock=lambda: 9.0)
    nvml.events = [
        event(2, 79),
        event(0, 0, kind=pynvml.nvmlEventTypeSingleBitEccError),
        event(0, 48),
    ]
    assert backend.wait_xid(1.5) == [XidEvent(2, 79, 9.0), XidEvent(0, 48, 9.0)]
    assert nvml.registered == [0, 2]  # GPU 1 does not support events: skipped, not fatal
    assert nvml.calls == ["wait 1500", "wait 0", "wait 0", "wait 0"]
    assert backend.wait_xid(0.25) == []
    nvml.events = [Err(UNKNOWN)]
    with pytest.raises(BackendError, match="nvmlEventSetWait"):
        backend.wait_xid(0)
    backend.close()
    backend.close()
    assert nvml.calls[-2:] == ["free set", "shutdown"]


def test_init_failure_is_nvml_unavailable_with_the_code() -> None:
    module = ScriptedNvml([], init_error=pynvml.NVML_ERROR_DRIVER_NOT_LOADED).module()
    with pytest.raises(
        NvmlUnavailable, match="NVML cannot start: Driver Not Loaded \\(code 9\\)"
    ) as info:
        NvmlBackend(nvml=module)
    assert info.value.code == 9


def test_this_host_without_a_gpu_reports_nvml_unavailable() -> None:
    try:
        backend = NvmlBackend()
    except NvmlUnavailable as exc:
        assert "NVML cannot start" in str(exc) and exc.code is not None
        return
    backend.close()
    pytest.skip("this host has a working NVML")


def test_a_link_that_fails_to_read_ends_the_list_and_is_named() -> None:
    flaky = h100({("nvmlDeviceGetNvLinkState", 1): Err(UNKNOWN)})
    snap = NvmlBackend(nvml=ScriptedNvml([flaky]).module()).snapshot(0)
    assert (snap.nvlink_active, snap.nvlink_errors) == ((True,), (0,))
    assert snap.unreadable == ("nvlink_active[1]", "shutdown_temp_c")
