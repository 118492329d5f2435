"""Start simulated engines as real processes: the Python API tests and benchmarks use.

::

    with running_sim_engine(port=free_port, time_scale=10, num_gpu_blocks=64) as engine:
        engine.url                  # "http://127.0.0.1:<port>"
        engine.get("/metrics")      # body text (urllib, no extra dependency)
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
import os
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

from sim.errors import EngineStartError
from sim.profile import StepProfile

__all__ = ["SimEngineProcess", "engine_args", "running_sim_engine", "start_sim_engine"]

_REPO = Path(__file__).resolve().parents[1]


@dataclass
class SimEngineProcess:
    process: subprocess.Popen[bytes]
    host: str
    port: int
    log_path: Path

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
            return self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


def engine_args(**flags: Any) -> list[str]:
    """``shoal sim engine`` arguments for ``flags`` (see the module docstring)."""
    args: list[str] = []
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            args.append(flag)
        elif isinstance(value, StepProfile):
            handle, path = tempfile.mkstemp(prefix="sim-profile-", suffix=".json")
            os.close(handle)
            value.save(path)
            args += [flag, path]
        elif isinstance(value, dict):
            args += [flag, json.dumps(value)]
        elif isinstance(value, list | tuple):
            args += [flag, *map(str, value)]
        else:
            args += [flag, str(value)]
    return args


def start_sim_engine(
    port: int, *, host: str = "127.0.0.1", log_path: str | Path | None = None,
    ready_timeout_s: float = 20.0, cpu: int | None = None, **flags: Any,
) -> SimEngineProcess:  # fmt: skip
    """Start one engine process and wait for /health; ``cpu`` pins it to one core."""
    if log_path is None:
        handle, name = tempfile.mkstemp(prefix=f"sim-engine-{port}-", suffix=".log")
        os.close(handle)
        log_path = name
    log_path = Path(log_path)
    command = [sys.executable, "-m", "shoal", "sim", "engine", "--host", host,
               "--port", str(port), *engine_args(**flags)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(_REPO), os.environ.get("PYTHONPATH", "")) if p)}  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if cpu is not None:  # before its interpreter starts threads, which inherit it
        os.sched_setaffinity(process.pid, {cpu})
    engine = SimEngineProcess(process, host, port, log_path)
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
