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
"""

from loader.sidecar.client import LoadedCheckpoint, SidecarClient, SidecarHealth, StageResult
from loader.sidecar.config import LoaderConfig

__all__ = ["LoadedCheckpoint", "LoaderConfig", "SidecarClient", "SidecarHealth", "StageResult"]
