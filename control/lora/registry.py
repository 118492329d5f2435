"""The registered adapters and the operator's pins, kept in a JSON state file.

::

    {"version": 1,
     "adapters": [{"name", "base_model", "source", "path", "registered_at"}, ...],
     "pins": [["http://engine:8000", "sql-lora"], ...]}

Invariant: the file on disk is always a complete state: every change is written to
``<file>.tmp-XXXX`` in the same folder, fsynced, and renamed over the file (atomic on POSIX),
so a manager killed mid-write restarts with the state before or after the change, never
half of one. A file that exists but does not parse, or names an adapter with a name
``check_name`` refuses (names are joined onto ``--adapter-dir``), is ``StateFileError`` at
start (the manager refuses to run rather than forget every adapter); no file is an empty
registry.
Without a state file (``state_file=None``) the registry lives in memory only.

Names are what clients send as ``model``: 1-128 of ``[A-Za-z0-9._:-]``, starting with a
letter or digit (they also name a folder under ``--adapter-dir`` and a URL path segment).

Registering is ``prepare`` (blocking: checks a local folder, fetches a remote one, see
``sources.py``) then ``add`` (memory + file). Re-registering a name with the same base and
source is a no-op that refreshes a remote copy; with another base or source it is
``AdapterConflict`` (remove it first).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from control.lora.errors import (
    AdapterConflict,
    AdapterNotFound,
    LoraConfigError,
    StateFileError,
)
from control.lora.sources import check_adapter, fetch_adapter, is_remote, local_path
from control.lora.types import AdapterSpec

__all__ = ["NAME_PATTERN", "Registry", "check_name"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
_VERSION = 1


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise LoraConfigError(
            f"adapter name {name!r}: use 1-128 of letters, digits, '.', '_', ':', '-', "
            "starting with a letter or digit"
        )
    return name


class Registry:
    def __init__(
        self,
        adapter_dir: Path,
        state_file: Path | None = None,
        *,
        fetch: Callable[[str, Path, str], Path] = fetch_adapter,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.adapter_dir = adapter_dir
        self.state_file = state_file
        self._fetch = fetch
        self._clock = clock
        self.adapters: dict[str, AdapterSpec] = {}
        self.pins: set[tuple[str, str]] = set()  # (engine url, adapter name)
        if state_file is not None:
            self._read(state_file)

    def _read(self, path: Path) -> None:
        try:
            raw = path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StateFileError(f"--state-file {path}: cannot read it: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("version") != _VERSION:
                raise ValueError(f"not a JSON object with version {_VERSION}")
            for item in data.get("adapters", []):
                spec = AdapterSpec(
                    check_name(str(item["name"])), str(item["base_model"]),
                    str(item["source"]), str(item["path"]),
                    float(item.get("registered_at", 0.0)),
                )  # fmt: skip
                self.adapters[spec.name] = spec
            self.pins = {(str(url), str(name)) for url, name in data.get("pins", [])}
        except (ValueError, KeyError, TypeError, LoraConfigError) as exc:
            raise StateFileError(
                f"--state-file {path} is not a version-{_VERSION} LoRA state ({exc!r}); "
                "move it aside to start empty"
            ) from None

    def save(self) -> None:
        if self.state_file is None:
            return
        data: dict[str, Any] = {
            "version": _VERSION,
            "adapters": [self.adapters[n].to_json() for n in sorted(self.adapters)],
            "pins": sorted([url, name] for url, name in self.pins),
        }
        folder = self.state_file.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f"{self.state_file.name}.tmp-", dir=folder)
            try:
                with os.fdopen(fd, "w") as out:
                    json.dump(data, out, indent=1)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.state_file)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise StateFileError(
                f"--state-file {self.state_file}: cannot write it: {exc.strerror}"
            ) from None

    def get(self, name: str) -> AdapterSpec:
        spec = self.adapters.get(name)
        if spec is None:
            raise AdapterNotFound(f"no adapter {name!r} is registered")
        return spec

    def check_new(self, name: str, base_model: str, source: str) -> AdapterSpec | None:
        """The registered spec when it is the same registration, ``None`` when the name is
        free; ``AdapterConflict`` / ``LoraConfigError`` otherwise. No I/O."""
        check_name(name)
        if not base_model:
            raise LoraConfigError(f"adapter {name}: base_model is required (the engines' "
                                  "served model name, as /v1/models lists it)")  # fmt: skip
        if not source:
            raise LoraConfigError(f"adapter {name}: source is required")
        existing = self.adapters.get(name)
        if existing is None:
            return None
        if existing.base_model != base_model or existing.source != source:
            raise AdapterConflict(
                f"adapter {name} is registered with base {existing.base_model} from "
                f"{existing.source}; remove it first to register it again differently"
            )
        return existing

    def prepare(self, name: str, base_model: str, source: str) -> AdapterSpec:
        """Check (local) or fetch (remote) the adapter; the spec to ``add``. Blocking."""
        self.check_new(name, base_model, source)
        if is_remote(source):
            path = self._fetch(source, self.adapter_dir, name)
        else:
            path = local_path(source)
            check_adapter(path, source)
        return AdapterSpec(name, base_model, source, str(path), self._clock())

    def ensure_local(self, spec: AdapterSpec) -> bool:
        """Fetch a remote adapter whose copy is missing (a new node, a wiped folder);
        True when it fetched. Blocking."""
        if not is_remote(spec.source) or Path(spec.path).is_dir():
            return False
        self._fetch(spec.source, self.adapter_dir, spec.name)
        return True

    def add(self, spec: AdapterSpec) -> None:
        self.adapters[spec.name] = spec
        self.save()

    def remove(self, name: str) -> AdapterSpec:
        spec = self.get(name)
        del self.adapters[name]
        self.pins = {(url, n) for url, n in self.pins if n != name}
        self.save()
        return spec

    def pin(self, url: str, name: str) -> None:
        if (url, name) not in self.pins:
            self.pins.add((url, name))
            self.save()

    def unpin(self, url: str, name: str) -> None:
        if (url, name) in self.pins:
            self.pins.discard((url, name))
            self.save()
