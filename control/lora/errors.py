"""The LoRA manager's exception tree (STYLE.md §7)::

    ShoalError
      LoraError
        LoraConfigError       (also ConfigError) bad settings or a bad registration
                              (a name, base model or source that cannot work)
        AdapterNotFound       no registered adapter has that name (HTTP 404)
        AdapterConflict       the name is registered already with another base or
                              source (HTTP 409)
        NoEngine              no healthy engine serves the adapter's base model (503)
        AdapterSourceError    the adapter could not be fetched or is not an adapter
          AdapterFilesMissing   adapter_config.json or adapter_model.safetensors absent
          AdapterCorrupt        a file is there but is not what it must be (JSON object,
                                safetensors with a valid header)
        StateFileError        the registry's state file cannot be read or written
        EngineError           an engine's runtime LoRA API failed
          EngineUnreachable     no answer (refused, timed out, connection broken)
          LoraUpdatesDisabled   the route is absent (404): the engine runs without
                                ``--enable-lora`` / ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``
          LoadRejected          the engine answered an error to a load or unload
                                (``status`` holds the HTTP status)
          AnswerTooLarge        an answer's body ran past its cap (``engines.read_body``)
          UnloadFailed          removing an adapter: an engine could not unload it (it
                                stays registered; the message names the engines)

Foreign errors are translated once: the loader's ``SourceError``/``CheckpointError`` in
``sources.py``, ``aiohttp.ClientError`` and timeouts in ``engines.py``, ``OSError`` of the
state file in ``registry.py``. A failed engine poll is not raised out of a round: the
engine is skipped (unknown, not empty) and the round goes on.
"""

from __future__ import annotations

from shoal.errors import ConfigError, ShoalError

__all__ = [
    "AdapterConflict",
    "AdapterCorrupt",
    "AdapterFilesMissing",
    "AdapterNotFound",
    "AdapterSourceError",
    "AnswerTooLarge",
    "EngineError",
    "EngineUnreachable",
    "LoadRejected",
    "LoraConfigError",
    "LoraError",
    "LoraUpdatesDisabled",
    "NoEngine",
    "StateFileError",
    "UnloadFailed",
]


class LoraError(ShoalError):
    """Base of every error the LoRA manager raises on purpose."""


class LoraConfigError(LoraError, ConfigError):
    """Bad settings or a registration that cannot work; the message names the fix."""


class AdapterNotFound(LoraError):
    """No registered adapter has this name."""


class AdapterConflict(LoraError):
    """The name is registered already, with another base model or source."""


class NoEngine(LoraError):
    """No healthy engine serves the adapter's base model (or the named engine is unknown)."""


class AdapterSourceError(LoraError):
    """The adapter could not be fetched from its source."""


class AdapterFilesMissing(AdapterSourceError):
    """``adapter_config.json`` or ``adapter_model.safetensors`` is not at the source."""


class AdapterCorrupt(AdapterSourceError):
    """An adapter file is present but malformed (the message names the file and why)."""


class StateFileError(LoraError):
    """The registry's state file cannot be read or written."""


class EngineError(LoraError):
    """An engine's runtime LoRA API failed."""


class EngineUnreachable(EngineError):
    """The engine did not answer (refused, timed out, broke the connection)."""


class LoraUpdatesDisabled(EngineError):
    """The engine has no runtime LoRA routes (started without --enable-lora or without
    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""


class LoadRejected(EngineError):
    """The engine answered an error to a load or an unload."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class AnswerTooLarge(EngineError):
    """An HTTP answer's body was longer than the reader's cap (read until EOF, refused past it)."""


class UnloadFailed(EngineError):
    """Removing an adapter: unloading it failed on some engines, so it stays registered."""
