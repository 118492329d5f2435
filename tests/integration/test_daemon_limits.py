"""The daemon at the edges of its environment: a small tmpfs, a name two daemons race for.

Real daemon processes; the tmpfs tests mount their own small tmpfs (root only, as in CI)
and skip with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvcache.config import CacheConfig
from tests.integration.conftest import (
    ENV,
    run_client,
    spawn_serve,
    start_daemon,
    stop_process,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (a /dev/shm of a container)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> int:
    """Another tenant of the tmpfs takes every page left; returns the bytes it took."""
    taken = 0
    chunk = bytes(1 << 20)
    with open(directory / "other-tenant", "wb", buffering=0) as out:
        while True:
            try:
                taken += out.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return taken


PUT_MORE_THAN_FITS = """
import sys, numpy as np
from kvcache.client import CacheClient
from kvcache.keys import Namespace, chain_keys
keys = chain_keys(Namespace(model="m"), list(range(16 * 64)), 16)  # 64 x 256 KiB = 16 MiB
with CacheClient(sys.argv[1], heartbeat=False, populate=False, shm_dir=sys.argv[2]) as client:
    result = client.put(keys, [np.ones(256 << 10, dtype=np.uint8)] * len(keys))
    print(result.stored, result.no_space)
"""


def test_an_arena_larger_than_its_tmpfs_refuses_to_start_naming_both_sizes(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "shm") as shm:
        with pytest.raises(RuntimeError, match="exited with 1") as failed:
            start_daemon(tmp_path, shm_dir=str(shm), shm_bytes="64MiB", dram_bytes=0)
        message = str(failed.value)
        assert f"tmpfs mounted at {shm}" in message
        assert "16.0 MiB" in message and "64.0 MiB" in message, message
        assert "emptyDir" in message and "sizeLimit" in message
        assert "Traceback" not in message
        assert not list(shm.glob("*.arena")), "a refused arena leaves no file behind"


def test_a_reserved_arena_cannot_be_starved_by_other_tenants_of_its_tmpfs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No populate, and no client maps the arena before the other tenant fills the tmpfs:
    # nothing but the daemon's reservation at start holds the arena's pages.
    monkeypatch.setitem(ENV, "SHOAL_CACHE_POPULATE", "false")
    with small_tmpfs(tmp_path / "shm") as shm:
        name = f"t{uuid.uuid4().hex[:8]}"
        values: dict[str, object] = {
            "name": name, "runtime_dir": str(tmp_path / "run"), "shm_dir": str(shm),
            "shm_bytes": "8MiB", "dram_bytes": 0, "metrics_port": 0, "log_format": "text",
        }  # fmt: skip
        log = tmp_path / "daemon.log"
        process = spawn_serve("cache", values, log)
        try:
            wait_ready(process, log, "daemon", lambda: "cache daemon ready" in log.read_text())
            assert fill(shm) > 0
            endpoint = CacheConfig(name=name, runtime_dir=str(tmp_path / "run")).endpoint
            with run_client(PUT_MORE_THAN_FITS, endpoint, str(shm)) as client:
                out, err = client.communicate(timeout=120)
            assert client.returncode == 0, f"client died ({client.returncode}): {err[-2000:]}"
            stored, _no_space = map(int, out.split())
            assert stored > 0
        finally:
            assert stop_process(process) == 0, log.read_text()


def race_for_one_name(tmp_path: Path) -> None:
    name = f"race{uuid.uuid4().hex[:8]}"
    values: dict[str, object] = {
        "name": name, "runtime_dir": str(tmp_path / "run"), "shm_bytes": "16MiB",
        "dram_bytes": 0, "metrics_port": 0, "log_format": "text",
    }  # fmt: skip
    logs = [tmp_path / f"{name}-{i}.log" for i in range(2)]
    processes = [spawn_serve("cache", values, log) for log in logs]
    try:
        assert wait_until(lambda: any(p.poll() is not None for p in processes), timeout=30), (
            "neither daemon gave up: both believe they own the name"
        )
        loser = next(i for i, p in enumerate(processes) if p.poll() is not None)
        winner = 1 - loser
        assert processes[loser].returncode == 1
        assert "held by a running daemon" in logs[loser].read_text()
        assert wait_until(lambda: "cache daemon ready" in logs[winner].read_text(), 30)
        assert processes[winner].poll() is None
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)


def test_two_daemons_racing_for_one_name_end_with_exactly_one_running(tmp_path: Path) -> None:
    for _ in range(3):
        race_for_one_name(tmp_path)
