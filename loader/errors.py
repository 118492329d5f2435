"""The loader's exceptions.

::

    ShoalError
     └── LoaderError
          ├── CheckpointError     a file is not a valid safetensors checkpoint (names the
          │                       file and, where it applies, the tensor)
          ├── IntegrityError      bytes read do not match the published digest
          └── SourceError         a source failed (names the source and the object)
               ├── ObjectNotFound      no such object / file / key
               ├── AccessDenied        credentials refused, or a path outside the roots
               └── SourceUnavailable   transient failures persisted past the retries

Foreign errors (``OSError``, ``botocore`` errors, ``urllib3`` errors) are translated once,
in the source that met them.
"""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = [
    "AccessDenied",
    "CheckpointError",
    "IntegrityError",
    "LoaderError",
    "ObjectNotFound",
    "SourceError",
    "SourceUnavailable",
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
