"""``vllm serve MODEL --load-format shoal``: vLLM's weights streamed through Shoal's loader.

Registration goes through vLLM's public model-loader registry (``register_model_loader``),
from vLLM's general-plugin entry point (``[project.entry-points."vllm.general_plugins"]``
in pyproject.toml), which vLLM runs in every process before it resolves a load format; the
function is idempotent, as vLLM may call it more than once.

``MODEL`` (or ``--model-weights``) is any loader URI: a local folder, ``s3://bucket/prefix``,
``http(s)://host/prefix`` or a peer sidecar holding one (``peer://host:port/s3://...``).
``--model-loader-extra-config`` keys (all optional): ``concurrency``, ``chunk_bytes``,
``max_inflight_bytes``, ``rate_bytes_per_s``, ``order`` (file | layers), ``s3_endpoint``,
``direct``, ``cache_dir`` (write-through disk cache), ``tls_ca`` (a TLS peer's CA bundle),
``tls_cert`` and ``tls_key`` (this engine's certificate for a peer requiring mutual TLS).

vLLM's model classes shard weights themselves (each parameter's ``weight_loader`` slices the
full checkpoint tensor for its tensor-parallel rank), so this loader streams whole tensors;
reading only a rank's slice needs the sidecar path or ``shoal load --tp-rank``, not this
one. Tensors are handed to ``model.load_weights`` as they complete, in ``order``, so
copying into parameters overlaps the reads still in flight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from loader.checkpoint import open_checkpoint
from loader.sources import open_source
from loader.stream import Streamer, StreamOptions

__all__ = ["LOAD_FORMAT", "ShoalModelLoader", "register"]

LOAD_FORMAT = "shoal"
_OPTION_KEYS = {"concurrency", "chunk_bytes", "max_inflight_bytes", "rate_bytes_per_s", "order"}
_SOURCE_KEYS = {"s3_endpoint", "direct", "cache_dir", "tls_ca", "tls_cert", "tls_key"}


class ShoalModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        unknown = set(extra) - _OPTION_KEYS - _SOURCE_KEYS
        if unknown:
            raise ValueError(
                f"--model-loader-extra-config for --load-format shoal: unknown keys "
                f"{sorted(unknown)} (known: {sorted(_OPTION_KEYS | _SOURCE_KEYS)})"
            )
        self.options = StreamOptions(**{k: v for k, v in extra.items() if k in _OPTION_KEYS})
        self.source_options: dict[str, Any] = {}
        if extra.get("s3_endpoint"):
            self.source_options["endpoint_url"] = str(extra["s3_endpoint"])
        if "direct" in extra:  # default "auto": direct for files the page cache lacks
            direct = extra["direct"]
            self.source_options["direct"] = direct if direct == "auto" else bool(direct)
        if extra.get("cache_dir"):
            self.source_options["cache_dir"] = str(extra["cache_dir"])
        for name in ("tls_ca", "tls_cert", "tls_key"):
            if extra.get(name):
                self.source_options[name] = str(extra[name])

    def _uri(self, model_config: ModelConfig) -> str:
        return str(getattr(model_config, "model_weights", None) or model_config.model)

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: validate that the checkpoint is there and well formed."""
        source, file = open_source(self._uri(model_config), **self.source_options)
        try:
            open_checkpoint(source, file)
        finally:
            source.close()

    def weights(self, model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        source, file = open_source(self._uri(model_config), **self.source_options)
        try:
            plans = open_checkpoint(source, file).plan()
            yield from Streamer(source, plans, self.options)
        finally:
            source.close()

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        model.load_weights(self.weights(model_config))  # type: ignore[operator]


def register() -> None:
    """vLLM general-plugin hook: make ``--load-format shoal`` resolve to this loader."""
    from vllm.model_executor import model_loader

    if model_loader._LOAD_FORMAT_TO_MODEL_LOADER.get(LOAD_FORMAT) is not ShoalModelLoader:
        register_model_loader(LOAD_FORMAT)(ShoalModelLoader)
