"""Placement's files (control/placement/formats.py): AIBrix profiles both ways, Mélange's
example input, the workload JSON, rebinning, and an error naming file and field for
every malformed input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from control.placement.errors import ProfileFormatError
from control.placement.formats import (
    count_requests,
    load_melange,
    load_profile,
    load_profiles,
    load_workload,
    plan_to_json,
    profile_to_json,
    rebin,
    workload_to_json,
)
from control.placement.types import GpuProfile, Plan, Slos, Workload
from shoal.errors import ConfigError

# The shape of AIBrix's gen_profile.py output (its result/simulator-llama2-7b-a100.json),
# shortened: e2e latencies beside the rates, and SLOs at p99.
AIBRIX = {
    "gpu": "simulator-llama2-7b-a100",
    "cost": 1.0,
    "tputs": [[62.4, 32.3], [60.3, 0.0]],
    "indexes": [[4, 8], [128, 256]],
    "created": 1748888478.25,
    "e2e": [[0.09, 0.12], [0.17, 0.19]],
    "slos": {"percentile": 99, "e2e": 5.0},
}


def write(tmp_path: Path, data: Any, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_an_aibrix_profile_reads_into_a_gpu_profile(tmp_path: Path) -> None:
    p = load_profile(write(tmp_path, AIBRIX))
    assert p == GpuProfile(
        gpu="simulator-llama2-7b-a100",
        cost=1.0,
        tputs=((62.4, 32.3), (60.3, 0.0)),
        out_ticks=(4, 8),
        in_ticks=(128, 256),
        slos=Slos(e2e_s=5.0, percentile=99.0),
        created=1748888478.25,
    )


def test_a_profile_written_reads_back_equal_and_in_aibrix_keys(tmp_path: Path) -> None:
    p = GpuProfile(
        "A100",
        3.67,
        ((20.0, 20.0), (40.0, 20.0)),
        (64, 512),
        (128, 1024),
        Slos(ttft_s=0.5, tpot_s=0.05, percentile=90.0),
        created=1.5,
        model="llama",
    )
    data = profile_to_json(p)
    assert data == {
        "gpu": "A100",
        "cost": 3.67,
        "tputs": [[20.0, 20.0], [40.0, 20.0]],
        "indexes": [[64, 512], [128, 1024]],
        "slos": {"percentile": 90, "ttft": 0.5, "tpot": 0.05},
        "created": 1.5,
    }  # no "model" (outside AIBrix's schema: test_placement_profile checks the keys)
    assert isinstance(data["slos"]["percentile"], int)
    assert load_profile(write(tmp_path, data)) == dataclasses.replace(p, model="")
    older = write(tmp_path, {**data, "model": "llama"}, "older.json")  # written before
    assert load_profile(older) == p


def test_aibrix_mean_percentile_and_throughput_slos_are_accepted(tmp_path: Path) -> None:
    data = {**AIBRIX, "slos": {"percentile": 0, "tput": 5.0, "tpat": 0.1, "ttft": 1.0}}
    p = load_profile(write(tmp_path, data))
    assert p.slos == Slos(ttft_s=1.0, percentile=0.0)  # 0: the mean, as AIBrix means it
    older = {k: v for k, v in AIBRIX.items() if k not in ("slos", "created")}
    assert load_profile(write(tmp_path, older)).slos == Slos()


def test_json_lines_and_lists_hold_several_profiles(tmp_path: Path) -> None:
    second = {**AIBRIX, "gpu": "a40"}
    lines = write(tmp_path, json.dumps(AIBRIX) + "\n\n" + json.dumps(second) + "\n")
    assert [p.gpu for p in load_profiles(lines)] == ["simulator-llama2-7b-a100", "a40"]
    listed = write(tmp_path, [AIBRIX, second], "list.json")
    assert [p.gpu for p in load_profiles(listed)] == ["simulator-llama2-7b-a100", "a40"]
    with pytest.raises(ProfileFormatError, match="holds 2 GPU types"):
        load_profile(listed)


MELANGE = {
    "gpu_info": {
        "A10G": {"cost": 1.01, "tputs": [[2, 1], [5, 2]]},
        "A100-80GB": {"cost": 3.67, "tputs": [[20, 20], [40, 20]]},
    },
    "workload_distribution": [[0.2, 0.1], [0.5, 0.2]],
    "total_request_rate": 30.0,
    "slice_factor": 1,
}


def test_melanges_example_input_gives_its_gpus_and_workload(tmp_path: Path) -> None:
    path = write(tmp_path, MELANGE)
    melange = load_melange(path)
    assert [(p.gpu, p.cost, p.tputs) for p in melange.profiles] == [
        ("A10G", 1.01, ((2.0, 1.0), (5.0, 2.0))),
        ("A100-80GB", 3.67, ((20.0, 20.0), (40.0, 20.0))),
    ]
    assert melange.workload == Workload(30.0, ((0.2, 0.1), (0.5, 0.2)), (1, 2), (1, 2), 1)
    assert all((p.out_ticks, p.in_ticks) == ((1, 2), (1, 2)) for p in melange.profiles)
    assert load_profiles(path) == melange.profiles
    assert load_workload(path) == melange.workload


def test_a_workload_reads_and_writes(tmp_path: Path) -> None:
    data = {"rate": 12.5, "histogram": [[1, 0], [0, 3]], "indexes": [[16, 32], [64, 128]]}
    w = load_workload(write(tmp_path, data))
    assert w == Workload(12.5, ((1.0, 0.0), (0.0, 3.0)), (16, 32), (64, 128), 4)
    assert load_workload(write(tmp_path, workload_to_json(w), "again.json")) == w


def test_the_routers_request_sizes_answer_reads_as_a_workload(tmp_path: Path) -> None:
    answer = {
        "model": None,
        "window_s": 300,
        "span_s": 120.0,
        "count": 240,
        "rate": 2.0,
        "out_edges": [16, 32],
        "in_edges": [16, 32, 64],
        "counts": [[100, 0, 40], [0, 100, 0]],
    }
    w = load_workload(write(tmp_path, answer))
    assert w == Workload(2.0, ((100, 0, 40), (0, 100, 0)), (16, 32), (16, 32, 64), 4)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({**AIBRIX, "gpu": ""}, "'gpu'"),
        ({k: v for k, v in AIBRIX.items() if k != "cost"}, "'cost'"),
        ({**AIBRIX, "cost": "1.0"}, "'cost'"),
        ({**AIBRIX, "cost": -1}, "cost"),
        ({**AIBRIX, "tputs": [[1, 2], [3]]}, "tputs"),
        ({**AIBRIX, "tputs": [[1, 2], [3, -4]]}, "tputs"),
        ({**AIBRIX, "tputs": "fast"}, "'tputs'"),
        ({**AIBRIX, "indexes": [[4, 8]]}, "'indexes'"),
        ({**AIBRIX, "indexes": [[8, 4], [128, 256]]}, "output ticks"),
        ({**AIBRIX, "indexes": [[4, 8.5], [128, 256]]}, "indexes[0]"),
        ({**AIBRIX, "slos": {"percentile": 120}}, "slos.percentile"),
        ({**AIBRIX, "slos": {"ttft": 0}}, "slos.ttft"),
        ({**AIBRIX, "slos": {"tbt": 1}}, "slos.tbt"),
        ({**AIBRIX, "created": "yesterday"}, "'created'"),
        ([AIBRIX, 3], "JSON object"),
        ({**MELANGE, "gpu_info": {}}, "'gpu_info'"),
        ({**MELANGE, "gpu_info": {"A10G": {"cost": 1, "tputs": [[1]]}}}, "gpu_info.A10G"),
        ({**MELANGE, "total_request_rate": None}, "'total_request_rate'"),
        ({**MELANGE, "slice_factor": 0}, "slice_factor"),
        ({**MELANGE, "slice_factor": 1.5}, "'slice_factor'"),
        ("{not json", "not JSON"),
    ],
)
def test_every_malformed_profile_names_its_file_and_field(
    tmp_path: Path, data: Any, field: str
) -> None:
    path = write(tmp_path, data, "bad-profile.json")
    with pytest.raises(ProfileFormatError) as caught:
        load_profiles(path)
    assert str(path) in str(caught.value) and field in str(caught.value)
    assert isinstance(caught.value, ConfigError)  # the CLI's exit code 2


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"histogram": [[1]], "indexes": [[1], [1]]}, "'rate'"),
        ({"rate": -1, "histogram": [[1]], "indexes": [[1], [1]]}, "rate"),
        ({"rate": 1, "histogram": [[1, 2]], "indexes": [[1], [1]]}, "histogram"),
        ({"rate": 1, "histogram": [[1]], "indexes": [1, 1]}, "indexes[0]"),
        ({"rate": 1, "histogram": [[1]]}, "'indexes'"),
        ({"rate": 1, "counts": [[1]], "out_edges": [16], "in_edges": []}, "'in_edges'"),
    ],
)
def test_every_malformed_workload_names_its_file_and_field(
    tmp_path: Path, data: Any, field: str
) -> None:
    path = write(tmp_path, data, "bad-workload.json")
    with pytest.raises(ProfileFormatError) as caught:
        load_workload(path)
    assert str(path) in str(caught.value) and field in str(caught.value)


def test_a_missing_or_binary_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileFormatError, match="nothing.json: cannot read"):
        load_profile(tmp_path / "nothing.json")
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ProfileFormatError, match="binary.json: not UTF-8"):
        load_workload(binary)


def test_rebin_moves_each_bin_to_the_smallest_tick_at_or_above_its_edge() -> None:
    counts = [
        [1, 2, 4],  # output edge 16
        [8, 16, 32],  # output edge 32
        [64, 128, 256],  # output edge 4096: above the last tick, the last cell
    ]
    moved = rebin(counts, [16, 32, 4096], [64, 128, 256], [32, 1024], [100, 200])
    # inputs: 64 -> 100, 128 -> 200, 256 -> above 200: 200; outputs: 16, 32 -> 32; 4096 -> 1024
    assert moved == ((1 + 8, 2 + 4 + 16 + 32), (64, 128 + 256))


def test_rebin_refuses_counts_that_do_not_match_the_edges() -> None:
    with pytest.raises(ProfileFormatError, match="2 rows"):
        rebin([[1, 2]], [16, 32], [16, 32], [16], [16])


def test_count_requests_uses_the_same_cells() -> None:
    sizes = [(10, 100), (16, 101), (17, 100), (5000, 1)]  # (output, input)
    assert count_requests(sizes, (16, 32), (100, 200)) == ((1.0, 1.0), (2.0, 0.0))


def test_plan_to_json_adds_assignment_and_ticks() -> None:
    plan = Plan(
        gpus={"B": 1, "A": 2},
        cost=5.0,
        status="optimal",
        solve_s=0.1,
        lp_bound=4.5,
        greedy_cost=6.0,
        assignment={"B": ((0.25, 0.0),), "A": ((0.75, 1.0),)},
    )
    assert plan_to_json(plan, [16], [16, 32]) == {
        "gpus": {"A": 2, "B": 1},
        "cost": 5.0,
        "lp_bound": 4.5,
        "greedy_cost": 6.0,
        "solve_s": 0.1,
        "status": "optimal",
        "assignment": {"A": [[0.75, 1.0]], "B": [[0.25, 0.0]]},
        "indexes": [[16], [16, 32]],
        "unserved": [],
        "unserved_share": 0.0,
    }
