"""``vllm serve MODEL --load-format shoal``: vLLM's weights streamed through Shoal's loader.

Registration goes through vLLM's public model-loader registry (``register_model_loader``;
nothing private of vLLM's is read), from vLLM's general-plugin entry point
(``[project.entry-points."vllm.general_plugins"]`` in pyproject.toml), which vLLM runs in
every process before it resolves a load format; ``register`` runs once per process
(``functools.cache``), as vLLM may call it more than once.

Where the weights come from: the ``model_weights`` key of ``--model-loader-extra-config``
if given, else vLLM's ``ModelConfig.model_weights`` (set when vLLM itself pulled an
object-store model's config), else ``MODEL``. Each is any loader URI: a local folder,
``s3://bucket/prefix``, ``http(s)://host/prefix`` or a peer sidecar holding one
(``peer://host:port/s3://...``, ``peer+unix:///x.sock/...``). vLLM reads the model's config
and tokenizer from ``MODEL`` itself, before any loader runs: it takes anything but an
``s3://``/``gs://``/``az://`` URI for a folder or a hub id, and pulls those through Run:ai's
streamer, which a plain (or CPU) vLLM lacks. So ``MODEL`` is a local folder with the small
files (config, tokenizer; no weights needed) and ``model_weights`` names the remote
weights; ``vllm serve s3://...`` works only where ``runai-model-streamer`` is installed, and
vLLM finds no config at a ``peer://`` or ``http://`` ``MODEL`` (it is neither a folder nor
a hub id).
``--model-loader-extra-config`` keys (all optional): ``model_weights``, ``concurrency``,
``chunk_bytes``, ``max_inflight_bytes``, ``rate_bytes_per_s``, ``order`` (file | layers),
``s3_endpoint``, ``direct``, ``cache_dir`` (write-through disk cache), ``tls_ca`` (a TLS
peer's CA bundle), ``tls_cert`` and ``tls_key`` (this engine's certificate for a peer
requiring mutual TLS), ``tp_slicing`` (default true; false reads every tensor whole on
every rank).

Tensor parallelism (M13): each rank reads only its own slice of the tensors vLLM shards
(the planner's ``TensorSlice``, with the rank and world size vLLM's parallel state gives),
so N ranks read the checkpoint about once between them instead of N times. vLLM's
model classes shard weights themselves: each parameter's ``weight_loader`` takes the *full*
checkpoint tensor and ``narrow``s it to its rank's part. So a sliced weight is handed over
as a ``RankSlice``: a tensor with the full shape and dtype (on the meta device: no memory)
whose ``narrow`` to exactly the part this rank read returns those bytes. Any other use of
it (another narrow, a copy of the whole, arithmetic) raises ``LoaderError`` naming the
tensor and ``tp_slicing``: a model whose loader shards differently from the rules below
fails loudly, it never loads bytes nobody read. The rules (``vllm_slice_rule``): vLLM's
Llama-family layout: q/gate/up projections split along dim 0 into ``tp`` parts, k/v along
dim 0 into ``min(tp, num_kv_heads)`` parts (ranks share a KV head when there are fewer
heads than ranks, as vLLM's ``QKVParallelLinear`` does), o/down projections along the last
dimension; embeddings, the LM head (vLLM pads the vocabulary per rank), norms and biases
are read whole. (The streamer joins a row-parallel slice's short rows into one read of the
tensor, so those save host memory, not bytes read; column-parallel ones, about two thirds
of a Llama layer, are read once between the ranks.) Tensors are handed to
``model.load_weights`` as they complete, in ``order``, so copying into parameters overlaps
the reads still in flight.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from loader.checkpoint import open_checkpoint
from loader.errors import LoaderError
from loader.plan import TensorSlice
from loader.sources import open_source
from loader.stream import Streamer, StreamOptions

__all__ = [
    "LOAD_FORMAT",
    "RankSlice",
    "ShoalModelLoader",
    "register",
    "tensor_parallel",
    "vllm_slice_rule",
]

LOAD_FORMAT = "shoal"
_OPTION_KEYS = {"concurrency", "chunk_bytes", "max_inflight_bytes", "rate_bytes_per_s", "order"}
_SOURCE_KEYS = {"s3_endpoint", "direct", "cache_dir", "tls_ca", "tls_cert", "tls_key"}
_LOADER_KEYS = {"tp_slicing", "model_weights"}

# (pattern, dim, kind): kind "all" splits into tp parts, "kv" into min(tp, num_kv_heads).
_VLLM_RULES: tuple[tuple[re.Pattern[str], int, str], ...] = (
    (re.compile(r"(q_proj|gate_proj|up_proj)\.weight$"), 0, "all"),
    (re.compile(r"(k_proj|v_proj)\.weight$"), 0, "kv"),
    (re.compile(r"(o_proj|down_proj)\.weight$"), -1, "all"),
)
# What may be asked of a RankSlice besides the narrow to its part: metadata only.
_METADATA = frozenset({"__get__", "size", "dim", "numel", "ndimension", "nelement",
                       "element_size", "__len__", "__repr__", "__format__"})  # fmt: skip


def tensor_parallel() -> tuple[int, int]:
    """(rank, world size) of this process in vLLM's tensor-parallel group; (0, 1) where
    vLLM's parallel state is not initialised (a single process)."""
    from vllm.distributed import parallel_state

    if not parallel_state.model_parallel_is_initialized():  # type: ignore[no-untyped-call]
        return 0, 1
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())  # fmt: skip


def vllm_slice_rule(
    rank: int, size: int, num_kv_heads: int
) -> Callable[[str, tuple[int, ...]], TensorSlice | None]:
    """The ``slice_for`` matching how vLLM's Llama-family layers narrow full tensors
    (module docstring); ``None`` (read whole) for everything else."""
    assert 0 <= rank < size, f"tp rank {rank} outside [0, {size})"
    kv_parts = max(1, min(size, num_kv_heads))
    replicas = max(1, size // kv_parts)

    def slice_for(name: str, shape: tuple[int, ...]) -> TensorSlice | None:
        if size == 1 or len(shape) != 2:
            return None
        for pattern, dim, kind in _VLLM_RULES:
            if pattern.search(name):
                if kind == "kv":
                    return TensorSlice(dim, rank // replicas, kv_parts)
                return TensorSlice(dim, rank, size)
        return None

    return slice_for


class RankSlice(torch.Tensor):
    """A full checkpoint tensor as vLLM's weight loaders see it, of which this rank read
    only ``part`` (``dim`` from ``start``): the module docstring's contract."""

    _part: torch.Tensor
    _dim: int
    _start: int
    _name: str

    @staticmethod
    def __new__(
        cls, name: str, part: torch.Tensor, full_shape: tuple[int, ...], dim: int, start: int
    ) -> RankSlice:
        meta = torch.empty(full_shape, dtype=part.dtype, device="meta")
        self = torch.Tensor._make_subclass(cls, meta)
        self._part, self._dim, self._start, self._name = part, dim % len(full_shape), start, name
        return self

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in (torch.Tensor.narrow, torch.narrow):
            return _narrow(*args, **kwargs)
        if getattr(func, "__name__", "") in _METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        target = next(a for a in args if isinstance(a, RankSlice))
        raise LoaderError(
            f"{target._name}: vLLM's weight loader used the full tensor "
            f"({getattr(func, '__name__', func)}), but this rank read only its slice; "
            "the model shards it differently from the rules in loader.vllm: set "
            "--model-loader-extra-config '{\"tp_slicing\": false}' to read it whole"
        )


def _narrow(tensor: RankSlice, dim: int, start: int, length: int) -> torch.Tensor:
    part = tensor._part
    if (dim % tensor.dim(), start, length) != (tensor._dim, tensor._start, part.shape[tensor._dim]):
        raise LoaderError(
            f"{tensor._name}: vLLM narrowed dim {dim} to [{start}, {start + length}), but "
            f"this rank read dim {tensor._dim} [{tensor._start}, "
            f"{tensor._start + part.shape[tensor._dim]}); set "
            "--model-loader-extra-config '{\"tp_slicing\": false}' to read it whole"
        )
    return part


class ShoalModelLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        extra = dict(load_config.model_loader_extra_config or {})
        known = _OPTION_KEYS | _SOURCE_KEYS | _LOADER_KEYS
        unknown = set(extra) - known
        if unknown:
            raise ValueError(
                f"--model-loader-extra-config for --load-format shoal: unknown keys "
                f"{sorted(unknown)} (known: {sorted(known)})"
            )
        self.tp_slicing = bool(extra.get("tp_slicing", True))
        self.model_weights = str(extra.get("model_weights") or "")
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
        """Where the weights are read from (module docstring)."""
        return self.model_weights or str(
            getattr(model_config, "model_weights", None) or model_config.model
        )

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: validate that the checkpoint is there and well formed."""
        source, file = open_source(self._uri(model_config), **self.source_options)
        try:
            open_checkpoint(source, file)
        finally:
            source.close()

    def weights(self, model_config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for ``model.load_weights``: whole tensors, and this rank's
        slices as ``RankSlice`` when tensor parallel (module docstring)."""
        rank, size = tensor_parallel()
        sliced: dict[str, tuple[tuple[int, ...], TensorSlice]] = {}
        slice_for = None
        if self.tp_slicing and size > 1:
            rule = vllm_slice_rule(rank, size, _num_kv_heads(model_config))

            def slice_for(name: str, shape: tuple[int, ...]) -> TensorSlice | None:
                spec = rule(name, shape)
                if spec is not None:
                    sliced[name] = (shape, spec)
                return spec

        source, file = open_source(self._uri(model_config), **self.source_options)
        try:
            plans = open_checkpoint(source, file).plan(slice_for)
            for name, tensor in Streamer(source, plans, self.options):
                if name not in sliced:
                    yield name, tensor
                    continue
                shape, spec = sliced[name]
                start = spec.rank * shape[spec.dim] // spec.size
                yield name, RankSlice(name, tensor, shape, spec.dim, start)
        finally:
            source.close()

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        model.load_weights(self.weights(model_config))  # type: ignore[operator]


def _num_kv_heads(model_config: ModelConfig) -> int:
    hf = model_config.hf_config
    heads = getattr(hf, "num_key_value_heads", None) or getattr(hf, "num_attention_heads", 1)
    return int(heads or 1)


@functools.cache  # once per process: vLLM may run its plugins more than once
def register() -> None:
    """vLLM general-plugin hook: make ``--load-format shoal`` resolve to this loader."""
    register_model_loader(LOAD_FORMAT)(ShoalModelLoader)
