"""Starting Shoal's own processes (``python -m shoal ...``) from Shoal: one environment rule
and one way to start them with a log file and an optional core.

Shared by the simulator's ``start_sim_engine``, the router's ``start_router`` and ``shoal
up``: each starts child processes that must import the same Shoal as their parent, so a
source checkout goes first on the child's ``PYTHONPATH`` (an installed Shoal needs nothing).
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

__all__ = [
    "REPO",
    "bindable",
    "checkout_pythonpath",
    "free_loopback_port",
    "shoal_env",
    "spawn_logged",
]

REPO = Path(__file__).resolve().parents[1]


def checkout_pythonpath(base: Mapping[str, str]) -> str:
    """This checkout first (when it is one), then what ``base`` had."""
    parts = [str(REPO)] if (REPO / "pyproject.toml").exists() else []
    if base.get("PYTHONPATH"):
        parts.append(base["PYTHONPATH"])
    return os.pathsep.join(parts)


def shoal_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``checkout_pythonpath``."""
    base = os.environ if base is None else base
    return {**base, "PYTHONPATH": checkout_pythonpath(base)}


def spawn_logged(
    command: Sequence[str], log_path: Path, env: Mapping[str, str], cpu: int | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` with stdout and stderr into ``log_path``, pinned to ``cpu`` if given
    (before its interpreter starts threads, which inherit the affinity)."""
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, env=dict(env)
        )
    if cpu is not None:
        os.sched_setaffinity(process.pid, {cpu})
    return process


def free_loopback_port(taken: Collection[int] = ()) -> int | None:
    """A loopback port free now and not in ``taken``, below the kernel's ephemeral range
    (where outgoing connections take their source ports, and could take it before the
    child binds it); ``None`` when 200 tries found none (the caller names the error)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    pool = range(20000, low) if low > 21000 else range(high + 1, 65000)
    for _ in range(200):
        port = random.choice(pool)
        if port not in taken and bindable("127.0.0.1", port):
            return port
    return None


def bindable(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (``SO_REUSEADDR``, as servers bind)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
