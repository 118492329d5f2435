"""``FakeBackend``: the GpuBackend read from a TOML fault file (mockfile.py's schema).

Invariants: the file is re-read whenever its (mtime, size, inode) changes, so
``shoal health inject`` on a running watcher takes effect at its next reading; a re-read
that fails to parse keeps the last good file (logged once per change: a human half-way
through an edit must not flap every GPU); each XID listed under a card's ``xids`` is
delivered by ``wait_xid`` exactly once (position-based: the list only grows by
injection; a shorter list — cleared — resets the count to its new length).

``nvml_init_error`` at construction raises ``NvmlUnavailable`` (as nvmlInit would); set
later, every ``device_count`` raises ``BackendError`` (NVML lost). ``fail_read`` makes
``snapshot`` of that card raise ``BackendError`` (fallen off the bus).

``wait_xid`` polls the file every ``poll_s`` (50 ms) until an XID appears or the timeout
passes. Rejected: inotify (Linux only, and a new dependency for a test tool).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from control.health.errors import BackendError, MockFormatError, NvmlUnavailable
from control.health.mockfile import MockConfig, load, to_snapshot
from control.health.types import GpuSnapshot, XidEvent

__all__ = ["FakeBackend"]

log = logging.getLogger("shoal." + __name__)

# nvmlReturn_t names, for messages
NVML_RETURN_NAMES = {
    1: "NVML_ERROR_UNINITIALIZED",
    2: "NVML_ERROR_INVALID_ARGUMENT",
    3: "NVML_ERROR_NOT_SUPPORTED",
    4: "NVML_ERROR_NO_PERMISSION",
    6: "NVML_ERROR_NOT_FOUND",
    9: "NVML_ERROR_DRIVER_NOT_LOADED",
    12: "NVML_ERROR_LIBRARY_NOT_FOUND",
    15: "NVML_ERROR_GPU_IS_LOST",
    18: "NVML_ERROR_LIB_RM_VERSION_MISMATCH",
    999: "NVML_ERROR_UNKNOWN",
}


def _init_error(code: int, path: Path) -> str:
    name = NVML_RETURN_NAMES.get(code, "nvmlReturn_t")
    return f"nvmlInit failed: {code} ({name}), injected by {path}"


class FakeBackend:
    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 0.05,
    ) -> None:
        self._path = Path(path)
        self._clock = clock
        self._sleep = sleep
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._config = load(self._path)  # MockFormatError propagates: the caller's file
        self._delivered: dict[int, int] = {}
        if self._config.nvml_init_error:
            raise NvmlUnavailable(
                _init_error(self._config.nvml_init_error, self._path),
                self._config.nvml_init_error,
            )

    def device_count(self) -> int:
        config = self._current()
        if config.nvml_init_error:
            raise BackendError(_init_error(config.nvml_init_error, self._path))
        return config.card_count

    def driver_version(self) -> str:
        return "fake (" + self._current().version + ")"

    def snapshot(self, index: int) -> GpuSnapshot:
        config = self._current()
        if config.nvml_init_error:
            raise BackendError(_init_error(config.nvml_init_error, self._path))
        if not 0 <= index < config.card_count:
            raise BackendError(f"no GPU {index} (card_count {config.card_count})", index)
        if config.card(index).fail_read:
            raise BackendError(f"GPU {index} has fallen off the bus (fail_read)", index)
        return to_snapshot(config, index)

    def wait_xid(self, timeout_s: float) -> list[XidEvent]:
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            events = self._take_xids(self._current())
            remaining = deadline - time.monotonic()
            if events or remaining <= 0:
                return events
            self._sleep(min(self._poll_s, remaining))

    def close(self) -> None:
        """Nothing to release."""

    def _take_xids(self, config: MockConfig) -> list[XidEvent]:
        events: list[XidEvent] = []
        with self._lock:
            for index in range(config.card_count):
                card = config.card(index)
                done = min(self._delivered.get(index, 0), len(card.xids))
                now = self._clock()
                events.extend(XidEvent(index, xid, now, card.uuid) for xid in card.xids[done:])
                self._delivered[index] = len(card.xids)
        return events

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _current(self) -> MockConfig:
        stamp = self._file_stamp()
        with self._lock:
            if stamp == self._stamp:
                return self._config
            self._stamp = stamp
            try:
                self._config = load(self._path)
            except MockFormatError as exc:
                log.warning("fake backend: keeping the last good file: %s", exc)
            return self._config
