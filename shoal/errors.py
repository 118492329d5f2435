"""Root of every Shoal exception tree.

::

    ShoalError
     └── ConfigError            bad flag, environment variable or config file
                                (the message names the fix)

Each component draws its own subtree under ``ShoalError`` in its ``errors`` module and
translates foreign errors (``zmq.ZMQError``, ``OSError``, ...) once, at its edge.
"""

from __future__ import annotations

__all__ = ["ConfigError", "ShoalError"]


class ShoalError(Exception):
    """Base class of every error Shoal raises on purpose."""


class ConfigError(ShoalError):
    """A configuration value is missing, malformed or out of range."""
