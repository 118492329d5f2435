"""The XID table and XidLedger on scripted event queues and virtual time."""

from __future__ import annotations

import json

import pytest

from control.health.types import Problem, Remedy, Severity, XidEvent
from control.health.xid import XID_TABLE, XidLedger, describe

REQUIRED = (13, 31, 32, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 119, 120, 121, 140)


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def summary(problems: list[Problem]) -> list[tuple[str, str, str]]:
    return [(p.detail, p.severity.value, p.remedy.value) for p in problems]


def test_only_the_device_plugins_application_errors_leave_a_gpu_healthy() -> None:
    mild = {c for c in range(0, 200) if describe(c).severity is not Severity.CRITICAL}
    assert mild == {13, 31, 43, 45, 68} | {32, 69, 121}  # 32/69/121: our documented deviations


def test_the_table_covers_the_codes_the_issue_names() -> None:
    assert set(REQUIRED) <= set(XID_TABLE)
    for code, info in XID_TABLE.items():
        assert info.code == code and info.description


@pytest.mark.parametrize(
    ("code", "severity", "remedy"),
    [
        (79, Severity.CRITICAL, Remedy.DRAIN_NODE),
        (64, Severity.CRITICAL, Remedy.DRAIN_NODE),
        (48, Severity.CRITICAL, Remedy.RESET_GPU),
        (63, Severity.CRITICAL, Remedy.RESET_GPU),
        (74, Severity.CRITICAL, Remedy.RESET_GPU),
        (92, Severity.CRITICAL, Remedy.RESET_GPU),
        (94, Severity.CRITICAL, Remedy.RESET_GPU),
        (95, Severity.CRITICAL, Remedy.RESET_GPU),
        (119, Severity.CRITICAL, Remedy.RESET_GPU),
        (120, Severity.CRITICAL, Remedy.RESET_GPU),
        (140, Severity.CRITICAL, Remedy.RESET_GPU),
        (13, Severity.WARNING, Remedy.RESTART_ENGINE),
        (31, Severity.WARNING, Remedy.RESTART_ENGINE),
        (43, Severity.WARNING, Remedy.RESTART_ENGINE),
        (45, Severity.INFO, Remedy.NONE),
        (121, Severity.WARNING, Remedy.NONE),
        (68, Severity.WARNING, Remedy.RESTART_ENGINE),
        # not in the table: fatal, as in NVIDIA's device plugin
        (109, Severity.CRITICAL, Remedy.RESET_GPU),
        (143, Severity.CRITICAL, Remedy.RESET_GPU),
        (150, Severity.CRITICAL, Remedy.RESET_GPU),
        (4242, Severity.CRITICAL, Remedy.RESET_GPU),
    ],
)
def test_severity_and_remedy_per_code(code: int, severity: Severity, remedy: Remedy) -> None:
    info = describe(code)
    assert (info.severity, info.remedy) == (severity, remedy)


def test_a_critical_xid_stays_until_cleared_a_mild_one_expires() -> None:
    clock = Clock(100.0)
    ledger = XidLedger(window_s=60.0, clock=clock)
    for event in [XidEvent(0, 79, 100.0), XidEvent(0, 13, 100.0), XidEvent(1, 43, 110.0)]:
        ledger.record(event)
    assert summary(ledger.problems(0)) == [
        ("XID 13: graphics engine exception (an application fault, e.g. out-of-range access)",
         "warning", "restart_engine"),
        ("XID 79: GPU has fallen off the bus", "critical", "drain_node"),
    ]  # fmt: skip
    assert [p.detail[:6] for p in ledger.problems(1)] == ["XID 43"]
    clock.now = 160.0  # 13 was last seen 60 s ago: still inside the window
    assert [p.detail[:6] for p in ledger.problems(0)] == ["XID 13", "XID 79"]
    clock.now = 160.5
    assert [p.detail[:6] for p in ledger.problems(0)] == ["XID 79"]
    assert [p.detail[:6] for p in ledger.problems(1)] == ["XID 43"]
    clock.now = 10_000.0
    assert [p.detail[:6] for p in ledger.problems(0)] == ["XID 79"]
    assert ledger.problems(1) == []
    ledger.clear(0)
    assert ledger.problems(0) == []
    assert ledger.indexes() == []


def test_repeats_are_counted_and_refresh_the_window() -> None:
    clock = Clock(0.0)
    ledger = XidLedger(window_s=10.0, clock=clock)
    queue = [XidEvent(2, 31, t) for t in (0.0, 5.0, 9.0)]
    for event in queue:
        ledger.record(event)
    clock.now = 18.0  # last seen at 9: 9 s ago
    assert [p.detail for p in ledger.problems(2)] == [
        "XID 31: GPU memory page fault (an application's illegal address) (3 times)"
    ]
    clock.now = 19.5
    assert ledger.problems(2) == []


def test_memory_is_bounded_and_critical_codes_win() -> None:
    clock = Clock(0.0)
    ledger = XidLedger(max_codes=3, clock=clock)
    for t, code in enumerate([13, 31, 79, 43, 48]):
        ledger.record(XidEvent(0, code, float(t)))
    # 13 (oldest mild) went for 43, then 31 (now the oldest mild) went for 48
    assert [p.detail[:6] for p in ledger.problems(0)] == ["XID 43", "XID 48", "XID 79"]
    ledger.record(XidEvent(0, 95, 10.0))  # 43 goes: all three kept are critical now
    ledger.record(XidEvent(0, 13, 11.0))  # mild, no room: dropped
    assert [p.detail[:6] for p in ledger.problems(0)] == ["XID 48", "XID 79", "XID 95"]
    ledger.record(XidEvent(0, 64, 12.0))  # critical, no room: the least recent (79 at 2) goes
    assert [p.detail[:6] for p in ledger.problems(0)] == ["XID 48", "XID 64", "XID 95"]
    ledger.record(XidEvent(5000, 79, 0.0))
    ledger.record(XidEvent(-1, 79, 0.0))
    assert ledger.indexes() == [0]


def test_the_ledger_round_trips_through_json_and_refuses_other_documents() -> None:
    clock = Clock(100.0)
    ledger = XidLedger(window_s=60.0, clock=clock)
    for t, (index, code) in enumerate([(0, 79), (0, 79), (0, 13), (3, 94)]):
        ledger.record(XidEvent(index, code, 100.0 + t))
    doc = json.loads(json.dumps(ledger.to_json()))
    again = XidLedger(window_s=60.0, clock=clock)
    again.restore(doc)
    assert again.to_json() == ledger.to_json()
    assert summary(again.problems(0)) == summary(ledger.problems(0))
    assert [p.detail for p in again.problems(0)][1].endswith("(2 times)")
    for bad in ({}, {"version": 2, "gpus": {}}, {"version": 1, "gpus": {"x": []}},
                {"version": 1, "gpus": {"0": [[79, 0, 1.0, 1.0]]}},
                {"version": 1, "gpus": {"0": [["79", 1, 1.0, 1.0]]}}):  # fmt: skip
        with pytest.raises(ValueError):
            XidLedger().restore(bad)
