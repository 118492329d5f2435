"""The loader sidecar: a gRPC service that stages checkpoints in host shared memory, and
the client engines use to map them (issue 5).

Layout::

    config.py    LoaderConfig: flags, SHOAL_LOADER_* variables, the [loader] TOML table
    staging.py   Stager: one shared-memory segment per checkpoint, coalesced stagings,
                 capacity, cancellation (no gRPC here)
    files.py     a whole staging presented as its origin's files, for peers to read
    status.py    loader errors <-> gRPC status codes, both directions
    service.py   the gRPC servicer over a Stager
    server.py    SidecarServer: lock, stale cleanup, Unix socket or TCP + TLS
    client.py    SidecarClient, LoadedCheckpoint (zero-copy mapping, optional device copy)
    cli.py       `shoal loader serve|prefetch|list|evict|health`
    _proto/      generated from proto/loader.proto by scripts/gen-proto

Data flow: engine -> SidecarClient.load(uri) -> Load RPC -> Stager (source -> streamer ->
segment in /dev/shm) -> tensor table -> the engine maps the segment and copies to its GPU.
A replica on another host reads a staged checkpoint's files instead: PeerSource
(``peer://host:port/<uri>``) -> Files, Read RPCs -> header bytes and segment bytes.

The names below are imported on first use (PEP 562), not with the package: importing any
submodule (``loader.sidecar.config``, ``.staging``, ``.cli``) runs this file, and the client
needs grpc and protobuf, which only ``pip install 'shoal[loader]'`` brings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader.sidecar.client import LoadedCheckpoint, SidecarClient, SidecarHealth, StageResult
    from loader.sidecar.config import LoaderConfig

__all__ = ["LoadedCheckpoint", "LoaderConfig", "SidecarClient", "SidecarHealth", "StageResult"]

_HOMES = {
    "LoadedCheckpoint": "loader.sidecar.client",
    "SidecarClient": "loader.sidecar.client",
    "SidecarHealth": "loader.sidecar.client",
    "StageResult": "loader.sidecar.client",
    "LoaderConfig": "loader.sidecar.config",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
