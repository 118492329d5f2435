"""A CPU stand-in for one vLLM engine: vLLM's real scheduler, and a model runner that makes
the connector calls vLLM's GPU model runner makes, in the same order, on CPU tensors in a
real paged layout. Only the model is fake: its "attention" writes, for each scheduled token,
KV values that are a pure function of (engine salt, layer, position, token), so a test can
tell a loaded value (the saver's salt) from a recomputed one (its own salt).

Call order per step (vllm/v1/worker/kv_connector_model_runner_mixin.py and
model_executor/layers/attention/kv_transfer_utils.py in vLLM 0.33)::

    scheduler.schedule()                     -> get_num_new_matched_tokens, update_state_after_alloc,
                                                build_connector_meta
    bind_connector_metadata(meta)
    start_load_kv(ctx)                       (before the forward when has_sync_kv_loads)
    per layer: wait_for_layer_load(layer) -> attention writes KV -> save_kv_layer(layer, ...)
    start_load_kv(ctx)                       (after the forward otherwise)
    wait_for_save(); get_finished(finished); get_block_ids_with_load_errors();
    get_kv_connector_stats()
    clear_connector_metadata()
    scheduler.update_from_output(...)        -> update_connector_output, request_finished

Run as a script it serves one engine for a test in its own process:
``python tests/integration/vllm_engine.py SPEC.json`` (see ``main``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from vllm import SamplingParams  # noqa: E402
from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (  # noqa: E402
    FullAttentionSpec,
    KVCacheConfig,
    KVCacheGroupSpec,
)
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from kvcache.connector.vllm import ShoalConnector  # noqa: E402

MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_hidden_layers": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "torch_dtype": "bfloat16",
}
EOS = 2


@dataclass
class EngineSpec:
    model_dir: str
    endpoint: str
    salt: int = 1
    block_size: int = 16
    num_blocks: int = 256
    chunk_tokens: int = 32
    layout: str = "flash"  # flash: (2, N, B, H, D); flashinfer: (N, 2, B, H, D); hnd
    extra: dict[str, Any] = field(default_factory=dict)


def write_model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(MODEL_CONFIG))
    return path


def vllm_config(spec: EngineSpec) -> VllmConfig:
    model = ModelConfig(
        model=spec.model_dir, skip_tokenizer_init=True, dtype="bfloat16", seed=0,
        max_model_len=4096,
    )  # fmt: skip
    scheduler = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=512, max_model_len=4096,
        enable_chunked_prefill=True, is_encoder_decoder=False,
    )  # fmt: skip
    cache = CacheConfig(block_size=spec.block_size, enable_prefix_caching=True)
    transfer = KVTransferConfig(
        kv_connector="ShoalConnector",
        kv_connector_module_path="kvcache.connector.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config={
            "endpoint": spec.endpoint, "chunk_tokens": spec.chunk_tokens, **spec.extra,
        },
    )  # fmt: skip
    config = VllmConfig(
        scheduler_config=scheduler, model_config=model, cache_config=cache,
        kv_transfer_config=transfer, device_config=DeviceConfig("cpu"),
    )  # fmt: skip
    config.cache_config.num_gpu_blocks = spec.num_blocks
    return config


def make_request(
    request_id: str,
    prompt: list[int],
    max_tokens: int,
    block_size: int,
    cache_salt: str | None = None,
) -> Request:
    init_none_hash(sha256)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    params.update_from_generation_config({}, EOS)
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt,
        sampling_params=params,
        pooling_params=None,
        mm_features=None,
        cache_salt=cache_salt,
        block_hasher=get_request_block_hasher(block_size, sha256),
    )


class Engine:
    """Scheduler + one worker (tensor parallel size 1), stepping in vLLM's order."""

    def __init__(self, spec: EngineSpec) -> None:
        self.spec = spec
        self.config = vllm_config(spec)
        text = MODEL_CONFIG
        self.layers = [f"model.layers.{i}.self_attn.attn" for i in range(text["num_hidden_layers"])]
        self.heads = int(text["num_key_value_heads"])
        self.head_dim = int(text["head_dim"])
        kv_spec = FullAttentionSpec(
            block_size=spec.block_size, num_kv_heads=self.heads, head_size=self.head_dim,
            dtype=torch.bfloat16,
        )  # fmt: skip
        kv_cache_config = KVCacheConfig(
            num_blocks=spec.num_blocks,
            kv_cache_tensors=[],
            kv_cache_groups=[KVCacheGroupSpec(self.layers, kv_spec)],
        )
        self.scheduler = Scheduler(
            vllm_config=self.config,
            kv_cache_config=kv_cache_config,
            log_stats=True,
            structured_output_manager=StructuredOutputManager(self.config),
            block_size=spec.block_size,
        )
        self.worker = ShoalConnector(self.config, KVConnectorRole.WORKER, kv_cache_config)
        self.kv_caches = {name: self._allocate() for name in self.layers}
        self.worker.register_kv_caches(self.kv_caches)
        self.block_tables: dict[str, list[int]] = {}
        self.requests: dict[str, Request] = {}
        self.invalid_reported: set[int] = set()
        self.loaded_steps = 0
        self.connector_stats: list[dict[str, Any]] = []  # what vLLM sends the API server

    def _allocate(self) -> torch.Tensor:
        n, b, h, d = self.spec.num_blocks, self.spec.block_size, self.heads, self.head_dim
        if self.spec.layout == "flash":
            return torch.zeros(2, n, b, h, d, dtype=torch.bfloat16)
        if self.spec.layout == "flashinfer":
            return torch.zeros(n, 2, b, h, d, dtype=torch.bfloat16)
        if self.spec.layout == "hnd":  # (2, N, B, H, D) viewed over an HND buffer
            return torch.zeros(2, n, h, b, d, dtype=torch.bfloat16).transpose(2, 3)
        raise ValueError(self.spec.layout)

    # -- the fake model -------------------------------------------------------------------

    def kv_value(self, layer: int, position: int, token: int) -> torch.Tensor:
        """(2, heads, head_dim) KV of one token: small integers, exact in bf16."""
        base = (self.spec.salt * 97 + layer * 31 + position * 7 + token * 13) % 200
        grid = torch.arange(2 * self.heads * self.head_dim).view(2, self.heads, self.head_dim)
        return ((base + grid) % 251).to(torch.bfloat16)

    def slot(self, req_id: str, position: int) -> tuple[int, int]:
        table = self.block_tables[req_id]
        return table[position // self.spec.block_size], position % self.spec.block_size

    def read_kv(self, layer: int, block: int, offset: int) -> torch.Tensor:
        cache = self.kv_caches[self.layers[layer]]
        if self.spec.layout == "flashinfer":
            return cache[block, :, offset].clone()
        return cache[:, block, offset].clone()

    def write_kv(self, layer: int, block: int, offset: int, value: torch.Tensor) -> None:
        cache = self.kv_caches[self.layers[layer]]
        if self.spec.layout == "flashinfer":
            cache[block, :, offset] = value
        else:
            cache[:, block, offset] = value

    # -- stepping ---------------------------------------------------------------------------

    def add(
        self, req_id: str, prompt: list[int], max_tokens: int = 4, cache_salt: str | None = None
    ) -> None:
        request = make_request(req_id, prompt, max_tokens, self.spec.block_size, cache_salt)
        self.requests[req_id] = request
        self.scheduler.add_request(request)

    def step(self) -> Any:
        out = self.scheduler.schedule()
        for new in out.scheduled_new_reqs:
            self.block_tables[new.req_id] = list(new.block_ids[0])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.block_tables[req_id] = list(ids[0]) if ids else []
            elif ids:
                self.block_tables[req_id].extend(ids[0])
        worker = self.worker
        worker.bind_connector_metadata(out.kv_connector_metadata)
        if out.has_sync_kv_loads:
            self.loaded_steps += 1
            worker.start_load_kv(None)
        for index, layer in enumerate(self.layers):
            worker.wait_for_layer_load(layer)
            for req_id, count in out.num_scheduled_tokens.items():
                request = self.scheduler.requests[req_id]
                start = request.num_computed_tokens - count  # schedule() already advanced it
                tokens = request.all_token_ids
                for position in range(start, start + count):
                    block, offset = self.slot(req_id, position)
                    self.write_kv(
                        index, block, offset, self.kv_value(index, position, tokens[position])
                    )
            worker.save_kv_layer(layer, self.kv_caches[layer], attn_metadata=object())
        if not out.has_sync_kv_loads:
            worker.start_load_kv(None)
        worker.wait_for_save()
        sending, recving = worker.get_finished(out.finished_req_ids)
        invalid = worker.get_block_ids_with_load_errors()
        self.invalid_reported |= invalid
        stats = worker.get_kv_connector_stats()
        worker.clear_connector_metadata()
        req_ids = list(out.num_scheduled_tokens)
        # Every scheduled request samples token 1000 + position (prefill chunks that do not
        # reach the end of the prompt discard it, as vLLM does).
        sampled = []
        for req_id in req_ids:
            request = self.scheduler.requests[req_id]
            sampled.append([1000 + request.num_computed_tokens % 1000])
        output = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=[],
            kv_connector_output=KVConnectorOutput(
                finished_sending=sending,
                finished_recving=recving,
                invalid_block_ids=invalid,
                kv_connector_stats=stats,
            ),
        )
        for engine_outputs in self.scheduler.update_from_output(out, output).values():
            sched_stats = engine_outputs.scheduler_stats
            if sched_stats is not None and sched_stats.kv_connector_stats:
                self.connector_stats.append(sched_stats.kv_connector_stats)
        return out

    def run(self, max_steps: int = 200) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise RuntimeError("the engine did not finish its requests")

    def kv_of(self, req_id: str, positions: range) -> list[list[bytes]]:
        """The KV bytes of ``positions`` per layer, read from the paged cache now."""
        rows = []
        for layer in range(len(self.layers)):
            row = []
            for position in positions:
                block, offset = self.slot(req_id, position)
                row.append(self.read_kv(layer, block, offset).view(torch.int16).numpy().tobytes())
            rows.append(row)
        return rows

    def expected(self, req_id: str, positions: range, salt: int) -> list[list[bytes]]:
        tokens = self.requests[req_id].all_token_ids
        saved, self.spec.salt = self.spec.salt, salt
        try:
            return [
                [
                    self.kv_value(layer, p, tokens[p]).view(torch.int16).numpy().tobytes()
                    for p in positions
                ]
                for layer in range(len(self.layers))
            ]
        finally:
            self.spec.salt = saved

    def flush(self) -> None:
        """Wait for the saves of past steps to be committed (they finish off the step)."""
        assert self.worker._worker is not None
        self.worker._worker.flush()

    def close(self) -> None:
        self.scheduler.shutdown()
        self.worker.shutdown()


def main() -> None:
    """Run the requests of a JSON spec and print a JSON report on stdout.

    Spec: {"engine": {EngineSpec fields}, "requests": [{"id", "prompt", "max_tokens"}],
    "check_salt": {req_id: salt}}. Report per request: "positions" computed, "hit_tokens"
    (tokens the connector supplied), "loaded_match": positions whose KV equals the
    ``check_salt`` engine's values, "own_match": positions equal to this engine's own values.
    """
    spec_in = json.loads(Path(sys.argv[1]).read_text())
    engine = Engine(EngineSpec(**spec_in["engine"]))
    report: dict[str, Any] = {"requests": {}}
    for item in spec_in["requests"]:
        engine.add(item["id"], item["prompt"], item.get("max_tokens", 2))
        # One request at a time, kept alive until checked: finish it step by step.
        request_id = item["id"]
        steps = 0
        while request_id in engine.scheduler.requests and steps < 200:
            request = engine.scheduler.requests[request_id]
            if request.num_output_tokens >= 1 and request.num_computed_tokens >= len(
                item["prompt"]
            ):
                break
            engine.step()
            steps += 1
        positions = range(len(item["prompt"]))
        actual = engine.kv_of(request_id, positions)
        other = spec_in.get("check_salt", {}).get(request_id)
        own = engine.expected(request_id, positions, engine.spec.salt)
        entry = {
            "own_match": [
                p for p in positions if all(actual[i][p] == own[i][p] for i in range(len(actual)))
            ],
        }
        if other is not None:
            theirs = engine.expected(request_id, positions, other)
            entry["loaded_match"] = [
                p
                for p in positions
                if all(actual[i][p] == theirs[i][p] for i in range(len(actual)))
            ]
        report["requests"][request_id] = entry
    engine.run()
    engine.flush()
    report["invalid_reported"] = sorted(engine.invalid_reported)
    report["loaded_steps"] = engine.loaded_steps
    report["worker_stats"] = engine.worker._worker.stats if engine.worker._worker else {}
    report["scheduler_stats"] = {}
    engine.close()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
