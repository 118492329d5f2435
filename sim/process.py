"""Start simulated engines as real processes: the Python API tests and benchmarks use.

::

    with running_sim_engine(port=free_port, time_scale=10, num_gpu_blocks=64) as engine:
        engine.url                  # "http://127.0.0.1:<port>"
        engine.get("/metrics")      # body text (urllib, no extra dependency)
        engine.metric("vllm:num_requests_running")   # one sample, as a float
        engine.set_faults(fail_next=2)

Keyword arguments are ``shoal sim engine`` flags with ``_`` for ``-`` (``True`` = a bare
flag, ``False``/``None`` = left out; ``kv_events_config`` may be a dict, ``profile`` a
``StepProfile``). Ready means ``GET /health`` answered 200; a process that exits first, or
is not ready within ``ready_timeout_s``, raises ``EngineStartError`` with its log. On exit
the process gets SIGTERM (then SIGKILL after 5 s); its log stays in ``log_path``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.processes import shoal_env, spawn_logged
from sim.errors import EngineStartError
from sim.profile import StepProfile

__all__ = ["SimEngineProcess", "engine_args", "running_sim_engine", "start_sim_engine"]

log = logging.getLogger("shoal." + __name__)


@dataclass
class SimEngineProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path
    scratch: Path | None = None  # removed by stop() after a clean exit

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self, method: str, path: str, body: Any = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        """(status, body) of one request; an HTTP error status is returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def get(self, path: str) -> str:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body[:200]!r}"
        return body.decode()

    def metric(self, name: str, **labels: str) -> float:
        """One sample of ``/metrics`` (labels not given are ignored); ``KeyError`` when no
        sample has that name and those labels."""
        for line in self.get("/metrics").splitlines():
            found = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
            if found and all(f'{k}="{v}"' in found.group(1) for k, v in labels.items()):
                return float(found.group(2))
        raise KeyError(f"{name} {labels} not in /metrics")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        status, body = self.request("POST", "/sim/faults", faults)
        assert status == 200, f"POST /sim/faults: {status} {body[:200]!r}"
        return dict(json.loads(body))

    def healthy(self, timeout: float = 1.0) -> bool:
        try:
            return self.request("GET", "/health", timeout=timeout)[0] == 200
        except OSError:
            return False

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.scratch is None:
            return code
        log_inside = self.scratch in self.log_path.parents
        if code == 0 or not log_inside:
            shutil.rmtree(self.scratch, ignore_errors=True)
        else:
            log.warning(
                "sim engine on port %d exited with %d; its log: %s", self.port, code, self.log_path
            )
        return code


def engine_args(directory: Path, **flags: Any) -> list[str]:
    """``shoal sim engine`` arguments for ``flags`` (see the module docstring); a profile
    given as a ``StepProfile`` is written to a file in ``directory``."""
    args: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, StepProfile):
            path = directory / f"profile-{key}.json"
            value.save(path)
            args += [flag, str(path)]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def start_sim_engine(
    port: int,
    *,
    host: str = "127.0.0.1",
    log_path: str | Path | None = None,
    ready_timeout_s: float = 20.0,
    cpu: int | None = None,
    **flags: Any,
) -> SimEngineProcess:
    """Start one engine process and wait for /health; ``cpu`` pins it to one core. Without
    ``log_path`` the log and any profile file live in a temporary directory that
    ``stop()`` removes once the process exited with 0 (the log is kept, and named in a
    warning, otherwise)."""
    scratch = Path(tempfile.mkdtemp(prefix=f"sim-engine-{port}-"))
    log_path = Path(log_path) if log_path is not None else scratch / "engine.log"
    command = [
        sys.executable,
        "-m",
        "shoal",
        "sim",
        "engine",
        "--host",
        host,
        "--port",
        str(port),
        *engine_args(scratch, **flags),
    ]
    process = spawn_logged(command, log_path, shoal_env(), cpu)
    engine = SimEngineProcess(process, host, port, log_path, scratch)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise EngineStartError(f"sim engine exited with {process.returncode}:\n{engine.log()}")
        if engine.healthy(timeout=0.5):
            return engine
        time.sleep(0.05)
    engine.stop()
    raise EngineStartError(f"sim engine not healthy in {ready_timeout_s} s:\n{engine.log()}")


@contextlib.contextmanager
def running_sim_engine(port: int, **kwargs: Any) -> Iterator[SimEngineProcess]:
    """``start_sim_engine`` for the length of a ``with`` block."""
    engine = start_sim_engine(port, **kwargs)
    try:
        yield engine
    finally:
        engine.stop()
