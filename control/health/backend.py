"""Where GPU readings come from: one Protocol, two implementations.

::

    open_backend(nvml_mock=None)  -> NvmlBackend (nvml.py, nvidia-ml-py)
    open_backend(nvml_mock=PATH)  -> FakeBackend (fake.py, a TOML file in AIBrix's mock
                                     schema, re-read when it changes)

Both raise ``NvmlUnavailable`` from ``open_backend`` when NVML cannot start (no library,
no driver, the fake's ``nvml_init_error``): the caller reports it as a node-level critical
problem, it does not crash. ``snapshot`` raises ``BackendError`` for a GPU that cannot be
read at all (fallen off the bus); single readings that fail are listed in
``GpuSnapshot.unreadable`` instead.

``wait_xid`` blocks the calling thread up to ``timeout_s`` for NVML's critical-error
events (nvmlEventSetWait) and returns those that arrived ([] on timeout): the watcher
runs it on its own thread, ``shoal health check`` for ``--xid-wait-s``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from control.health.types import GpuSnapshot, XidEvent

__all__ = ["GpuBackend", "open_backend"]


class GpuBackend(Protocol):
    def device_count(self) -> int: ...

    def driver_version(self) -> str: ...

    def snapshot(self, index: int) -> GpuSnapshot: ...

    def wait_xid(self, timeout_s: float) -> list[XidEvent]: ...

    def close(self) -> None: ...


def open_backend(nvml_mock: Path | None = None) -> GpuBackend:
    """NVML, or the fake backend when ``nvml_mock`` names a TOML file."""
    if nvml_mock is not None:
        from control.health.fake import FakeBackend

        return FakeBackend(nvml_mock)
    from control.health.nvml import NvmlBackend

    return NvmlBackend()
