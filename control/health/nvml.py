"""``NvmlBackend``: the GpuBackend over NVML, through nvidia-ml-py (``pynvml``).

Every ``GpuSnapshot`` field and the NVML call it comes from::

    uuid, name, pci_bus_id     nvmlDeviceGetUUID / GetName / GetPciInfo().busId
    architecture               nvmlDeviceGetArchitecture
    link_gen_current / _max    nvmlDeviceGetCurrPcieLinkGeneration / GetMaxPcieLinkGeneration
    link_width_current / _max  nvmlDeviceGetCurrPcieLinkWidth / GetMaxPcieLinkWidth
    ecc_{volatile,aggregate}_  nvmlDeviceGetTotalEccErrors(CORRECTED|UNCORRECTED,
        {sbe,dbe}                                         VOLATILE_ECC|AGGREGATE_ECC)
    sram_ue, dram_ue, dram_ce  nvmlDeviceGetMemoryErrorCounter(UNCORRECTED|CORRECTED,
                                   VOLATILE_ECC, MEMORY_LOCATION_SRAM|DRAM)
    uncorrectable_l1/l2/reg    nvmlDeviceGetMemoryErrorCounter(UNCORRECTED, AGGREGATE_ECC,
                                   L1_CACHE|L2_CACHE|REGISTER_FILE)
    retired_pages_sbe / _dbe   len(nvmlDeviceGetRetiredPages(MULTIPLE_SINGLE_BIT|DOUBLE_BIT))
    retired_pages_pending      nvmlDeviceGetRetiredPagesPendingStatus == FEATURE_ENABLED
    remapped_rows_*, remapping_pending / _failure   nvmlDeviceGetRemappedRows
    temperature_c              nvmlDeviceGetTemperature(TEMPERATURE_GPU)
    slowdown / shutdown_temp_c nvmlDeviceGetTemperatureThreshold(THRESHOLD_SLOWDOWN|SHUTDOWN)
    throttle_reasons           nvmlDeviceGetCurrentClocksEventReasons (older bindings:
                                   GetCurrentClocksThrottleReasons)
    nvlink_active              nvmlDeviceGetNvLinkState(link) for link < NVML_NVLINK_MAX_LINKS
                                   until NOT_SUPPORTED / INVALID_ARGUMENT (no such link)
    nvlink_errors              sum of nvmlDeviceGetNvLinkErrorCounter(link, DL_REPLAY,
                                   DL_RECOVERY, DL_CRC_FLIT)

Error mapping (at this one edge, STYLE.md §7): ``NVML_ERROR_NOT_SUPPORTED`` -> ``None``
(e.g. page retirement on Ampere, row remapping before it, ECC counters with ECC off);
``NVML_ERROR_GPU_IS_LOST`` from any reading -> ``BackendError`` for the whole GPU (it fell
off the bus); any other error -> the field stays ``None`` and its name goes into
``unreadable``. ``nvmlInit`` failing (no library, no driver) -> ``NvmlUnavailable``.

XIDs: one event set (``nvmlEventSetCreate``) with every GPU registered for
``nvmlEventTypeXidCriticalError`` (created on the first ``wait_xid``);
``nvmlEventSetWait_v2`` waits, ``NVML_ERROR_TIMEOUT`` means none; after one event the
queue is drained without waiting (at most 64 per call). The NVML module is injected
(``nvml=``) so the mapping is unit-tested without a GPU.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from control.health.errors import BackendError, NvmlUnavailable
from control.health.types import GpuSnapshot, XidEvent

__all__ = ["NvmlBackend"]

log = logging.getLogger("shoal." + __name__)

_MAX_EVENTS_PER_WAIT = 64


class _Lost(Exception):
    """NVML_ERROR_GPU_IS_LOST while reading one GPU."""


class NvmlBackend:
    def __init__(
        self, *, nvml: ModuleType | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._nv: Any = nvml if nvml is not None else _import_pynvml()
        self._clock = clock
        try:
            self._nv.nvmlInit()
        except self._nv.NVMLError as exc:
            code = getattr(exc, "value", None)
            raise NvmlUnavailable(
                f"NVML cannot start: {exc} (code {code}): no NVIDIA driver or GPU here?", code
            ) from None
        self._lock = threading.Lock()
        self._events: Any = None
        self._closed = False

    # ---- the Protocol ----

    def device_count(self) -> int:
        try:
            return int(self._nv.nvmlDeviceGetCount())
        except self._nv.NVMLError as exc:
            raise BackendError(f"nvmlDeviceGetCount: {exc}") from None

    def driver_version(self) -> str:
        try:
            return _text(self._nv.nvmlSystemGetDriverVersion())
        except self._nv.NVMLError as exc:
            raise BackendError(f"nvmlSystemGetDriverVersion: {exc}") from None

    def snapshot(self, index: int) -> GpuSnapshot:
        try:
            return self._snapshot(index)
        except _Lost as exc:
            raise BackendError(f"GPU {index} is lost ({exc}): fallen off the bus?", index) from None

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        nv = self._nv
        with self._lock:
            if self._events is None:
                self._events = self._register_events()
            events = self._events
        out: list[XidEvent] = []
        wait_ms = max(0, int(timeout_s * 1000))
        while len(out) < _MAX_EVENTS_PER_WAIT:
            try:
                data = nv.nvmlEventSetWait_v2(events, wait_ms)
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) == nv.NVML_ERROR_TIMEOUT:
                    break
                raise BackendError(f"nvmlEventSetWait: {exc}") from None
            wait_ms = 0
            if not data.eventType & nv.nvmlEventTypeXidCriticalError:
                continue
            try:
                index = int(nv.nvmlDeviceGetIndex(data.device))
            except nv.NVMLError as exc:
                log.warning("XID %s from a GPU whose index cannot be read: %s", data.eventData, exc)
                continue
            out.append(XidEvent(index, int(data.eventData), self._clock()))
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            events, self._events = self._events, None
        try:
            if events is not None:
                self._nv.nvmlEventSetFree(events)
            self._nv.nvmlShutdown()
        except self._nv.NVMLError as exc:
            log.warning("NVML shutdown: %s", exc)

    # ---- readings ----

    def _register_events(self) -> Any:
        nv = self._nv
        try:
            events = nv.nvmlEventSetCreate()
        except nv.NVMLError as exc:
            raise BackendError(f"nvmlEventSetCreate: {exc}") from None
        for index in range(self.device_count()):
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                nv.nvmlDeviceRegisterEvents(handle, nv.nvmlEventTypeXidCriticalError, events)
            except nv.NVMLError as exc:  # e.g. NOT_SUPPORTED on some boards: no XIDs from it
                log.warning("GPU %d: XID events unavailable: %s", index, exc)
        return events

    def _snapshot(self, index: int) -> GpuSnapshot:
        nv = self._nv
        try:
            h = nv.nvmlDeviceGetHandleByIndex(index)
        except nv.NVMLError as exc:
            raise BackendError(f"GPU {index}: nvmlDeviceGetHandleByIndex: {exc}", index) from None
        unreadable: list[str] = []

        def read(field: str, fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return fn(h, *args)
            except nv.NVMLError as exc:
                code = getattr(exc, "value", None)
                if code == nv.NVML_ERROR_NOT_SUPPORTED:
                    return None
                if code == nv.NVML_ERROR_GPU_IS_LOST:
                    raise _Lost(str(exc)) from None
                if field not in unreadable:
                    unreadable.append(field)
                return None

        corrected, uncorrected = (
            nv.NVML_MEMORY_ERROR_TYPE_CORRECTED,
            nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
        )
        volatile, aggregate = nv.NVML_VOLATILE_ECC, nv.NVML_AGGREGATE_ECC
        ecc = nv.nvmlDeviceGetTotalEccErrors
        location = nv.nvmlDeviceGetMemoryErrorCounter
        pci = read("pci_bus_id", nv.nvmlDeviceGetPciInfo)
        retired = nv.nvmlDeviceGetRetiredPages
        sbe_cause = nv.NVML_PAGE_RETIREMENT_CAUSE_MULTIPLE_SINGLE_BIT_ECC_ERRORS
        dbe_cause = nv.NVML_PAGE_RETIREMENT_CAUSE_DOUBLE_BIT_ECC_ERROR
        pending = read("retired_pages_pending", nv.nvmlDeviceGetRetiredPagesPendingStatus)
        rows = read("remapped_rows", nv.nvmlDeviceGetRemappedRows)
        reasons_fn = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or (
            nv.nvmlDeviceGetCurrentClocksThrottleReasons
        )
        active, errors = self._nvlinks(read)
        sbe_pages = read("retired_pages_sbe", retired, sbe_cause)
        dbe_pages = read("retired_pages_dbe", retired, dbe_cause)
        return GpuSnapshot(
            index=index,
            uuid=_text(read("uuid", nv.nvmlDeviceGetUUID) or ""),
            name=_text(read("name", nv.nvmlDeviceGetName) or ""),
            pci_bus_id=_text(pci.busId) if pci is not None else "",
            architecture=read("architecture", nv.nvmlDeviceGetArchitecture),
            link_gen_current=read("link_gen_current", nv.nvmlDeviceGetCurrPcieLinkGeneration),
            link_gen_max=read("link_gen_max", nv.nvmlDeviceGetMaxPcieLinkGeneration),
            link_width_current=read("link_width_current", nv.nvmlDeviceGetCurrPcieLinkWidth),
            link_width_max=read("link_width_max", nv.nvmlDeviceGetMaxPcieLinkWidth),
            ecc_volatile_sbe=read("ecc_volatile_sbe", ecc, corrected, volatile),
            ecc_volatile_dbe=read("ecc_volatile_dbe", ecc, uncorrected, volatile),
            ecc_aggregate_sbe=read("ecc_aggregate_sbe", ecc, corrected, aggregate),
            ecc_aggregate_dbe=read("ecc_aggregate_dbe", ecc, uncorrected, aggregate),
            sram_ue=read("sram_ue", location, uncorrected, volatile, nv.NVML_MEMORY_LOCATION_SRAM),
            dram_ue=read("dram_ue", location, uncorrected, volatile, nv.NVML_MEMORY_LOCATION_DRAM),
            dram_ce=read("dram_ce", location, corrected, volatile, nv.NVML_MEMORY_LOCATION_DRAM),
            uncorrectable_l1=read(
                "uncorrectable_l1",
                location,
                uncorrected,
                aggregate,
                nv.NVML_MEMORY_LOCATION_L1_CACHE,
            ),
            uncorrectable_l2=read(
                "uncorrectable_l2",
                location,
                uncorrected,
                aggregate,
                nv.NVML_MEMORY_LOCATION_L2_CACHE,
            ),
            uncorrectable_reg=read(
                "uncorrectable_reg",
                location,
                uncorrected,
                aggregate,
                nv.NVML_MEMORY_LOCATION_REGISTER_FILE,
            ),
            retired_pages_sbe=None if sbe_pages is None else len(sbe_pages),
            retired_pages_dbe=None if dbe_pages is None else len(dbe_pages),
            retired_pages_pending=None if pending is None else pending == nv.NVML_FEATURE_ENABLED,
            remapped_rows_correctable=None if rows is None else int(rows[0]),
            remapped_rows_uncorrectable=None if rows is None else int(rows[1]),
            remapping_pending=None if rows is None else bool(rows[2]),
            remapping_failure=None if rows is None else bool(rows[3]),
            temperature_c=read(
                "temperature_c", nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU
            ),
            slowdown_temp_c=read(
                "slowdown_temp_c",
                nv.nvmlDeviceGetTemperatureThreshold,
                nv.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
            ),
            shutdown_temp_c=read(
                "shutdown_temp_c",
                nv.nvmlDeviceGetTemperatureThreshold,
                nv.NVML_TEMPERATURE_THRESHOLD_SHUTDOWN,
            ),
            throttle_reasons=read("throttle_reasons", reasons_fn),
            nvlink_active=active,
            nvlink_errors=errors,
            unreadable=tuple(unreadable),
        )

    def _nvlinks(self, read: Callable[..., Any]) -> tuple[tuple[bool, ...], tuple[int, ...]]:
        """Link states and error sums, for the links the GPU has: the first link NVML
        answers NOT_SUPPORTED or INVALID_ARGUMENT for ends the list (both mean "no such
        link"); another error ends it too and names the link in ``unreadable``."""
        nv = self._nv
        active: list[bool] = []
        errors: list[int] = []
        counters = (nv.NVML_NVLINK_ERROR_DL_REPLAY, nv.NVML_NVLINK_ERROR_DL_RECOVERY,
                    nv.NVML_NVLINK_ERROR_DL_CRC_FLIT)  # fmt: skip
        for link in range(nv.NVML_NVLINK_MAX_LINKS):
            try:
                state = self._link_state(read, link)
            except _NoSuchLink:
                break
            active.append(state == nv.NVML_FEATURE_ENABLED)
            counts = [read(f"nvlink_errors[{link}]", nv.nvmlDeviceGetNvLinkErrorCounter, link, c)
                      for c in counters]  # fmt: skip
            errors.append(sum(c for c in counts if c is not None))
        return tuple(active), tuple(errors)

    def _link_state(self, read: Callable[..., Any], link: int) -> Any:
        nv = self._nv
        sentinel: list[Any] = []

        def state(h: Any, link: int) -> Any:
            try:
                return nv.nvmlDeviceGetNvLinkState(h, link)
            except nv.NVMLError as exc:
                if getattr(exc, "value", None) in (
                    nv.NVML_ERROR_INVALID_ARGUMENT,
                    nv.NVML_ERROR_NOT_SUPPORTED,
                ):
                    sentinel.append(exc)
                    return None
                raise

        value = read(f"nvlink_active[{link}]", state, link)
        if sentinel or value is None:
            raise _NoSuchLink
        return value


class _NoSuchLink(Exception):
    pass


def _import_pynvml() -> Any:
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("nvidia-ml-py is missing: pip install 'shoal[control]'") from None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
