"""``shoal health check|inject`` as an operator runs them: real processes, a real fault file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from control.health.types import NodeHealth
from tests.integration.conftest import ENV

pytestmark = pytest.mark.integration


def shoal(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoal", "health", *map(str, args)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_json(mock: Path, *args: str) -> tuple[int, dict[str, Any]]:
    done = shoal("check", "--nvml-mock", mock, "--node", "node-a", "--json", *args)
    return done.returncode, json.loads(done.stdout)


def shape(doc: dict[str, Any]) -> dict[str, Any]:
    """The document's keys, level by level (the wire contract's shape)."""
    return {
        "node": sorted(doc),
        "gpus": sorted({k for g in doc["gpus"] for k in g}),
        "problems": sorted({k for g in doc["gpus"] for p in g["problems"] for k in p}),
    }


def test_inject_then_check_exit_codes_and_the_exact_wire_json(tmp_path: Path) -> None:
    mock = tmp_path / "gpus.toml"
    done = shoal("inject", "--nvml-mock", mock, "--card-count", "2")
    assert (done.returncode, done.stdout.strip()) == (0, f"{mock}: card-count on node (2 cards)")
    code, doc = check_json(mock, "--expect-gpus", "2")
    assert code == 0
    assert doc == {
        "node": "node-a",
        "time": doc["time"],
        "healthy": True,
        "problems": [],
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-00000000-0000-4000-8000-00000000000{i}",
                "healthy": True,
                "problems": [],
            }
            for i in range(2)
        ],
    }
    assert isinstance(doc["time"], float)

    assert shoal("inject", "--nvml-mock", mock, "--gpu", "1", "--xid", "79").returncode == 0
    assert (
        shoal("inject", "--nvml-mock", mock, "--gpu", "0", "--throttle", "hw_slowdown").returncode
        == 0
    )
    code, doc = check_json(mock, "--expect-gpus", "2")
    assert code == 1
    assert shape(doc) == {
        "node": ["gpus", "healthy", "node", "problems", "time"],
        "gpus": ["healthy", "index", "problems", "uuid"],
        "problems": ["check", "detail", "remedy", "severity"],
    }
    assert doc["healthy"] is False
    assert [(g["index"], g["healthy"]) for g in doc["gpus"]] == [(0, True), (1, False)]
    assert doc["gpus"][0]["problems"] == [
        {
            "check": "throttle",
            "severity": "warning",
            "detail": "clocks held down by hw_slowdown",
            "remedy": "none",
        }
    ]
    assert doc["gpus"][1]["problems"] == [
        {
            "check": "xid",
            "severity": "critical",
            "detail": "XID 79: GPU has fallen off the bus",
            "remedy": "drain_node",
        }
    ]
    assert NodeHealth.from_json(doc).unhealthy_gpus() == {"node-a/gpu1"}

    assert shoal("inject", "--nvml-mock", mock, "--clear").returncode == 0
    code, doc = check_json(mock, "--expect-gpus", "3")
    assert code == 1
    assert doc["problems"] == [
        {
            "check": "gpu_count",
            "severity": "critical",
            "detail": "2 GPUs visible, 3 expected",
            "remedy": "drain_node",
        }
    ]
    # the two visible are fine; the third is listed, critical "missing", so it goes out
    assert [g["healthy"] for g in doc["gpus"]] == [True, True, False]
    assert doc["gpus"][2]["problems"] == [
        {
            "check": "missing",
            "severity": "critical",
            "detail": "not visible: 2 of 3 GPUs",
            "remedy": "drain_node",
        }
    ]
    assert NodeHealth.from_json(doc).unhealthy_gpus() == {f"node-a/gpu{i}" for i in range(3)}


def test_nvml_unavailable_exits_3_and_still_reports(tmp_path: Path) -> None:
    mock = tmp_path / "gpus.toml"
    assert shoal("inject", "--nvml-mock", mock, "--nvml-init-error", "9").returncode == 0
    code, doc = check_json(mock)
    assert code == 3
    assert (doc["gpus"], [p["check"] for p in doc["problems"]]) == ([], ["nvml"])
    assert doc["problems"][0]["detail"].startswith(
        "nvmlInit failed: 9 (NVML_ERROR_DRIVER_NOT_LOADED)"
    )


def test_the_table_lists_each_problem(tmp_path: Path) -> None:
    mock = tmp_path / "gpus.toml"
    assert shoal("inject", "--nvml-mock", mock, "--card-count", "2").returncode == 0
    assert shoal("inject", "--nvml-mock", mock, "--gpu", "1", "--remap-pending").returncode == 0
    done = shoal("check", "--nvml-mock", mock, "--node", "node-a")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0] == "node node-a: UNHEALTHY"
    assert lines[1].split() == ["GPU", "UUID", "HEALTHY", "SEVERITY", "CHECK", "REMEDY", "DETAIL"]
    assert lines[2].split() == ["0", "GPU-00000000-0000-4000-8000-000000000000", "yes"]
    assert lines[3].split()[:6] == [
        "1",
        "GPU-00000000-0000-4000-8000-000000000001",
        "NO",
        "critical",
        "row_remap",
        "reset_gpu",
    ]


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    mock = tmp_path / "gpus.toml"
    done = shoal("inject", "--xid", "79")
    assert done.returncode == 2 and "say --nvml-mock FILE.toml" in done.stderr
    assert not mock.exists()
    done = shoal("inject", "--nvml-mock", mock, "--xid", "79", "--fail-read")
    assert done.returncode == 2 and "not allowed with argument" in done.stderr
    done = shoal("inject", "--nvml-mock", mock, "--throttle", "hot")
    assert done.returncode == 2 and "invalid choice: 'hot'" in done.stderr
    done = shoal("inject", "--nvml-mock", mock, "--gpu", "9", "--xid", "79")
    assert done.returncode == 2 and "gpus.9: card index beyond card_count = 8" in done.stderr
    assert not mock.exists()  # a refused edit creates nothing
    mock.write_text("[gpus]\ncard_count = 2\n[gpus.0]\ntemprature = 90\n")
    done = shoal("check", "--nvml-mock", mock)
    assert done.returncode == 2 and f"{mock}: gpus.0.temprature: unknown key" in done.stderr
    done = shoal("check", "--nvml-mock", tmp_path / "none.toml")
    assert done.returncode == 2 and "cannot read" in done.stderr
    assert shoal("check", "--node", "a/b", "--nvml-mock", mock).returncode == 2
    assert shoal("check", "--xid-wait-s", "-1").returncode == 2


def test_an_xid_injected_within_the_wait_window_is_reported(tmp_path: Path) -> None:
    # the checker waits 8 s; the injection lands in that window (before its backend opens,
    # the first drain delivers it; after, the polling does)
    mock = tmp_path / "gpus.toml"
    assert shoal("inject", "--nvml-mock", mock, "--card-count", "1").returncode == 0
    cmd = [
        sys.executable,
        "-m",
        "shoal",
        "health",
        "check",
        "--nvml-mock",
        str(mock),
        "--json",
        "--xid-wait-s",
        "8",
    ]
    checker = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert shoal("inject", "--nvml-mock", mock, "--gpu", "0", "--xid", "48").returncode == 0
        out, _ = checker.communicate(timeout=60)
    finally:
        checker.kill()
        checker.wait()
    doc = json.loads(out)
    assert checker.returncode == 1
    assert [p["detail"][:6] for p in doc["gpus"][0]["problems"]] == ["XID 48"]
