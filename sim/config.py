"""One simulated engine's settings: the ``shoal sim engine`` flags, as a frozen value.

Flags are named like ``vllm serve``'s where vLLM has one (``--served-model-name``,
``--max-model-len``, ``--block-size``, ``--num-gpu-blocks-override`` spelled
``--num-gpu-blocks``, ``--max-num-seqs``, ``--max-num-batched-tokens``, ``--enable-lora``,
``--max-loras``, ``--max-cpu-loras``, ``--lora-modules``, ``--kv-events-config``,
``--enable-prompt-tokens-details``, ``--no-enable-prefix-caching``), so a fleet script
can start either engine with the same words. KV-cache size: ``--num-gpu-blocks`` or
``--kv-cache-memory-bytes`` with ``--kv-bytes-per-token`` (blocks = bytes / (block_size *
bytes per token); the default per-token size, 512 KiB, is Llama-2-7B's bf16 KV).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shoal.errors import ConfigError
from sim.errors import RequestError
from sim.events import KVEventsConfig
from sim.faults import Faults
from sim.profile import DEFAULT_PROFILE, StepProfile

__all__ = ["SimConfig"]

LLAMA2_7B_KV_BYTES_PER_TOKEN = 2 * 32 * 4096 * 2  # K and V, 32 layers, hidden 4096, bf16


@dataclass(frozen=True, slots=True)
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "sim-7b"
    served_model_name: str | None = None
    max_model_len: int = 4096
    block_size: int = 16
    num_gpu_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_bytes_per_token: int = LLAMA2_7B_KV_BYTES_PER_TOKEN
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_lora: bool = False
    max_loras: int = 1
    max_cpu_loras: int | None = None
    lora_modules: tuple[tuple[str, str], ...] = ()
    enable_prompt_tokens_details: bool = False
    profile: StepProfile = DEFAULT_PROFILE
    time_scale: float = 1.0
    tokenizer: str | None = None
    vocab_size: int = 32000
    kv_events: KVEventsConfig | None = None
    faults: dict[str, Any] = field(default_factory=dict)
    max_request_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        positive = (
            "max_model_len",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_loras",
            "kv_bytes_per_token",
            "max_request_bytes",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0")
        if self.time_scale <= 0:
            raise ConfigError("--time-scale must be > 0")
        if self.num_gpu_blocks is not None and self.num_gpu_blocks <= 0:
            raise ConfigError("--num-gpu-blocks must be > 0")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ConfigError(
                f"--max-cpu-loras ({self.max_cpu_loras}) must be >= --max-loras "
                f"({self.max_loras}), as in vLLM"
            )
        if self.lora_modules and not self.enable_lora:
            raise ConfigError("--lora-modules needs --enable-lora")
        if (self.num_blocks - 1) * self.block_size < self.max_model_len:
            raise ConfigError(
                f"the KV cache ({self.num_blocks} blocks of {self.block_size} tokens, one of "
                f"them vLLM's null block) cannot hold one request of --max-model-len "
                f"{self.max_model_len}; raise --num-gpu-blocks or lower --max-model-len"
            )
        try:  # a bad --fault-* flag fails here, not at the first request
            Faults(**self.faults)
        except (RequestError, TypeError) as exc:
            raise ConfigError(f"--fault-*: {exc}") from None

    @property
    def name(self) -> str:
        return self.served_model_name or self.model

    @property
    def num_blocks(self) -> int:
        if self.num_gpu_blocks is not None:
            return self.num_gpu_blocks
        if self.kv_cache_memory_bytes is not None:
            return self.kv_cache_memory_bytes // (self.block_size * self.kv_bytes_per_token)
        return 8192  # 131,072 tokens: ~64 GiB of 7B KV, an 80 GB GPU less the weights

    @property
    def cpu_loras(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else self.max_loras

    def cache_info(self) -> dict[str, str]:
        """Labels of ``vllm:cache_config_info`` (a subset of vLLM's CacheConfig fields)."""
        return {
            "block_size": str(self.block_size),
            "enable_prefix_caching": str(self.enable_prefix_caching),
            "num_gpu_blocks": str(self.num_blocks),
            "num_cpu_blocks": "None",
            "cache_dtype": "auto",
        }
