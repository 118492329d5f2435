"""``FakeBackend``: the GpuBackend read from a TOML fault file (mockfile.py's schema).

Invariants: the file is re-read whenever its (mtime, size, inode) changes (and compared
byte for byte while its mtime is under 2 s old: two writes in one timestamp tick), so
``shoal health inject`` on a running watcher takes effect at its next reading; a re-read
that fails to parse keeps the last good file (logged once per change: a human half-way
through an edit must not flap every GPU); each XID listed under a card's ``xids`` is
delivered by ``wait_xid`` exactly once: the entries after the longest common prefix
with the list last delivered are new (injection appends; a cleared card's list starts
over, so ``[79, 48]`` -> ``[94]`` delivers 94).

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
from control.health.mockfile import MockConfig, loads, to_snapshot
from control.health.types import GpuSnapshot, XidEvent

__all__ = ["FakeBackend"]

log = logging.getLogger("shoal." + __name__)

_MAX_FILE_BYTES = 1 << 20
_RACY_NS = 2_000_000_000

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
        self._stamp: tuple[int, int, int] | None = None
        self._bad_stamp: tuple[int, int, int] | None = None
        self._data = b""
        self._config = self._load()  # MockFormatError propagates: the caller's file
        self._delivered: dict[int, tuple[int, ...]] = {}
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
                seen = self._delivered.get(index, ())
                done = 0
                while done < min(len(seen), len(card.xids)) and seen[done] == card.xids[done]:
                    done += 1
                now = self._clock()
                events.extend(XidEvent(index, xid, now, card.uuid) for xid in card.xids[done:])
                self._delivered[index] = card.xids
        return events

    def _read(self) -> tuple[tuple[int, int, int], bytes]:
        try:
            with open(self._path, "rb") as f:
                st = os.fstat(f.fileno())
                return (st.st_mtime_ns, st.st_size, st.st_ino), f.read(_MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise MockFormatError(f"{self._path}: cannot read: {exc.strerror or exc}") from None

    def _load(self) -> MockConfig:
        stamp, data = self._read()
        if len(data) > _MAX_FILE_BYTES:
            raise MockFormatError(f"{self._path}: larger than {_MAX_FILE_BYTES} bytes")
        config = loads(data, str(self._path))
        self._stamp, self._data = stamp, data
        return config

    def _current(self) -> MockConfig:
        """The file's config, re-read when its (mtime, size, inode) changed — or, while
        its mtime is within the last ``_RACY_NS`` (a second write in the same timestamp
        tick, onto a reused inode, would look unchanged), when its bytes differ."""
        try:
            st = os.stat(self._path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        with self._lock:
            racy = stamp is not None and time.time_ns() - stamp[0] < _RACY_NS
            if stamp == self._stamp and not racy:
                return self._config
            try:
                if racy and stamp == self._stamp and self._read()[1] == self._data:
                    return self._config
                self._config = self._load()
            except MockFormatError as exc:
                if stamp != self._bad_stamp:
                    log.warning("fake backend: keeping the last good file: %s", exc)
                self._bad_stamp = stamp
            return self._config
