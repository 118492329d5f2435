"""The simulator's exception tree.

::

    ShoalError
     └── SimError
          ├── ProfileError        a --profile file is missing, malformed or out of range
          ├── EngineStartError    a simulated engine process did not become healthy
          ├── CalibrationError    a calibration run got errors or too few measurements
          └── RequestError        a request the OpenAI server answers with an error JSON
                                  (status, vLLM's ``type`` and ``param``)

Configuration mistakes raise ``shoal.errors.ConfigError`` (the CLI prints one line).
aiohttp and ZeroMQ errors are translated where they happen (``server.py``, ``events.py``).
"""

from __future__ import annotations

from shoal.errors import ShoalError

__all__ = ["CalibrationError", "EngineStartError", "ProfileError", "RequestError", "SimError"]


class SimError(ShoalError):
    """Base of every error the simulator raises on purpose."""


class ProfileError(SimError):
    """A step-time profile cannot be read or has invalid coefficients."""


class EngineStartError(SimError):
    """A simulated engine process exited or never answered /health."""


class CalibrationError(SimError):
    """A calibration run could not measure what the fit needs."""


class RequestError(SimError):
    """A request vLLM would refuse; ``server.py`` turns it into vLLM's error JSON.

    ``error_type`` is vLLM's ``error.type`` ("BadRequestError", "NotFoundError", ...).
    """

    def __init__(
        self,
        message: str,
        status: int = 400,
        error_type: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.error_type = error_type
        self.param = param
