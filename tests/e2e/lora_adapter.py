"""A tiny LoRA adapter for the tiny Llama, built offline at test time, in well under a
second: the adapter the LoRA end-to-end test loads into a real ``vllm serve``.

PEFT's file format, written directly (no ``peft``)::

    OUT/
      adapter_config.json        peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
                                 target_modules, base_model_name_or_path
      adapter_model.safetensors  base_model.model.model.layers.{L}.self_attn.{P}.lora_A.weight
                                 (r x in_features) and .lora_B.weight (out_features x r)
                                 for L in 0..num_hidden_layers-1, P in target_modules

Shapes come from the model's ``config.json`` (q_proj: hidden -> heads x head_dim;
v_proj: hidden -> kv_heads x head_dim), so the adapter fits whatever tiny model
``scripts/setup-engine`` built.

Unlike a trained adapter's initialisation (PEFT starts ``lora_B`` at zero, so a fresh
adapter changes nothing), both matrices here are random and large (``scale``) against the
model's own 0.02-std weights: the adapter's greedy completion differs from the base
model's, which is how a test tells that the adapter, not the base, answered. The same
``seed`` writes the same bytes (a seeded ``torch.Generator``, float32, fixed key order).

``setup-engine`` also writes an adapter beside the model (``tests/e2e/tiny_model.py``,
``LORA_DIR``); that one is small (0.02 std on both sides) and is not meant to change
outputs, and it lives in a shared cache: the LoRA test builds its own instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

__all__ = ["DEFAULT_RANK", "build_adapter"]

DEFAULT_RANK = 8


def build_adapter(
    out: Path,
    model_dir: Path,
    *,
    base_model: str = "tiny",
    seed: int = 14,
    rank: int = DEFAULT_RANK,
    alpha: int = 16,
    scale: float = 0.2,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
) -> Path:
    """Write a LoRA adapter for the Llama in ``model_dir`` into ``out`` (created); returns
    ``out``. ``base_model`` goes into ``base_model_name_or_path`` (vLLM does not check it)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // int(config["num_attention_heads"]))
    widths = {
        "q_proj": int(config["num_attention_heads"]) * head_dim,
        "k_proj": int(config["num_key_value_heads"]) * head_dim,
        "v_proj": int(config["num_key_value_heads"]) * head_dim,
        "o_proj": hidden,
    }
    unknown = sorted(set(target_modules) - set(widths))
    if unknown:
        raise ValueError(f"build_adapter: no shape known for {unknown}; use {sorted(widths)}")
    inputs = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": hidden}
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(int(config["num_hidden_layers"])):
        for projection in target_modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            a = torch.randn(rank, inputs[projection], generator=generator) * scale
            b = torch.randn(widths[projection], rank, generator=generator) * scale
            tensors[f"{prefix}.lora_A.weight"] = a.contiguous()
            tensors[f"{prefix}.lora_B.weight"] = b.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": base_model,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out
