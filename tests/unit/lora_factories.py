"""Factories for LoRA tests: a real adapter folder (PEFT layout, tiny safetensors) and
corrupt variants, shared by the unit and integration tests of control/lora."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path

__all__ = ["adapter_bytes", "write_adapter"]


def adapter_bytes(rank: int = 4) -> dict[str, bytes]:
    """The two files of a valid adapter: adapter_config.json and a safetensors file with
    one F32 tensor of ``rank`` x 2."""
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 8,
              "target_modules": ["q_proj"], "base_model_name_or_path": "tiny"}  # fmt: skip
    nbytes = rank * 2 * 4
    header = {"base_model.model.layers.0.self_attn.q_proj.lora_A.weight":
              {"dtype": "F32", "shape": [rank, 2], "data_offsets": [0, nbytes]}}  # fmt: skip
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    weights = struct.pack("<Q", len(raw)) + raw + bytes(range(nbytes))
    return {
        "adapter_config.json": json.dumps(config).encode(),
        "adapter_model.safetensors": weights,
    }


def write_adapter(
    folder: Path, rank: int = 4, replace: Mapping[str, bytes | None] | None = None
) -> Path:
    """A valid adapter in ``folder``; ``replace={"adapter_config.json": b"..."}`` swaps a
    file's bytes, ``None`` leaves the file out."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes | None] = dict(adapter_bytes(rank))
    files.update(replace or {})
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    return folder
