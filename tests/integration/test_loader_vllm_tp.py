"""``--load-format shoal`` under tensor parallelism (M13): each rank reads only its slice,
and vLLM's own parameter classes (``ModelWeightParameter``: the column, merged-column, QKV
and row loaders that ``narrow`` full tensors) load it into the same values as from whole
tensors. A model that narrows differently fails loudly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

pytest.importorskip("vllm", reason="needs vLLM (scripts/setup-vllm)")
safetensors_torch = pytest.importorskip("safetensors.torch")

import vllm.model_executor.parameter as vllm_parameter  # noqa: E402
from vllm.config import ModelConfig  # noqa: E402
from vllm.config.load import LoadConfig  # noqa: E402
from vllm.model_executor.parameter import ModelWeightParameter  # noqa: E402

import loader.vllm as shoal_vllm  # noqa: E402
from loader.errors import LoaderError  # noqa: E402
from loader.sources.local import LocalSource  # noqa: E402
from tests.integration.vllm_engine import MODEL_CONFIG  # noqa: E402

# Tensors large enough that a rank's dim-0 slices are read apart (gaps over the streamer's
# merge_gap_bytes); row-parallel slices of short rows are coalesced into whole-tensor reads
# by design (one request instead of one per row), so they are read whole.
CONFIG = {**MODEL_CONFIG, "hidden_size": 512, "intermediate_size": 1024, "head_dim": 128}
H, I, D = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["head_dim"]  # noqa: E741
HEADS, KV_HEADS = CONFIG["num_attention_heads"], CONFIG["num_key_value_heads"]
LAYERS = 2


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    g = torch.Generator().manual_seed(3)
    shapes = {"self_attn.q_proj": (HEADS * D, H), "self_attn.k_proj": (KV_HEADS * D, H),
              "self_attn.v_proj": (KV_HEADS * D, H), "self_attn.o_proj": (H, HEADS * D),
              "mlp.gate_proj": (I, H), "mlp.up_proj": (I, H), "mlp.down_proj": (H, I)}  # fmt: skip
    tensors = {
        f"model.layers.{i}.{name}.weight": torch.randn(shape, generator=g).bfloat16()
        for i in range(LAYERS) for name, shape in shapes.items()
    }  # fmt: skip
    for i in range(LAYERS):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.randn(H, generator=g)
    tensors["model.embed_tokens.weight"] = torch.randn(512, H, generator=g).bfloat16()
    safetensors_torch.save_file(tensors, str(folder / "model.safetensors"))
    return tensors


class Rank(nn.Module):
    """One TP rank of a Llama-like model whose weights load through vLLM's parameter
    classes, as vLLM's ``LlamaForCausalLM.load_weights`` routes them."""

    def __init__(self, tp: int) -> None:
        super().__init__()
        self.q, self.kv = HEADS * D // tp, max(1, KV_HEADS // tp) * D
        self.replicas = max(1, tp // KV_HEADS)
        self.i = I // tp

        def weight(rows: int, cols: int) -> ModelWeightParameter:
            return ModelWeightParameter(data=torch.zeros(rows, cols, dtype=torch.bfloat16),
                                        input_dim=1, output_dim=0, weight_loader=None)  # fmt: skip

        self.layers = nn.ModuleList()
        for _ in range(LAYERS):
            layer = nn.Module()
            layer.qkv = weight(self.q + 2 * self.kv, H)
            layer.o = weight(H, HEADS * D // tp)
            layer.gate_up = weight(2 * self.i, H)
            layer.down = weight(H, self.i)
            layer.norm = nn.Parameter(torch.zeros(H))
            self.layers.append(layer)
        self.embed = nn.Parameter(torch.zeros(512, H, dtype=torch.bfloat16))

    def load_weights(self, weights: Any) -> None:
        for name, tensor in weights:
            if name == "model.embed_tokens.weight":
                self.embed.data.copy_(tensor)
                continue
            i, rest = int(name.split(".")[2]), name.split(".", 3)[3].removesuffix(".weight")
            layer = self.layers[i]
            kv = {"shard_size": self.kv, "num_heads": self.replicas}
            if rest == "self_attn.q_proj":
                layer.qkv.load_qkv_weight(tensor, shard_offset=0, shard_size=self.q,
                                          shard_id="q", num_heads=self.replicas)  # fmt: skip
            elif rest == "self_attn.k_proj":
                layer.qkv.load_qkv_weight(tensor, shard_offset=self.q, shard_id="k", **kv)
            elif rest == "self_attn.v_proj":
                layer.qkv.load_qkv_weight(tensor, shard_offset=self.q + self.kv, shard_id="v",
                                          **kv)  # fmt: skip
            elif rest == "self_attn.o_proj":
                layer.o.load_row_parallel_weight(tensor)
            elif rest == "mlp.gate_proj":
                layer.gate_up.load_merged_column_weight(tensor, shard_offset=0, shard_size=self.i)
            elif rest == "mlp.up_proj":
                layer.gate_up.load_merged_column_weight(tensor, shard_offset=self.i,
                                                        shard_size=self.i)  # fmt: skip
            elif rest == "mlp.down_proj":
                layer.down.load_row_parallel_weight(tensor)
            else:
                layer.norm.data.copy_(tensor)


class CountingLocal(LocalSource):
    bytes_read = 0

    def read_scatter(self, path: str, offset: int, buffers: Any) -> None:
        CountingLocal.bytes_read += sum(len(b) for b in buffers)
        super().read_scatter(path, offset, buffers)


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, tp: int) -> None:
    """vLLM's parallel state, as rank ``rank`` of ``tp`` sees it (for both sides)."""
    monkeypatch.setattr(shoal_vllm, "tensor_parallel", lambda: (rank, tp))
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_rank", lambda: rank)
    monkeypatch.setattr(vllm_parameter, "get_tensor_model_parallel_world_size", lambda: tp)


def load_rank(
    monkeypatch: pytest.MonkeyPatch, folder: Path, rank: int, tp: int, make: Any,
    extra: dict[str, object] | None = None,
) -> tuple[nn.Module, int]:  # fmt: skip
    """A model from ``make()`` loaded as rank ``rank`` of ``tp``; the bytes it read."""
    as_rank(monkeypatch, rank, tp)
    model = make()
    monkeypatch.setattr(shoal_vllm, "open_source",
                        lambda uri, **_: (CountingLocal(uri, direct=False), None))  # fmt: skip
    CountingLocal.bytes_read = 0
    shoal_loader = shoal_vllm.ShoalModelLoader(
        LoadConfig(load_format="shoal", model_loader_extra_config=extra or {})
    )
    model_config = ModelConfig(model=str(folder), skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=1024)  # fmt: skip
    shoal_loader.load_weights(model, model_config)
    return model, CountingLocal.bytes_read


def expected_rank(
    monkeypatch: pytest.MonkeyPatch, tensors: dict[str, torch.Tensor], rank: int, tp: int
) -> Rank:
    """What vLLM's loaders make of whole tensors: the reference."""
    as_rank(monkeypatch, rank, tp)
    reference = Rank(tp)
    reference.load_weights(tensors.items())
    return reference


@pytest.mark.parametrize("tp", [2, 4])  # 4 > KV_HEADS: ranks share KV heads
def test_each_rank_reads_its_slice_and_loads_what_whole_tensors_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tp: int
) -> None:
    tensors = checkpoint(tmp_path / "model")
    whole = sum(t.numel() * t.element_size() for t in tensors.values())
    total = 0
    for rank in range(tp):
        model, read = load_rank(monkeypatch, tmp_path / "model", rank, tp, lambda: Rank(tp))
        total += read
        reference = expected_rank(monkeypatch, tensors, rank, tp)
        for (name, got), (_, want) in zip(
            model.state_dict().items(), reference.state_dict().items(), strict=True
        ):
            assert torch.equal(got, want), (rank, name)
    # Column-parallel tensors (2/3 of these bytes) are read once between the ranks (K and V
    # once per KV head group); row-parallel ones and the replicated rest by every rank.
    assert total < 0.75 * tp * whole


def test_a_model_that_narrows_differently_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint(tmp_path / "model")

    class Naive(nn.Module):  # copies the full tensor: not how vLLM shards
        def load_weights(self, weights: Any) -> None:
            for _name, tensor in weights:
                torch.zeros(tensor.shape, dtype=tensor.dtype).copy_(tensor)

    with pytest.raises(LoaderError, match="tp_slicing"):
        load_rank(monkeypatch, tmp_path / "model", 1, 2, Naive)


def test_tp_slicing_false_hands_over_whole_tensors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tensors = checkpoint(tmp_path / "model")
    model, read = load_rank(monkeypatch, tmp_path / "model", 1, 2, lambda: Rank(2),
                            {"tp_slicing": False})  # fmt: skip
    assert read >= sum(t.numel() * t.element_size() for t in tensors.values())
    reference = expected_rank(monkeypatch, tensors, 1, 2)
    for (name, got), (_, want) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name
