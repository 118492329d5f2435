"""vLLM's general-plugin hook for ``--load-format shoal``, cheap in every vLLM process.

vLLM runs each installed ``vllm.general_plugins`` entry point in every process it starts
(API server, engine core, each worker), whether or not ``--load-format shoal`` is used.
So ``register`` imports nothing of Shoal's loader: it registers a stand-in loader class,
and only when vLLM builds the loader for ``--load-format shoal`` does the stand-in import
``loader.vllm`` (the streamer, the sources) and hand every call to the real
``loader.vllm.ShoalModelLoader``. Without the ``loader`` extra that is an ImportError naming
``pip install 'shoal[loader]'`` for the one engine asking for the format, not for others.

Rejected: the entry point naming ``loader.vllm:register`` (it imported the loader, its
sources and vLLM's model-loader modules into every vLLM process of anyone who installed
``shoal``, audit M1); checking the extra at registration (``find_spec`` for six packages in
every process, for a format most processes never use).
"""

from __future__ import annotations

from typing import Any

__all__ = ["LOAD_FORMAT", "register"]

LOAD_FORMAT = "shoal"  # loader.vllm.LOAD_FORMAT, repeated so this module imports nothing
_registered: set[str] = set()  # the formats this process registered


def register() -> None:
    """vLLM general-plugin hook: make ``--load-format shoal`` resolve (idempotent)."""
    if LOAD_FORMAT in _registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    register_model_loader(LOAD_FORMAT)(_stand_in(BaseModelLoader))
    _registered.add(LOAD_FORMAT)


def _stand_in(base: type[Any]) -> type[Any]:
    """A ``BaseModelLoader`` subclass that builds the real loader when vLLM builds it."""

    class ShoalModelLoader(base):  # type: ignore[misc]
        """``--load-format shoal``: delegates to ``loader.vllm.ShoalModelLoader``."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            try:
                from loader.vllm import ShoalModelLoader as Real
            except ModuleNotFoundError as exc:
                raise ImportError(
                    f"--load-format shoal needs the 'loader' extra (no module named "
                    f"{exc.name}); install it with: pip install 'shoal[loader]'"
                ) from exc
            self.loader = Real(load_config)

        def download_model(self, model_config: Any) -> None:
            self.loader.download_model(model_config)

        def load_weights(self, model: Any, model_config: Any) -> None:
            self.loader.load_weights(model, model_config)

    return ShoalModelLoader
