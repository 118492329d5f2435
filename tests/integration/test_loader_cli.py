"""``shoal load`` as a user runs it: a real process, JSON for scripts, meaningful exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

safetensors_torch = pytest.importorskip("safetensors.torch")

from tests.integration.conftest import ENV  # noqa: E402


def shoal_load(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shoal", "load", *args], env=ENV,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_load_prints_a_summary_and_json_for_scripts(tmp_path: Path) -> None:
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(64, 32) for i in range(4)}
    safetensors_torch.save_file(tensors, str(tmp_path / "model.safetensors"))
    done = shoal_load(str(tmp_path), "--json", "--order", "layers", "--rate", "500MB/s")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["tensors"] == 4 and summary["bytes"] == 4 * 64 * 32 * 4
    assert summary["first_tensor_ms"] is not None
    half = json.loads(
        shoal_load(str(tmp_path), "--json", "--tp-rank", "1", "--tp-size", "2").stdout
    )
    assert half["bytes"] == summary["bytes"] // 2  # only rank 1's rows of each projection
    human = shoal_load(str(tmp_path / "model.safetensors"))
    assert human.returncode == 0 and "gbps" in human.stdout


def test_exit_codes_say_what_went_wrong(tmp_path: Path) -> None:
    missing = shoal_load(str(tmp_path / "nope.safetensors"))
    assert missing.returncode == 1 and "no such file" in missing.stderr
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    bad = shoal_load(str(tmp_path / "bad.safetensors"))
    assert bad.returncode == 1 and "bad.safetensors" in bad.stderr
    usage = shoal_load(str(tmp_path), "--max-inflight", "lots")
    assert usage.returncode == 2
    assert shoal_load(str(tmp_path), "--tp-rank", "2", "--tp-size", "2").returncode == 2
