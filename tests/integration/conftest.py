"""Real daemon processes on real ipc sockets, and real client processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvcache.client import CacheClient
from kvcache.config import CacheConfig
from kvcache.errors import CacheUnavailable

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class DaemonProcess:
    config: CacheConfig
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def endpoint(self) -> str:
        return self.config.endpoint

    def client(self, **kwargs: object) -> CacheClient:
        return CacheClient(self.endpoint, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=10)


def start_daemon(tmp_path: Path, name: str | None = None, **settings: object) -> DaemonProcess:
    name = name or f"t{uuid.uuid4().hex[:10]}"
    values: dict[str, object] = {
        "name": name,
        "runtime_dir": str(tmp_path / "run"),
        "shm_bytes": "64MiB",
        "dram_bytes": "128MiB",
        "slab_bytes": "8MiB",
        "metrics_port": 0,
        "session_ttl_s": 30,
        "max_request_bytes": "1MiB",
        "log_format": "text",
        **settings,
    }
    args = [sys.executable, "-m", "shoal", "cache", "serve"]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    log_path = tmp_path / f"daemon-{name}-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, env=ENV, stdout=log, stderr=subprocess.STDOUT)
    config = CacheConfig(name=name, runtime_dir=str(tmp_path / "run"))
    handle = DaemonProcess(config, process, log_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}:\n{handle.log()}")
        if "cache daemon ready" in handle.log():
            try:
                CacheClient(config.endpoint, timeout_s=1, heartbeat=False).close()
                return handle
            except CacheUnavailable:
                pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"daemon did not become ready:\n{handle.log()}")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    handle = start_daemon(tmp_path)
    yield handle
    code = handle.stop()
    assert code == 0, handle.log()
    assert not handle.config.arena_path.exists(), "a clean exit removes the arena"


@contextlib.contextmanager
def run_client(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A client in its own interpreter; killed (never left behind) when the block exits."""
    process = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with process:
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()


def wait_until(predicate: object, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return False


# -- clusters of daemons --------------------------------------------------------------


def cluster_ports(count: int) -> list[int]:
    """Ports p with p and p + 1 free (ROUTER and PUB)."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 1 < 65535 and port not in ports and port + 1 not in ports:
            ports.append(port)
    return ports


def start_cluster(
    tmp_path: Path, count: int, *, prefix: str = "n", extra_peers: str = "", **settings: object
) -> list[DaemonProcess]:
    """``count`` daemons named node0.. on loopback, each listing all (plus ``extra_peers``)."""
    ports = cluster_ports(count)
    peers = ",".join([f"127.0.0.1:{p}" for p in ports] + ([extra_peers] if extra_peers else []))
    values: dict[str, object] = {
        "cluster_host": "127.0.0.1",
        "cluster_peers": peers,
        "cluster_heartbeat_s": 0.2,
        "cluster_member_timeout_s": 1.0,
        **settings,
    }
    return [
        start_daemon(
            tmp_path,
            name=f"{prefix}{i}-{os.getpid()}",
            cluster_port=port,
            cluster_node=f"node{i}",
            **values,
        )
        for i, port in enumerate(ports)
    ]


def members(node: DaemonProcess) -> set[str]:
    with node.client(heartbeat=False) as c:
        return {m["node"] for m in c.cluster_status()["members"]}


def wait_for_members(nodes: list[DaemonProcess]) -> None:
    """Until every node of a ``start_cluster`` cluster sees all the others."""
    everyone = {f"node{i}" for i in range(len(nodes))}
    for i, node in enumerate(nodes):
        assert wait_until(lambda n=node, i=i: members(n) == everyone - {f"node{i}"}, timeout=10)


def stop_all(nodes: list[DaemonProcess]) -> None:
    for node in nodes:
        node.stop()
        node.config.arena_path.unlink(missing_ok=True)  # left behind by a kill -9
