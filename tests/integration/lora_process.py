"""``shoal lora serve`` as a real process on loopback, for the LoRA integration tests."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.processes import shoal_env, spawn_logged
from tests.integration.conftest import free_port, stop_process

__all__ = ["LoraProcess", "running_lora_manager", "write_discovery"]


def write_discovery(path: Path, urls: list[str]) -> None:
    """The router's discovery file, replaced atomically (readers never see half of it)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"url": url} for url in urls]))
    tmp.replace(path)


@dataclass
class LoraProcess:
    process: Any
    port: int
    log_path: Path
    token: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(self, method: str, path: str, body: Any = None,
                timeout: float = 30.0) -> tuple[int, Any]:  # fmt: skip
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                raw = reply.read()
                status = reply.status
        except urllib.error.HTTPError as exc:
            raw, status = exc.read(), exc.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def metric(self, name: str, **labels: str) -> float:
        _, text = self.request("GET", "/metrics")
        for line in str(text).splitlines():
            found = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
            if found and all(f'{k}="{v}"' in (found.group(1) or "") for k, v in labels.items()):
                return float(found.group(2))
        raise KeyError(f"{name} {labels} not in /metrics")


@contextlib.contextmanager
def running_lora_manager(tmp_path: Path, **flags: Any) -> Iterator[LoraProcess]:
    """``shoal lora serve`` with ``flags`` (``_`` for ``-``) on a free port; stopped after."""
    port = free_port()
    log_path = tmp_path / f"lora-{port}.log"
    command = [sys.executable, "-m", "shoal", "lora", "serve", "--port", str(port),
               "--adapter-dir", str(tmp_path / "adapters")]  # fmt: skip
    for key, value in flags.items():
        if value is True:
            command.append("--" + key.replace("_", "-"))
        elif value is not None and value is not False:
            command += ["--" + key.replace("_", "-"), str(value)]
    process = spawn_logged(command, log_path, shoal_env())
    manager = LoraProcess(process, port, log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"lora manager exited {process.returncode}:\n{manager.log()}")
            try:
                if manager.request("GET", "/metrics", timeout=0.5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lora manager not up in 20 s:\n{manager.log()}")
            time.sleep(0.05)
        yield manager
    finally:
        stop_process(process)
