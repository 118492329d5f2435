"""Build the tiny Llama that the end-to-end tests serve with a real ``vllm serve``.

Run by ``scripts/setup-engine`` with the engine's venv (it needs ``transformers`` and
``tokenizers``, which come with vLLM), never imported by the test process::

    .venv-engine/bin/python tests/e2e/tiny_model.py OUT_DIR

What it writes (about 14 MB, about 7 s on one core; facts in ../shared/ENGINES.md):

- a byte-level BPE tokenizer (vocabulary 8,192; specials ``<unk> <s> </s> <pad>``) trained
  on this Python's own standard library sources, in sorted order, so the same Python gives
  the same tokenizer; saved as ``PreTrainedTokenizerFast`` with a minimal chat template so
  ``/v1/chat/completions`` works;
- a ``LlamaForCausalLM`` (hidden 256, intermediate 512, 4 layers, 4 heads, 2 KV heads,
  4,096 positions) with random weights from a fixed seed, in bfloat16 safetensors;
- beside it, in ``OUT_DIR-lora``, a LoRA adapter for it in PEFT's file format (rank 8 on
  ``q_proj`` and ``v_proj``, random weights from a fixed seed), for the tests of vLLM's
  adapter routes (``--lora-modules``, ``/v1/load_lora_adapter``).

Nothing reaches a hub. The output directory is replaced atomically: it is built beside
``OUT_DIR`` and renamed into place, so a build cut short never leaves a half model that a
later run would take for a finished one (``setup-engine`` checks ``.complete``, written
last, after the adapter).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SEED = 20261206
VOCAB = 8192
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def training_files() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in stdlib.glob("*.py"))
    if len(files) < 50:
        raise SystemExit(f"tiny_model: only {len(files)} .py files under {stdlib}")
    return files


def build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(training_files(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_model(out: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    torch.manual_seed(SEED)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


LORA_RANK = 8


def build_lora(out: Path) -> None:
    """PEFT's layout, written directly: ``adapter_config.json`` and the A/B matrices of
    each targeted projection under PEFT's tensor names (no ``peft`` needed)."""
    torch.manual_seed(SEED + 1)
    hidden, kv_dim = 256, 2 * 64
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(4):
        for projection, width in (("q_proj", hidden), ("v_proj", kv_dim)):
            name = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            a = torch.randn(LORA_RANK, hidden) * 0.02
            b = torch.randn(width, LORA_RANK) * 0.02
            tensors[f"{name}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"{name}.lora_B.weight"] = b.to(torch.bfloat16)
    save_file(tensors, out / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": LORA_RANK,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "base_model_name_or_path": "tiny",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _replace(staging: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: tiny_model.py OUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[1]).resolve()
    lora = out.with_name(out.name + "-lora")
    staging = out.with_name(out.name + ".partial")
    lora_staging = lora.with_name(lora.name + ".partial")
    for path in (staging, lora_staging):
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    build_lora(lora_staging)
    _replace(lora_staging, lora)
    tokenizer = build_tokenizer(staging)
    build_model(staging, tokenizer)
    (staging / ".complete").write_text(f"seed {SEED}\n")
    _replace(staging, out)
    print(f"tiny model in {out}, its LoRA adapter in {lora}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
