"""``ShoalConnector``: vLLM's public v1 KV connector API over the Shoal node daemon.

Load it without patching vLLM::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "ShoalConnector",
        "kv_connector_module_path": "kvcache.connector.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"chunk_tokens": 256}}'

(settings: ``kvcache.connector.settings``). vLLM builds one instance in the scheduler
process (role SCHEDULER: ``kvcache.connector.scheduler``) and one per worker (role WORKER:
``kvcache.connector.worker``); this module only adapts vLLM's calls to those two.

Compatibility. Only the public base class and duck-typed request/output objects are used.
Signatures that changed across vLLM releases are bridged here: constructors without
``kv_cache_config`` (before 0.10), ``get_num_new_matched_tokens`` returning a bare count,
``update_state_after_alloc`` receiving a block list instead of ``KVCacheBlocks``, and block
ids per KV-cache group or flat. Methods a release does not call are harmless.

Block keys. Every engine process computes the same keys for the same model and tokens:
the namespace holds the model identity (``model_id``, default the served model and its
revision), the KV dtype, the tensor-parallel rank and size, and the KV layout (vLLM minor
version, its named cache layout, block size and attention spec), because the stored
bytes are the engine's own layout. Each rank stores its shard under its own namespace; the
scheduler counts a hit only as far as every rank has the chunk.

Hybrid models (several KV-cache groups) are not supported: vLLM turns its hybrid manager
off for connectors without HMA support, and the connector uses the first group.
"""

from __future__ import annotations

import inspect
import logging
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from kvcache.connector.plan import ChunkGeometry, StepPlan
from kvcache.connector.scheduler import ConnectorScheduler
from kvcache.connector.settings import ConnectorSettings
from kvcache.connector.worker import ConnectorWorker
from kvcache.keys import Namespace

if TYPE_CHECKING:
    import torch

__all__ = ["ShoalConnector", "ShoalConnectorMetadata", "engine_namespace"]

log = logging.getLogger("shoal." + __name__)

_BASE_TAKES_KV_CACHE_CONFIG = (
    "kv_cache_config" in inspect.signature(KVConnectorBase_V1.__init__).parameters
)
_MATCH_RETURNS_TUPLE = "tuple" in str(
    inspect.signature(KVConnectorBase_V1.get_num_new_matched_tokens).return_annotation
)


class ShoalConnectorMetadata(KVConnectorMetadata):
    """The step's plan, shipped from the scheduler to every worker."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class ShoalConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        if _BASE_TAKES_KV_CACHE_CONFIG:
            super().__init__(vllm_config, role, kv_cache_config)
        else:
            super().__init__(vllm_config, role)  # type: ignore[call-arg]
        self._kv_cache_config = kv_cache_config
        transfer = vllm_config.kv_transfer_config
        self.settings = ConnectorSettings.from_extra_config(
            getattr(transfer, "kv_connector_extra_config", None)
        )
        block_size = int(vllm_config.cache_config.block_size)
        self.geometry = ChunkGeometry(block_size, self.settings.chunk_tokens_for(block_size))
        tp_size = int(vllm_config.parallel_config.tensor_parallel_size)
        namespaces = [
            engine_namespace(vllm_config, kv_cache_config, self.settings, rank, tp_size)
            for rank in range(tp_size)
        ]
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = ConnectorScheduler(
                self.settings, self.geometry, [ns.digest for ns in namespaces]
            )
        else:
            rank = _tensor_parallel_rank(tp_size)
            self._worker = ConnectorWorker(
                self.settings, self.geometry, rank, namespaces[rank].label()
            )
        log.info(
            "ShoalConnector %s: %d-token chunks over %d-token blocks, namespace %s",
            role.name, self.geometry.chunk_tokens, block_size, namespaces[0].label(),
        )  # fmt: skip

    # -- scheduler side ---------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Any:
        assert self._scheduler is not None
        count, is_async = self._scheduler.matched_tokens(request, num_computed_tokens)
        if _MATCH_RETURNS_TUPLE:
            return count, is_async
        return count or 0  # releases before "ask again" answered a bare count

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert self._scheduler is not None
        self._scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        assert self._scheduler is not None
        return ShoalConnectorMetadata(self._scheduler.build_plan(scheduler_output))

    def update_connector_output(self, connector_output: Any) -> None:
        assert self._scheduler is not None
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if invalid:
            self._scheduler.load_failed(invalid)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        assert self._scheduler is not None
        return self._scheduler.finished(request)

    # -- worker side ------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        num_blocks = getattr(self._kv_cache_config, "num_blocks", None) or getattr(
            self._vllm_config.cache_config, "num_gpu_blocks", None
        )
        if not num_blocks:
            raise ValueError("ShoalConnector: vLLM did not say how many KV blocks it allocated")
        self._worker.register(kv_caches, int(num_blocks))

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self._worker is not None and isinstance(connector_metadata, ShoalConnectorMetadata):
            self._worker.bind(connector_metadata.plan)

    def clear_connector_metadata(self) -> None:
        super().clear_connector_metadata()
        if self._worker is not None:
            self._worker.unbind()

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        assert self._worker is not None
        self._worker.start_loads()

    def wait_for_layer_load(self, layer_name: str) -> None:
        assert self._worker is not None
        self._worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        assert self._worker is not None
        self._worker.save_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        assert self._worker is not None
        self._worker.finish()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, None  # loads and saves complete within their step

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._worker is not None:
            self._worker.close()


def engine_namespace(
    vllm_config: Any,
    kv_cache_config: Any,
    settings: ConnectorSettings,
    tp_rank: int,
    tp_size: int,
) -> Namespace:
    """The block-key namespace of one rank of this engine (the same in every process)."""
    import vllm

    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    model = settings.model_id or f"{model_config.model}@{model_config.revision or 'main'}"
    kv_dtype = str(cache_config.cache_dtype)
    if kv_dtype == "auto":
        kv_dtype = str(model_config.dtype).removeprefix("torch.")
    minor = ".".join(vllm.__version__.split(".")[:2])
    named_layout = getattr(cache_config, "kv_cache_layout", None) or "default"
    spec = _attention_spec(kv_cache_config, vllm_config, tp_size)
    layout = f"vllm{minor}/{named_layout}/b{cache_config.block_size}/{spec}"
    return Namespace(
        model=model,
        kv_dtype=kv_dtype,
        layout=layout,
        tp_rank=tp_rank,
        tp_size=tp_size,
        extra=settings.namespace_extra,
    )


def _attention_spec(kv_cache_config: Any, vllm_config: Any, tp_size: int) -> str:
    groups = getattr(kv_cache_config, "kv_cache_groups", None)
    if groups:
        spec = groups[0].kv_cache_spec
        heads = getattr(spec, "num_kv_heads", "?")
        head_size = getattr(spec, "head_size", "?")
        return f"{type(spec).__name__}:{heads}x{head_size}"
    model_config = vllm_config.model_config
    heads = model_config.get_num_kv_heads(vllm_config.parallel_config)
    return f"attention:{heads}x{model_config.get_head_size()}"


def _tensor_parallel_rank(tp_size: int) -> int:
    if tp_size == 1:
        return 0
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())
