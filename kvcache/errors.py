"""The KV-cache exception tree; foreign errors are translated at the client/daemon edge.

::

    ShoalError (shoal.errors)
     └── CacheError
          ├── CacheUnavailable     daemon not running, not answering in time, or gone
          │    └── UntrustedEndpoint  its socket dir or arena is not this user's own and private
          ├── ProtocolError        a malformed, oversized or wrong-version message
          ├── RequestRejected      the daemon refused a request (reply carries code + reason)
          ├── CorruptBlock         a block failed its checksum (store turns it into a miss)
          └── ArenaError           the shared-memory arena cannot be created or mapped

A shortage (no space, a miss) is a return value, never an exception.
"""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = [
    "ArenaError",
    "CacheError",
    "CacheUnavailable",
    "CorruptBlock",
    "ProtocolError",
    "RequestRejected",
    "UntrustedEndpoint",
]


class CacheError(ShoalError):
    """Base class of the KV-cache errors."""


class CacheUnavailable(CacheError):
    """The daemon is not running, did not answer in time, or went away."""


class UntrustedEndpoint(CacheUnavailable):
    """The daemon's socket directory, socket or arena is not private to this user.

    Someone else could have put it there to pose as the daemon; the message names the
    path, its owner and mode, and what they must be.
    """


class ProtocolError(CacheError):
    """A message was malformed, oversized or of an unknown version.

    ``code`` is the wire error code the daemon answers with (``messages.ErrorCode``).
    """

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


class RequestRejected(CacheError):
    """The daemon answered a request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class CorruptBlock(CacheError):
    """A block's bytes do not match its checksum."""


class ArenaError(CacheError):
    """The shared-memory arena could not be created, locked or mapped."""
