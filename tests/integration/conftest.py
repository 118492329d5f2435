"""Real daemon processes on real ipc sockets, and real client processes."""

from __future__ import annotations

import contextlib
import os
import random
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


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A loopback port that is free now and outside the kernel's ephemeral range.

    A port from ``bind(0)`` comes from the ephemeral range, which is also where every outgoing
    connection takes its source port: a daemon reconnecting to a peer that is not up yet can
    take the very port the next daemon is about to bind. Ports below the range are only ever
    taken by someone binding them on purpose.
    """
    low, high = _ephemeral_range()
    pool = range(20000, low) if low > 21000 else range(high + 1, 65000)
    for _ in range(200):
        port = random.choice(pool)
        if _bindable(port):
            return port
    raise RuntimeError("no free loopback port outside the ephemeral range")


def _bindable(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def spawn_serve(
    component: str, values: dict[str, object], log_path: Path
) -> subprocess.Popen[bytes]:
    """``shoal COMPONENT serve`` with ``values`` as flags, its output in ``log_path``."""
    args = [sys.executable, "-m", "shoal", component, "serve"]
    for key, value in values.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    with open(log_path, "wb") as log:
        return subprocess.Popen(args, env=ENV, stdout=log, stderr=subprocess.STDOUT)


def wait_ready(
    process: subprocess.Popen[bytes],
    log_path: Path,
    what: str,
    ready: object,
    timeout: float = 20.0,
) -> None:
    """Until ``ready()`` holds; a process that exits or never gets ready is reaped and
    reported with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log}")
        if ready():  # type: ignore[operator]
            return
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"{what} did not become ready:\n{log_path.read_text(errors='replace')}")


def stop_process(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then its exit code; killed (and the timeout re-raised) after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


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
        return stop_process(self.process)


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
    log_path = tmp_path / f"daemon-{name}-{uuid.uuid4().hex[:6]}.log"
    process = spawn_serve("cache", values, log_path)
    config = CacheConfig(name=name, runtime_dir=str(tmp_path / "run"))

    def ready() -> bool:
        if "cache daemon ready" not in log_path.read_text(errors="replace"):
            return False
        try:
            CacheClient(config.endpoint, timeout_s=1, heartbeat=False).close()
        except CacheUnavailable:
            return False
        return True

    wait_ready(process, log_path, "daemon", ready)
    handle = DaemonProcess(config, process, log_path)
    STARTED.append(handle)
    return handle


# Every daemon the tests started: a test that kills one with SIGKILL leaves its arena (a
# tmpfs file of --shm-bytes) in /dev/shm, where it would stay run after run.
STARTED: list[DaemonProcess] = []


@pytest.fixture(scope="session", autouse=True)
def killed_daemons_leave_no_arena() -> Iterator[None]:
    yield
    for handle in STARTED:
        if handle.process.poll() is not None:
            handle.config.arena_path.unlink(missing_ok=True)


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
        taken = {q for p in ports for q in (p, p + 1)}
        if not {port, port + 1} & taken and _bindable(port + 1):
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
    nodes: list[DaemonProcess] = []
    try:
        for i, port in enumerate(ports):
            nodes.append(
                start_daemon(
                    tmp_path,
                    name=f"{prefix}{i}-{os.getpid()}",
                    cluster_port=port,
                    cluster_node=f"node{i}",
                    **values,
                )
            )
    except BaseException:
        stop_all(nodes)  # never leave half a cluster running behind a failed start
        raise
    return nodes


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
