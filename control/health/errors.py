"""One exception tree for accelerator health (STYLE.md §5)."""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = ["BackendError", "HealthError", "MockFormatError", "NvmlUnavailable"]


class HealthError(ShoalError):
    """Base of every health error."""


class NvmlUnavailable(HealthError):
    """NVML cannot be used: no library, no driver, or its init failed (the fake's
    ``nvml_init_error``). ``code`` is NVML's return value when there is one."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class BackendError(HealthError):
    """One reading failed (a GPU fell off the bus mid-read, NVML lost). ``index`` is the GPU,
    or None for the whole backend."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class MockFormatError(HealthError):
    """A fake-backend TOML file is malformed: the message names the file and the key."""
