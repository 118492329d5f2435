"""``shoal sim calibrate`` against a simulated engine process over HTTP: the profile it
writes predicts the engine's step times (wall-clock measurement, so within a tolerance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sim.process import running_sim_engine
from sim.profile import StepProfile, StepShape, load_profile
from tests.integration.conftest import ENV, free_port

pytestmark = pytest.mark.integration

# Steps of 20+ ms: the 1-3 ms of HTTP and scheduling jitter on a busy 2-core machine
# stays under ~15% of every measured time.
TRUE = StepProfile(c0_s=0.02, c_prefill_s=2e-4, c_decode_s=2e-3, c_kv_s=5e-6)


def test_calibrating_a_simulated_engine_recovers_its_step_times(tmp_path: Path) -> None:
    out = tmp_path / "fitted.json"
    with running_sim_engine(free_port(), profile=TRUE) as engine:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "shoal",
                "sim",
                "calibrate",
                "--engine",
                engine.url,
                "--out",
                str(out),
                "--max-prompt",
                "256",
                "--batch-sizes",
                "1,4",
                "--decode-tokens",
                "8",
                "--repeats",
                "1",
                "--json",
            ],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["num_measurements"] == 5 + 4
    fitted = load_profile(out)
    assert fitted.source.startswith("calibrated against http://127.0.0.1:")
    for shape in (
        StepShape(prefill_tokens=256, context_tokens=256),
        StepShape(prefill_tokens=32, context_tokens=32),
        StepShape(decode_seqs=4, context_tokens=4 * 140),
    ):
        assert fitted.step_s(shape) == pytest.approx(TRUE.step_s(shape), rel=0.25), shape


def test_an_unreachable_engine_fails_with_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "sim",
            "calibrate",
            "--engine",
            f"http://127.0.0.1:{free_port()}",
            "--out",
            str(tmp_path / "p.json"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("shoal sim calibrate: cannot")
    assert not (tmp_path / "p.json").exists()
