"""Loader errors ⇄ gRPC status codes: the one place the sidecar's errors cross the wire.

The server sends the code that fits (so any gRPC client can act on it) with the loader's
message, and names the exact exception in the trailing metadata key ``shoal-error``; Shoal's
client raises that exception again, or falls back on the code when the name is absent (a
status made by gRPC itself: no socket, deadline, TLS failure)::

    CheckpointError, ValueError   INVALID_ARGUMENT     the checkpoint or the request is bad
    ObjectNotFound                NOT_FOUND
    UnknownCheckpoint             NOT_FOUND            no such checkpoint id
    AccessDenied                  PERMISSION_DENIED
    SourceUnavailable             UNAVAILABLE          the source, past its retries
    IntegrityError                DATA_LOSS
    CapacityExceeded              RESOURCE_EXHAUSTED
    StagingConflict               FAILED_PRECONDITION
    other SourceError/LoaderError FAILED_PRECONDITION  retrying will not help
    anything else (a bug)         INTERNAL

Client side, a status without the name: UNAVAILABLE and DEADLINE_EXCEEDED are the sidecar
being unreachable (``SidecarUnavailable``); the rest map back by the table above.
"""

from __future__ import annotations

import grpc

from loader.errors import (
    AccessDenied,
    CapacityExceeded,
    CheckpointError,
    IntegrityError,
    LoaderError,
    ObjectNotFound,
    SidecarUnavailable,
    SourceError,
    SourceUnavailable,
    StagingConflict,
    UnknownCheckpoint,
)

__all__ = ["ERROR_KEY", "error_from_rpc", "status_for"]

ERROR_KEY = "shoal-error"
Code = grpc.StatusCode

# Most specific first: the first class the error is an instance of decides.
_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (CheckpointError, Code.INVALID_ARGUMENT),
    (ValueError, Code.INVALID_ARGUMENT),
    (ObjectNotFound, Code.NOT_FOUND),
    (UnknownCheckpoint, Code.NOT_FOUND),
    (AccessDenied, Code.PERMISSION_DENIED),
    (SourceUnavailable, Code.UNAVAILABLE),
    (IntegrityError, Code.DATA_LOSS),
    (CapacityExceeded, Code.RESOURCE_EXHAUSTED),
    (StagingConflict, Code.FAILED_PRECONDITION),
    (SourceError, Code.FAILED_PRECONDITION),
    (LoaderError, Code.FAILED_PRECONDITION),
)
_BY_NAME: dict[str, type[Exception]] = {
    cls.__name__: cls  # type: ignore[misc]
    for cls, _ in _TABLE
}
_BY_CODE: dict[grpc.StatusCode, type[Exception]] = {
    Code.INVALID_ARGUMENT: CheckpointError,
    Code.NOT_FOUND: ObjectNotFound,
    Code.PERMISSION_DENIED: AccessDenied,
    Code.DATA_LOSS: IntegrityError,
    Code.RESOURCE_EXHAUSTED: CapacityExceeded,
    Code.FAILED_PRECONDITION: StagingConflict,
    Code.UNAVAILABLE: SidecarUnavailable,
    Code.DEADLINE_EXCEEDED: SidecarUnavailable,
}


def status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code for ``error`` and the name sent under ``shoal-error``."""
    for cls, code in _TABLE:
        if isinstance(error, cls):
            return code, cls.__name__
    return Code.INTERNAL, type(error).__name__


def error_from_rpc(error: grpc.RpcError, target: str) -> Exception:
    """The loader exception an ``RpcError`` from the sidecar at ``target`` stands for."""
    code = error.code() if isinstance(error, grpc.Call) else Code.UNKNOWN
    details = (error.details() if isinstance(error, grpc.Call) else None) or str(error)
    trailing = error.trailing_metadata() if isinstance(error, grpc.Call) else None
    name = next((str(v) for k, v in trailing or () if k == ERROR_KEY), None)
    cls = _BY_NAME.get(name) if name else None
    if cls is not None:
        return cls(details)
    cls = _BY_CODE.get(code)
    if cls is SidecarUnavailable:
        return SidecarUnavailable(f"loader sidecar at {target}: {code.name}: {details}")
    if cls is not None:
        return cls(details)
    return LoaderError(f"loader sidecar at {target}: {code.name}: {details}")
