"""The node contract between the cache daemon and the engines, as volumes and paths.

The daemon's arena (``<shm_dir>/shoal-<name>.arena``, mode 0600) and control socket
(``<runtime_dir>/shoal-<name>.sock`` in a 0700 directory) are reached by engines in other
pods on the same node, so both directories are host paths, mounted at the *same* path in
every container (so ``SHOAL_CACHE_SHM_DIR`` and the socket URL mean the same everywhere),
and every container touching them runs as the values' one UID/GID.

Who creates the directories: the daemon's init container (``node-dirs``), as root with only
``CHOWN``, ``FOWNER`` and ``DAC_OVERRIDE``, makes them with mode 0700 owned by
``run_as_user``. The daemon's own mounts use ``DirectoryOrCreate``; engines mount them with
``type: Directory``, so an engine pod on a node whose daemon has not started yet waits in
``ContainerCreating`` instead of creating root-owned directories nobody can use.

KV events: an engine binds ``ipc://<runtime_dir>/gpu<slot>.pub`` (and ``.replay``); the
daemon subscribes to the slots ``0 .. num_event_slots-1``. vLLM's publisher binds only
``ipc://`` or a TCP wildcard, and a wildcard would publish prompts' token ids to the pod
network, so the socket directory is the only safe meeting point.
"""

from __future__ import annotations

from typing import Any

from deploy.objects import own_dir_script, root_init_container
from deploy.values import Values

__all__ = [
    "RUNTIME_VOLUME",
    "SHM_VOLUME",
    "arena_path",
    "daemon_socket",
    "event_endpoints",
    "init_container",
    "mounts",
    "volumes",
]

SHM_VOLUME = "shoal-shm"
RUNTIME_VOLUME = "shoal-run"


def _cache_name(values: Values) -> str:
    return str(values.cache.settings.get("name", "default"))


def arena_path(values: Values) -> str:
    return f"{values.node_dirs.shm_dir}/shoal-{_cache_name(values)}.arena"


def daemon_socket(values: Values) -> str:
    """The daemon's engine socket, as the connector's ``endpoint`` takes it."""
    return f"ipc://{values.node_dirs.runtime_dir}/shoal-{_cache_name(values)}.sock"


def event_endpoints(values: Values, slot: int) -> tuple[str, str]:
    """(publisher, replay) endpoints of the engine using KV-event slot ``slot``."""
    base = f"ipc://{values.node_dirs.runtime_dir}/gpu{slot}"
    return f"{base}.pub", f"{base}.replay"


def volumes(values: Values, *, create: bool) -> list[dict[str, Any]]:
    """The two host-path volumes; ``create`` for the daemon, else they must exist."""
    kind = "DirectoryOrCreate" if create else "Directory"
    return [
        {"name": SHM_VOLUME, "hostPath": {"path": values.node_dirs.shm_dir, "type": kind}},
        {"name": RUNTIME_VOLUME, "hostPath": {"path": values.node_dirs.runtime_dir, "type": kind}},
    ]


def mounts(values: Values) -> list[dict[str, Any]]:
    """Mounts for a container's ``volumeMounts``; paths equal the host paths."""
    return [
        {"name": SHM_VOLUME, "mountPath": values.node_dirs.shm_dir},
        {"name": RUNTIME_VOLUME, "mountPath": values.node_dirs.runtime_dir},
    ]


def init_container(values: Values) -> dict[str, Any]:
    """Root-owned host directories -> mode 0700, owned by the one UID/GID."""
    dirs = [values.node_dirs.shm_dir, values.node_dirs.runtime_dir]
    script = " && ".join(own_dir_script(values, d) for d in dirs)
    return root_init_container(
        values, "node-dirs", script, mounts=mounts(values), memory_bytes=64 << 20,
        capabilities=["CHOWN", "FOWNER", "DAC_OVERRIDE"],
    )  # fmt: skip
