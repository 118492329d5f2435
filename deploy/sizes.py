"""Sizes derived from the values, in one place: arena -> tmpfs -> memory requests and limits.

Memory cgroups charge tmpfs pages to the cgroup of the process that first touches them. The
cache daemon creates and prefaults its arena (``posix_fallocate``, ``MADV_POPULATE_WRITE``),
so the arena counts against the *daemon's* limit wherever the file lives (hostPath on the
node's ``/dev/shm`` or an ``emptyDir: {medium: Memory}``), never against the engines that
map it later. Hence::

    daemon limit    = shm_bytes + dram_bytes + io_staging_bytes + memory_overhead_bytes
    engine /dev/shm = engine.shm_bytes + loader capacity_bytes   (emptyDir, medium Memory:
                      the sidecar stages weights there and vLLM maps them)
    vllm limit      = engine.memory_bytes + engine.shm_bytes     (NCCL's and vLLM's own shm
                      pages are charged to vllm)
    loader limit    = capacity_bytes + LOADER_OVERHEAD_BYTES     (the staged weights are
                      charged to the sidecar, which writes them first)

The loader counts only when it runs: enabled *and* given a ``uri`` (without one vLLM loads
the model itself and no sidecar is rendered).

Requests equal limits for memory (Guaranteed-style: an evicted cache daemon loses its
arena, so it must not be the first thing the kubelet reclaims).
"""

from __future__ import annotations

import dataclasses
import math

from deploy.values import Values
from kvcache.config import CacheConfig
from loader.sidecar.config import LoaderConfig
from shoal.config import parse_size

__all__ = ["LOADER_OVERHEAD_BYTES", "DerivedSizes", "derive", "human_bytes", "quantity"]

_MI = 1 << 20
LOADER_OVERHEAD_BYTES = 1 << 30  # the sidecar's Python, gRPC buffers, staging bookkeeping


def quantity(num_bytes: int) -> str:
    """A Kubernetes quantity for ``num_bytes``, rounded up to whole MiB (``"8192Mi"``)."""
    return f"{max(1, math.ceil(num_bytes / _MI))}Mi"


def human_bytes(num_bytes: int) -> str:
    """``8589934592`` -> ``"8GiB"`` where exact, else MiB or bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes and num_bytes % (1 << shift) == 0:
            return f"{num_bytes >> shift}{unit}"
    return str(num_bytes)


def _setting(cls: type, settings: dict[str, object], name: str) -> int:
    if name in settings:
        return parse_size(settings[name])  # type: ignore[arg-type]
    default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    assert isinstance(default, int), f"{cls.__name__}.{name} has no integer default"
    return default


@dataclasses.dataclass(frozen=True, slots=True)
class DerivedSizes:
    arena_bytes: int  # the cache daemon's shm tier = the arena file on the shared tmpfs
    daemon_memory_bytes: int  # its request = limit
    loader_capacity_bytes: int  # staged weights in the engine pod's /dev/shm
    engine_shm_bytes: int  # the engine pod's /dev/shm emptyDir sizeLimit
    engine_memory_bytes: int  # the vllm container's request = limit
    loader_memory_bytes: int  # the loader sidecar's request = limit (0: no sidecar)


def derive(values: Values) -> DerivedSizes:
    cache = values.cache.settings
    arena = _setting(CacheConfig, cache, "shm_bytes")
    dram = _setting(CacheConfig, cache, "dram_bytes")
    staging = _setting(CacheConfig, cache, "io_staging_bytes")
    daemon = arena + dram + staging + values.cache.memory_overhead_bytes
    loader = values.engine.loader
    runs = loader.enabled and bool(loader.uri)
    capacity = _setting(LoaderConfig, loader.settings, "capacity_bytes") if runs else 0
    engine_shm = values.engine.shm_bytes + capacity
    return DerivedSizes(
        arena_bytes=arena,
        daemon_memory_bytes=daemon,
        loader_capacity_bytes=capacity,
        engine_shm_bytes=engine_shm,
        engine_memory_bytes=values.engine.memory_bytes + values.engine.shm_bytes,
        loader_memory_bytes=capacity + LOADER_OVERHEAD_BYTES if runs else 0,
    )
