"""The actors of an engine group: the driver (runs the engine) and stand-in workers.

Invariant: the engine process lives no longer than the driver actor's process. It runs
in its own process group (``start_new_session``) so ``stop_engine`` reaches the engine's
children too, and with ``PR_SET_PDEATHSIG = SIGKILL`` so a driver that dies without
stopping it (``ray.kill``, its node's raylet killed, the fleet's process gone and Ray
fate-sharing its actors) takes the engine with it. The death signal fires when the
*thread* that forked the child exits, not the process, so every engine is spawned from
one thread the driver starts at construction and never ends (a Ray actor method may run
on a pool thread; spawning there would kill the engine when that thread is retired).
Rejected: ``prctl`` from a wrapper shell (one more process per engine, same effect).

These classes are plain; ``group.py`` wraps them with ``ray.remote`` and places them in
the group's bundles. Both answer ``where()``: the Ray node id, the node's name (label
``shoal.node``, else hostname) and, for workers, ``ray.get_gpu_ids()``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import logging
import os
import queue
import shlex
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ray

from control.health.types import default_node_name
from shoal.processes import bindable, free_loopback_port

__all__ = ["EngineDriver", "StandinWorker", "bundle_probe", "engine_argv", "node_name"]

log = logging.getLogger("shoal." + __name__)

PR_SET_PDEATHSIG = 1
LOG_TAIL_BYTES = 2000


def node_name() -> str:
    """This Ray node's name: its ``shoal.node`` label, else ``default_node_name()``
    (``socket.gethostname()`` as it is, full): the health watcher's default, so the GPU
    names ``NODE/gpuI`` of both sides match without configuration."""
    labels = ray.get_runtime_context().get_node_labels()
    return str(labels.get("shoal.node") or default_node_name())


def _where() -> dict[str, Any]:
    context = ray.get_runtime_context()
    return {"node_id": context.get_node_id(), "node_name": node_name()}


def engine_argv(template: str, values: Mapping[str, str]) -> list[str]:
    """``template`` split like a shell would, then ``{key}`` replaced in each word (not
    ``str.format``: an engine argument may hold JSON braces)."""
    words = shlex.split(template)
    for key, value in values.items():
        words = [word.replace("{" + key + "}", value) for word in words]
    return words


_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here, not in the forked child


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: one libc call, nothing that takes a lock
    (why ``preexec_fn`` is safe here despite the actor's threads; Ray's own
    ``start_ray_process`` sets its fate-sharing the same way)."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _pick_port(host: str) -> int:
    if host.startswith("127."):
        port = free_loopback_port()
        if port is not None:
            return port
    with socket.socket() as probe:  # any free port the kernel gives on this address
        probe.bind((host, 0))
        port = int(probe.getsockname()[1])
    assert bindable(host, port), "a port the kernel just gave out"
    return port


class _SpawnThread:
    """One thread that lives as long as the process and runs every spawn (see above)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.Queue()
        threading.Thread(target=self._run, name="engine-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            job, future = self._jobs.get()
            try:
                future.set_result(job())
            except BaseException as exc:  # handed to the caller, who re-raises it
                future.set_exception(exc)

    def call(self, job: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._jobs.put((job, future))
        return future.result()


class EngineDriver:
    """Runs the engine command on bundle 0's node."""

    def __init__(self) -> None:
        self._spawner = _SpawnThread()
        self._process: subprocess.Popen[bytes] | None = None
        self._log_path: Path | None = None

    def where(self) -> dict[str, Any]:
        return _where()

    def start_engine(
        self, template: str, values: Mapping[str, str], env: Mapping[str, str]
    ) -> dict[str, Any]:
        """Pick a free port on this node, start the engine; answers at once (the group
        waits for its /health). ``{host}`` is this node's IP, ``{port}`` the port picked;
        the engine's environment has ``RAY_ADDRESS`` (this cluster) unless ``env`` sets it,
        so an engine that joins Ray (vLLM) joins this cluster, not a new one."""
        assert self._process is None, "one engine per driver"
        host = str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        port = _pick_port(host)
        argv = engine_argv(template, {**values, "port": str(port), "host": host})
        env = {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, **env}
        scratch = Path(tempfile.mkdtemp(prefix="shoal-engine-"))
        self._log_path = scratch / "engine.log"
        log_path = self._log_path

        def spawn() -> subprocess.Popen[bytes]:
            with open(log_path, "wb") as out:
                return subprocess.Popen(
                    argv,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, **env},
                    start_new_session=True,
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 (see _die_with_parent)
                )

        self._process = self._spawner.call(spawn)
        return {
            **_where(),
            "host": host,
            "port": port,
            "pid": self._process.pid,
            "log_path": str(log_path),
        }

    def engine_state(self) -> dict[str, Any]:
        """The engine's exit code (None while it runs) and the tail of its log; doubles as
        the driver's liveness ping."""
        code = None if self._process is None else self._process.poll()
        return {"returncode": code, "log_tail": self._log_tail() if code is not None else ""}

    def _log_tail(self) -> str:
        if self._log_path is None:
            return ""
        try:
            with open(self._log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError as exc:
            return f"(log unreadable: {exc})"

    def stop_engine(self, grace_s: float) -> int | None:
        """SIGTERM the engine's process group, SIGKILL after ``grace_s``; its exit code."""
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("engine pid %d ignored SIGTERM for %.0f s", process.pid, grace_s)
        self._signal_group(process.pid, signal.SIGKILL)  # stragglers of the group too
        deadline = time.monotonic() + 5.0
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return process.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # the group is already empty
            os.killpg(pgid, sig)


def bundle_probe() -> dict[str, Any]:
    """A task run once in a bundle (``workers="vllm"``): where it is and the GPU ids Ray
    pinned to the bundle, which vLLM's worker in that bundle will be given."""
    return {**_where(), "gpu_ids": [str(i) for i in ray.get_gpu_ids()]}


class StandinWorker:
    """Holds one bundle's GPUs where vLLM's worker would, and says where that is."""

    def where(self) -> dict[str, Any]:
        return bundle_probe()

    def ping(self) -> bool:
        return True
