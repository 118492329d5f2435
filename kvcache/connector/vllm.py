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
the namespace holds the model identity (``model_id``, default an immutable identity of
the weights: ``kvcache.connector.identity``), the KV dtype, the tensor-parallel rank and
size, the pipeline-parallel stage and stage count (each stage holds other layers), and
the KV layout (vLLM minor version, its named cache layout, block size and attention
spec), because the stored bytes are the engine's own layout. Each (stage, rank) stores
its shard under its own namespace; the scheduler counts a hit only as far as every one
has the chunk. Per request, chunk keys also fold in vLLM's block-hash extra keys (LoRA,
multimodal, cache salt, prompt embeddings: ``kvcache.connector.extra_keys``). Workers
send their namespace in the hello (``Namespace.to_wire``), from which the daemon learns
the engines' key namespace for their KV events.

Metrics and logs. Counters travel by vLLM's connector-stats route to the API server,
which exports them as ``shoal_connector_*`` (``kvcache.connector.metrics``). The
connector's loggers (``shoal.*``) write through the ``vllm`` logger's handlers, the only
ones vLLM configures, at its level.

Hybrid models (several KV-cache groups) are not supported: vLLM turns its hybrid manager
off for connectors without HMA support, and the connector uses the first group.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

from kvcache.connector.identity import model_identity
from kvcache.connector.metrics import METRICS, merge
from kvcache.connector.plan import ChunkGeometry, StepPlan
from kvcache.connector.scheduler import ConnectorScheduler
from kvcache.connector.settings import ConnectorSettings
from kvcache.connector.worker import ConnectorWorker
from kvcache.keys import Namespace

if TYPE_CHECKING:
    import torch

__all__ = [
    "ShoalConnector",
    "ShoalConnectorMetadata",
    "ShoalConnectorStats",
    "ShoalPromMetrics",
    "attach_to_vllm_logging",
    "engine_namespace",
    "engine_namespaces",
]

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


@dataclass
class ShoalConnectorStats(KVConnectorStats):
    """Counter increments (``kvcache.connector.metrics.METRICS`` keys) since the last
    report; vLLM sums the workers' and the scheduler's."""

    def reset(self) -> None:
        self.data = {}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data = merge(self.data, other.data)
        return self

    def reduce(self) -> dict[str, int | float]:
        return {key: round(value, 6) for key, value in sorted(self.data.items())}

    def is_empty(self) -> bool:
        return not any(self.data.values())


class ShoalPromMetrics(KVConnectorPromMetrics):
    """``shoal_connector_*`` counters, created in the process that serves ``/metrics``
    with the metric classes vLLM hands over (multiprocess-aware when vLLM runs several
    API servers) and the labels vLLM uses (``model_name``, ``engine``)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister_previous()  # vLLM may build its stat loggers more than once
        self._counters: dict[str, Any] = {}
        for name, documentation, reason in METRICS.values():
            if name not in self._counters:
                labels = [*labelnames, "reason"] if reason else list(labelnames)
                self._counters[name] = self._counter_cls(
                    name=f"shoal_connector_{name}", documentation=documentation,
                    labelnames=labels,
                )  # fmt: skip

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx)
        if labels is None:
            return
        for key, value in transfer_stats_data.items():
            meta = METRICS.get(key)
            if meta is None or not value:
                continue
            name, _, reason = meta
            counter = self._counters[name]
            child = counter.labels(*labels, reason) if reason else counter.labels(*labels)
            child.inc(value)


def _unregister_previous() -> None:
    from prometheus_client import REGISTRY

    for collector in list(REGISTRY._collector_to_names):  # as vLLM's own unregister does
        if getattr(collector, "_name", "").startswith("shoal_connector_"):
            REGISTRY.unregister(collector)


class _ToVllmHandlers(logging.Handler):
    """Hands each record to the handlers the ``vllm`` logger has *now*, at its level now
    (vLLM may reconfigure its logging after the connector is built), unless the root
    logger has handlers: then the record reaches them by propagation, printed once."""

    def emit(self, record: logging.LogRecord) -> None:
        vllm_logger = logging.getLogger("vllm")
        if not vllm_logger.handlers or logging.getLogger().handlers:
            return
        if record.levelno < vllm_logger.getEffectiveLevel():
            return
        for handler in vllm_logger.handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def attach_to_vllm_logging(names: tuple[str, ...] = ("shoal",)) -> None:
    """Route the connector's loggers to vLLM's output: vLLM configures only its ``vllm``
    logger (in every process, before building connectors), so the connector's records
    would otherwise reach no handler at all. Idempotent. A logger whose level is unset
    takes vLLM's (``VLLM_LOGGING_LEVEL``), so INFO lines show as vLLM's do.
    """
    vllm_logger = logging.getLogger("vllm")
    for name in names:
        ours = logging.getLogger(name)
        if not any(isinstance(h, _ToVllmHandlers) for h in ours.handlers):
            ours.addHandler(_ToVllmHandlers())
        if vllm_logger.handlers and ours.level == logging.NOTSET:
            ours.setLevel(vllm_logger.getEffectiveLevel())


class ShoalConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any = None) -> None:
        attach_to_vllm_logging()
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
        namespaces = engine_namespaces(vllm_config, kv_cache_config, self.settings)
        self._scheduler: ConnectorScheduler | None = None
        self._worker: ConnectorWorker | None = None
        index = 0
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = ConnectorScheduler(
                self.settings, self.geometry, [ns.digest for ns in namespaces]
            )
        else:
            index = _worker_index(vllm_config)
            self._worker = ConnectorWorker(
                self.settings, self.geometry, index, namespaces[index].to_wire()
            )
        log.info(
            "ShoalConnector %s: %d-token chunks over %d-token blocks, namespace %s",
            role.name, self.geometry.chunk_tokens, block_size, namespaces[index].label(),
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

    # -- metrics ----------------------------------------------------------------------

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        side = self._scheduler if self._scheduler is not None else self._worker
        deltas = side.take_stats() if side is not None else {}
        return ShoalConnectorStats(data=deltas) if deltas else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return ShoalConnectorStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVConnectorPromMetrics:
        return ShoalPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.close()
        if self._worker is not None:
            self._worker.close()


def engine_namespaces(
    vllm_config: Any, kv_cache_config: Any, settings: ConnectorSettings
) -> list[Namespace]:
    """Every (pipeline stage, tensor-parallel rank)'s namespace, stage-major: the worker
    of stage ``p`` and rank ``t`` is index ``p * tp_size + t`` (``_worker_index``)."""
    parallel = vllm_config.parallel_config
    tp_size = int(parallel.tensor_parallel_size)
    pp_size = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
    if not settings.model_id:  # resolve (and for a directory, sample the weights) once
        model_config = vllm_config.model_config
        identity = model_identity(str(model_config.model), getattr(model_config, "revision", None))
        settings = dataclasses.replace(settings, model_id=identity)
    return [
        engine_namespace(vllm_config, kv_cache_config, settings, t, tp_size, p, pp_size)
        for p in range(pp_size)
        for t in range(tp_size)
    ]


def engine_namespace(
    vllm_config: Any,
    kv_cache_config: Any,
    settings: ConnectorSettings,
    tp_rank: int,
    tp_size: int,
    pp_rank: int = 0,
    pp_size: int = 1,
) -> Namespace:
    """The block-key namespace of one worker of this engine (the same in every process)."""
    import vllm

    model_config = vllm_config.model_config
    cache_config = vllm_config.cache_config
    model = settings.model_id or model_identity(
        str(model_config.model), getattr(model_config, "revision", None)
    )
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
        pp_rank=pp_rank,
        pp_size=pp_size,
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


def _worker_index(vllm_config: Any) -> int:
    """This worker's index among ``engine_namespaces``."""
    parallel = vllm_config.parallel_config
    tp_size = int(parallel.tensor_parallel_size)
    pp_size = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
    tp_rank = pp_rank = 0
    if tp_size > 1:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        tp_rank = int(get_tensor_model_parallel_rank())
    if pp_size > 1:
        from vllm.distributed.parallel_state import get_pp_group

        pp_rank = int(get_pp_group().rank_in_group)
    return pp_rank * tp_size + tp_rank
