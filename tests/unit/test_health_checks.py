"""Every health check, driven by fake-backend fault files (AIBrix's mock schema + Shoal's
keys) and by ``shoal health inject``'s edits, with the exact findings expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from control.health.checks import Thresholds, check_gpu, check_node, throttle_names
from control.health.mockfile import Injection, inject
from control.health.report import check_once
from control.health.types import GpuSnapshot, NodeHealth, Problem, Remedy, Severity

C, W, N = "critical", "warning", "info"


def run(tmp_path: Path, text: str, expect_gpus: int | None = None) -> NodeHealth:
    path = tmp_path / "gpus.toml"
    path.write_text(text)
    return check_once(nvml_mock=path, node="node-a", expect_gpus=expect_gpus, now=1000.0)


def card0(keys: str) -> str:
    return f'version = "0.1.0"\n[gpus]\ncard_count = 2\n[gpus.0]\n{keys}\n'


def findings(problems: tuple[Problem, ...] | list[Problem]) -> list[tuple[str, str, str]]:
    return [(p.check, p.severity.value, p.remedy.value) for p in problems]


SCENARIOS = [
    ("healthy", "", []),
    ("link width x8 of x16", "link_width_current = 8", [("pcie_link", W, "none")]),
    ("link width x4 of x16", "link_width_current = 4", [("pcie_link", C, "drain_node")]),
    ("link width x1 of x16", "link_width_current = 1", [("pcie_link", C, "drain_node")]),
    ("link gen 3 of 4", "link_gen = 3", [("pcie_link", N, "none")]),
    ("link gen 4 of 5", "link_gen_max = 5", [("pcie_link", N, "none")]),
    ("volatile DBE", "ecc_volatile_dbe = 2", [("ecc", C, "reset_gpu")]),
    ("aggregate DBE only", "ecc_aggregate_dbe = 2", [("ecc", W, "none")]),
    ("volatile SBE under", "ecc_volatile_sbe = 999", []),
    ("volatile SBE at", "ecc_volatile_sbe = 1000", [("ecc", W, "none")]),
    ("aggregate SBE at", "ecc_aggregate_sbe = 10000", [("ecc", W, "none")]),
    ("SRAM UE", "sram_ue = 1", [("memory", C, "reset_gpu")]),
    (
        "AIBrix example card 0",
        "remapping_pending = true\ndram_ue = 7",
        [("memory", C, "reset_gpu"), ("row_remap", C, "reset_gpu")],
    ),
    ("DRAM CE at", "dram_ce = 1000", [("memory", W, "none")]),
    ("L1 UE", "uncorrectable_agg_l1 = 1", [("memory", W, "none")]),
    ("L2 UE", "uncorrectable_agg_l2 = 3", [("memory", W, "none")]),
    ("register UE", "uncorrectable_agg_reg = 1", [("memory", W, "none")]),
    ("retirement pending", "retired_page_pending = true", [("retired_pages", C, "reset_gpu")]),
    ("59 pages", "retired_page_sbe = 40\nretired_page_dbe = 19", [("retired_pages", W, "none")]),
    (
        "60 pages",
        "retired_page_sbe = 30\nretired_page_dbe = 30",
        [("retired_pages", C, "drain_node")],
    ),
    ("60 SBE pages", "retired_page_sbe = 60", [("retired_pages", C, "drain_node")]),
    ("a DBE page", "retired_page_dbe = 1", [("retired_pages", W, "none")]),
    ("remap failure", "remapping_failure = true", [("row_remap", C, "drain_node")]),
    ("remap pending", "remapping_pending = true", [("row_remap", C, "reset_gpu")]),
    ("88 C", "temperature = 88", []),
    ("89 C = slowdown", "temperature = 89", [("temperature", W, "none")]),
    ("92 C = shutdown", "temperature = 92", [("temperature", C, "drain_node")]),
    ("own thresholds", "temperature = 80\nslowdown_temp = 75", [("temperature", W, "none")]),
    (
        "throttle names",
        'throttle_reasons = ["hw_slowdown", "sw_power_cap", "gpu_idle"]',
        [("throttle", W, "none"), ("throttle", N, "none")],
    ),
    ("throttle bitmask HW thermal", "throttle_reasons = 0x40", [("throttle", W, "none")]),
    ("power brake", 'throttle_reasons = ["hw_power_brake_slowdown"]', [("throttle", W, "none")]),
    ("SW thermal", 'throttle_reasons = ["sw_thermal_slowdown"]', [("throttle", N, "none")]),
    ("idle only", 'throttle_reasons = ["gpu_idle", "applications_clocks_setting"]', []),
    # a partly bridged PCIe board: not critical
    ("one link down", "nvlink_active = [true, false, true]", [("nvlink", W, "none")]),
    ("all links down", "nvlink_active = [false, false]", [("nvlink", W, "none")]),
    ("no links", "nvlink_active = []\nnvlink_errors = []", []),
    ("99 link errors", "nvlink_errors = [0, 99]", []),
    ("100 link errors", "nvlink_errors = [0, 100]", [("nvlink", W, "none")]),
    # counted since driver load: never critical
    ("10000 link errors", "nvlink_errors = [10000, 5]", [("nvlink", W, "none")]),
    ("XID 79", "xids = [79]", [("xid", C, "drain_node")]),
    ("XID 48 and 13", "xids = [48, 13]", [("xid", W, "restart_engine"), ("xid", C, "reset_gpu")]),
    ("XID 45", "xids = [45]", [("xid", N, "none")]),
    ("unknown XID", "xids = [999]", [("xid", C, "reset_gpu")]),
    ("fell off the bus", "fail_read = true", [("unreadable", C, "reset_gpu")]),
    (
        "XID 79 and off the bus",
        "xids = [79]\nfail_read = true",
        [("xid", C, "drain_node"), ("unreadable", C, "reset_gpu")],
    ),
]


@pytest.mark.parametrize(
    ("keys", "expected"), [s[1:] for s in SCENARIOS], ids=[s[0] for s in SCENARIOS]
)
def test_each_fault_on_card_0_gives_exactly_its_findings(
    tmp_path: Path, keys: str, expected: list[tuple[str, str, str]]
) -> None:
    health = run(tmp_path, card0(keys))
    assert [g.index for g in health.gpus] == [0, 1]
    assert findings(health.gpus[0].problems) == expected
    assert health.gpus[1].problems == ()  # cards not listed are healthy
    assert health.problems == ()
    critical = any(sev == C for _, sev, _ in expected)
    assert health.gpus[0].healthy is not critical
    assert health.healthy is not critical
    assert health.unhealthy_gpus() == (frozenset({"node-a/gpu0"}) if critical else frozenset())


def test_details_name_the_readings(tmp_path: Path) -> None:
    health = run(tmp_path, card0("link_width_current = 4\nxids = [79, 79]\ntemperature = 90"))
    assert [p.detail for p in health.gpus[0].problems] == [
        "XID 79: GPU has fallen off the bus (2 times)",
        "PCIe link width x4, the card supports x16",
        "90 C, at or above the slowdown threshold 89 C",
    ]
    assert health.gpus[0].remedy is Remedy.DRAIN_NODE


def test_the_aibrix_sample_file_reads_as_aibrix_describes_it(tmp_path: Path) -> None:
    sample = Path(__file__).parent / "data" / "health" / "aibrix_sample.toml"
    health = check_once(nvml_mock=sample, node="n", expect_gpus=None, now=0.0)
    assert health.gpus == ()
    assert findings(health.problems) == [("nvml", C, "drain_node")]
    assert "nvmlInit failed: 9 (NVML_ERROR_DRIVER_NOT_LOADED)" in health.problems[0].detail


def test_gpu_count_below_expected_is_critical_above_is_a_warning(tmp_path: Path) -> None:
    text = "[gpus]\ncard_count = 2\n"
    assert findings(run(tmp_path, text, expect_gpus=4).problems) == [("gpu_count", C, "drain_node")]
    assert run(tmp_path, text, expect_gpus=4).problems[0].detail == "2 GPUs visible, 4 expected"
    assert findings(run(tmp_path, text, expect_gpus=1).problems) == [("gpu_count", W, "none")]
    assert run(tmp_path, text, expect_gpus=2).problems == ()
    # the two not visible are listed too (critical "missing"): all four go out by name
    assert run(tmp_path, text, expect_gpus=4).unhealthy_gpus() == {
        f"node-a/gpu{i}" for i in range(4)
    }


def test_nvml_init_error_is_a_node_level_critical_problem_without_gpus(tmp_path: Path) -> None:
    health = run(tmp_path, "[gpus]\ncard_count = 8\nnvml_init_error = 12\n", expect_gpus=8)
    assert health.gpus == ()
    assert findings(health.problems) == [("nvml", C, "drain_node")]
    assert not health.healthy


INJECTIONS = [
    (Injection("xid", 1, 79), [("xid", C, "drain_node")]),
    (Injection("xid", 1, 31), [("xid", W, "restart_engine")]),
    (Injection("ecc_dbe", 1, 1), [("ecc", C, "reset_gpu")]),
    (Injection("ecc_sbe", 1, 5000), [("ecc", W, "none")]),
    (Injection("remap_pending", 1), [("row_remap", C, "reset_gpu")]),
    (Injection("remap_failure", 1), [("row_remap", C, "drain_node")]),
    (Injection("link_width", 1, 8), [("pcie_link", W, "none")]),
    (Injection("temperature", 1, 95), [("temperature", C, "drain_node")]),
    (Injection("throttle", 1, "hw_thermal_slowdown"), [("throttle", W, "none")]),
    (Injection("nvlink_down", 1, 3), [("nvlink", W, "none")]),
    (Injection("fail_read", 1), [("unreadable", C, "reset_gpu")]),
]


@pytest.mark.parametrize(
    ("injection", "expected"), INJECTIONS, ids=lambda x: getattr(x, "kind", "")
)
def test_each_injection_on_gpu_1_gives_its_findings_and_clear_heals_it(
    tmp_path: Path, injection: Injection, expected: list[tuple[str, str, str]]
) -> None:
    path = tmp_path / "gpus.toml"
    inject(path, injection, new_card_count=4)
    health = check_once(nvml_mock=path, node="n", expect_gpus=4, now=0.0)
    assert [findings(g.problems) for g in health.gpus] == [[], expected, [], []]
    inject(path, Injection("clear", 1))
    healed = check_once(nvml_mock=path, node="n", expect_gpus=4, now=0.0)
    assert healed.healthy and all(g.problems == () for g in healed.gpus)


def test_node_level_injections(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    inject(path, Injection("card_count", None, 3))
    assert findings(check_once(nvml_mock=path, node="n", expect_gpus=4, now=0.0).problems) == [
        ("gpu_count", C, "drain_node")
    ]
    inject(path, Injection("nvml_init_error", None, 9))
    assert findings(check_once(nvml_mock=path, node="n", expect_gpus=4, now=0.0).problems) == [
        ("nvml", C, "drain_node")
    ]
    inject(path, Injection("clear", None))
    health = check_once(nvml_mock=path, node="n", expect_gpus=3, now=0.0)
    assert health.healthy and len(health.gpus) == 3


# ---- the pure functions on hand-made snapshots ----


def test_unknown_readings_are_no_finding_and_failed_ones_are_warnings() -> None:
    assert check_gpu(GpuSnapshot(index=0)) == []
    snap = GpuSnapshot(index=0, unreadable=("temperature_c", "nvlink_active[2]"))
    assert check_gpu(snap) == [
        Problem("unreadable", Severity.WARNING, "cannot read temperature_c"),
        Problem("unreadable", Severity.WARNING, "cannot read nvlink_active[2]"),
    ]


def test_thresholds_move_the_rules_and_refuse_nonsense() -> None:
    snap = GpuSnapshot(index=0, link_width_current=8, link_width_max=16, nvlink_errors=(20,))
    strict = Thresholds(
        link_width_critical_fraction=0.5, nvlink_errors_warn=10, nvlink_errors_critical=20
    )
    assert findings(check_gpu(snap, thresholds=strict)) == [
        ("pcie_link", C, "drain_node"),
        ("nvlink", W, "none"),
    ]
    assert "high" in check_gpu(snap, thresholds=strict)[1].detail
    with pytest.raises(ValueError, match="link_width_critical_fraction"):
        Thresholds(link_width_critical_fraction=1.0)
    with pytest.raises(ValueError, match="nvlink_errors_warn"):
        Thresholds(nvlink_errors_warn=10, nvlink_errors_critical=5)


def test_check_node_and_throttle_names() -> None:
    assert check_node(8, None) == []
    assert check_node(0, 0) == []
    assert throttle_names(0x1 | 0x8 | 0x1000) == ["gpu_idle", "hw_slowdown", "0x1000"]
