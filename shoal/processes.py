"""Starting Shoal's own processes (``python -m shoal ...``) from Shoal: one environment rule
and one way to start them with a log file and an optional core.

Shared by the simulator's ``start_sim_engine``, the router's ``start_router`` and ``shoal
up``: each starts child processes that must import the same Shoal as their parent, so a
source checkout goes first on the child's ``PYTHONPATH`` (an installed Shoal needs nothing).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["REPO", "checkout_pythonpath", "shoal_env", "spawn_logged"]

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
