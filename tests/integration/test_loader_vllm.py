"""``--load-format shoal`` through vLLM's own model-loader registry and config classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("vllm", reason="needs vLLM (scripts/setup-vllm)")
safetensors_torch = pytest.importorskip("safetensors.torch")

from vllm.config import ModelConfig  # noqa: E402
from vllm.config.load import LoadConfig  # noqa: E402
from vllm.model_executor.model_loader import get_model_loader  # noqa: E402

from loader.vllm import ShoalModelLoader, register  # noqa: E402
from tests.integration.vllm_engine import MODEL_CONFIG  # noqa: E402


class TinyModel(nn.Module):
    """Loads weights the way vLLM models do: ``load_weights`` consumes (name, tensor)."""

    def __init__(self, names: dict[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.params = nn.ParameterDict(
            {
                n.replace(".", "__"): nn.Parameter(torch.zeros(s, dtype=torch.bfloat16))
                for n, s in names.items()
            }
        )
        self.order: list[str] = []

    def load_weights(self, weights: object) -> set[str]:
        loaded = set()
        for name, tensor in weights:  # type: ignore[attr-defined]
            self.order.append(name)
            with torch.no_grad():
                self.params[name.replace(".", "__")].copy_(tensor)
            loaded.add(name)
        return loaded


def checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MODEL_CONFIG))
    g = torch.Generator().manual_seed(1)
    tensors = {
        f"model.layers.{i}.mlp.{w}.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16)
        for i in range(4) for w in ("up_proj", "down_proj")
    }  # fmt: skip
    tensors["model.embed_tokens.weight"] = torch.randn(64, 16, generator=g).to(torch.bfloat16)
    safetensors_torch.save_file(dict(list(tensors.items())[:5]), str(folder / "a.safetensors"))
    safetensors_torch.save_file(dict(list(tensors.items())[5:]), str(folder / "b.safetensors"))
    return tensors


def test_load_format_shoal_resolves_and_streams_every_weight(tmp_path: Path) -> None:
    tensors = checkpoint(tmp_path / "model")
    register()
    register()  # vLLM may run plugins more than once
    config = LoadConfig(
        load_format="shoal",
        model_loader_extra_config={
            "order": "layers",
            "concurrency": 1,
        },  # completion order = issue order
    )
    loader = get_model_loader(config)
    assert isinstance(loader, ShoalModelLoader)
    model_config = ModelConfig(model=str(tmp_path / "model"), skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=1024)  # fmt: skip
    loader.download_model(model_config)
    model = TinyModel({n: tuple(t.shape) for n, t in tensors.items()})
    loader.load_weights(model, model_config)
    for name, tensor in tensors.items():
        assert torch.equal(model.params[name.replace(".", "__")], tensor), name
    assert model.order[0] == "model.embed_tokens.weight"  # layer order: embeddings first
    assert model.order[1].startswith("model.layers.0.")


def test_bad_extra_config_names_the_key(tmp_path: Path) -> None:
    register()
    with pytest.raises(ValueError, match="unknown keys \\['threads'\\]"):
        get_model_loader(LoadConfig(load_format="shoal", model_loader_extra_config={"threads": 4}))


def test_model_weights_reads_the_weights_from_elsewhere_than_model(tmp_path: Path) -> None:
    """``vllm serve CONFIG_DIR --model-loader-extra-config '{"model_weights": URI}'``: vLLM
    reads config and tokenizer from a local folder (it cannot from ``s3://`` without Run:ai's
    streamer, nor from ``peer://``), the loader reads the weights from ``URI``; the folder
    holds no weights at all, so every tensor came from there."""
    tensors = checkpoint(tmp_path / "weights")
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps(MODEL_CONFIG))
    register()
    loader = get_model_loader(
        LoadConfig(
            load_format="shoal",
            model_loader_extra_config={"model_weights": str(tmp_path / "weights")},
        )
    )
    model_config = ModelConfig(model=str(config_only), skip_tokenizer_init=True, dtype="bfloat16",
                               max_model_len=1024)  # fmt: skip
    loader.download_model(model_config)
    model = TinyModel({n: tuple(t.shape) for n, t in tensors.items()})
    loader.load_weights(model, model_config)
    for name, tensor in tensors.items():
        assert torch.equal(model.params[name.replace(".", "__")], tensor), name
