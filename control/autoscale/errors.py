"""The autoscaler's exception tree (STYLE.md §7)::

    ShoalError
      AutoscaleError
        PolicyConfigError     (also ConfigError) unknown policy, option or bad target
        TraceError            a trace file that cannot be read or parsed
        ActuatorError         the scale target could not be read or scaled
          ActuatorNotFound    it does not exist (the message names it and the namespace)
        WrongModel            a wake for a model this controller does not scale

Foreign errors (``kubernetes.client.ApiException``, ``aiohttp.ClientError``, ``OSError``)
are translated once, in the module that calls the foreign library. A failed *scrape* is not
an error: it is an unknown value (``ReplicaSample.ok=False``).
"""

from __future__ import annotations

from shoal.errors import ConfigError, ShoalError

__all__ = [
    "ActuatorError",
    "ActuatorNotFound",
    "AutoscaleError",
    "PolicyConfigError",
    "TraceError",
    "WrongModel",
]


class AutoscaleError(ShoalError):
    """Base of every error the autoscaler raises on purpose."""


class PolicyConfigError(AutoscaleError, ConfigError):
    """An unknown policy or option, or a bad target; the message names the fix."""


class TraceError(AutoscaleError):
    """A trace file that cannot be read or parsed; the message names the file and line."""


class ActuatorError(AutoscaleError):
    """The scale target could not be read or scaled."""


class ActuatorNotFound(ActuatorError):
    """The scale target does not exist."""


class WrongModel(AutoscaleError):
    """A wake for a model other than ``--model``: answered without touching the target."""
