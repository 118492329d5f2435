"""The loader's exceptions.

::

    ShoalError
     └── LoaderError
          ├── CheckpointError     a file is not a valid safetensors checkpoint (names the
          │                       file and, where it applies, the tensor)
          ├── IntegrityError      bytes read do not match the published digest
          ├── SourceError         a source failed (names the source and the object)
          │    ├── ObjectNotFound      no such object / file / key
          │    ├── AccessDenied        credentials refused, or a path outside the roots
          │    └── SourceUnavailable   transient failures persisted past the retries
          ├── CapacityExceeded    the sidecar cannot stage a checkpoint that large now
          ├── UnknownCheckpoint   the sidecar holds no checkpoint with that id (or, asked
          │                       as a peer, none staged from that URI)
          ├── StagingConflict     the request needs a state the checkpoint is not in
          │                       (evicting one still staging), or staging was cancelled
          └── SidecarUnavailable  the sidecar cannot be reached (no socket, refused, TLS)

Foreign errors (``OSError``, ``botocore`` errors, ``urllib3`` errors) are translated once,
in the source that met them; ``grpc.RpcError`` once, in the sidecar's client
(``loader.sidecar.client``), back into the error the sidecar raised.
"""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = [
    "AccessDenied",
    "CapacityExceeded",
    "CheckpointError",
    "IntegrityError",
    "LoaderError",
    "ObjectNotFound",
    "SidecarUnavailable",
    "SourceError",
    "SourceUnavailable",
    "StagingConflict",
    "UnknownCheckpoint",
]


class LoaderError(ShoalError):
    """Base of every error the loader raises on purpose."""


class CheckpointError(LoaderError):
    """A checkpoint file is malformed: truncated, inconsistent or of an unknown dtype."""


class IntegrityError(LoaderError):
    """Bytes read from a source do not match the digest published for them."""


class SourceError(LoaderError):
    """A source could not deliver an object or a byte range."""


class ObjectNotFound(SourceError):
    """The object (file, key, URL) does not exist."""


class AccessDenied(SourceError):
    """The source refused the credentials, or the path lies outside the allowed roots."""


class SourceUnavailable(SourceError):
    """The source kept failing after the configured retries."""


class CapacityExceeded(LoaderError):
    """Staging a checkpoint would exceed the sidecar's capacity (the message names sizes)."""


class UnknownCheckpoint(LoaderError):
    """The sidecar holds no checkpoint with the given id (never staged, or evicted)."""


class StagingConflict(LoaderError):
    """The checkpoint is not in the state the request needs (still staging, cancelled)."""


class SidecarUnavailable(LoaderError):
    """The loader sidecar could not be reached: no socket, connection refused, TLS failed."""
