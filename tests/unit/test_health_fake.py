"""FakeBackend: the GpuBackend contract over a fault file that changes under it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from control.health.backend import open_backend
from control.health.errors import BackendError, MockFormatError, NvmlUnavailable
from control.health.fake import FakeBackend
from control.health.mockfile import Injection, inject
from control.health.report import collect
from control.health.types import XidEvent
from control.health.xid import XidLedger


def fault_file(tmp_path: Path, cards: int = 2) -> Path:
    path = tmp_path / "gpus.toml"
    inject(path, Injection("card_count", None, cards))
    return path


def test_open_backend_with_a_mock_file_is_the_fake(tmp_path: Path) -> None:
    backend = open_backend(fault_file(tmp_path, 3))
    assert isinstance(backend, FakeBackend)
    assert backend.device_count() == 3
    assert backend.driver_version() == "fake (0.1.0)"
    snap = backend.snapshot(2)
    assert (snap.index, snap.uuid, snap.link_width_current, snap.nvlink_active) == (
        2,
        "GPU-00000000-0000-4000-8000-000000000002",
        16,
        (True,) * 12,
    )
    with pytest.raises(BackendError, match="no GPU 3") as info:
        backend.snapshot(3)
    assert info.value.index == 3
    backend.close()


def test_init_error_at_start_is_nvml_unavailable_with_its_code(tmp_path: Path) -> None:
    path = fault_file(tmp_path)
    inject(path, Injection("nvml_init_error", None, 18))
    with pytest.raises(
        NvmlUnavailable, match="18 \\(NVML_ERROR_LIB_RM_VERSION_MISMATCH\\)"
    ) as info:
        FakeBackend(path)
    assert info.value.code == 18


def test_a_malformed_file_at_start_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "gpus.toml"
    path.write_text("[gpus]\ncard_count = 'two'\n")
    with pytest.raises(MockFormatError, match="gpus.card_count"):
        FakeBackend(path)


def test_every_change_to_the_file_is_seen_at_the_next_reading(tmp_path: Path) -> None:
    path = fault_file(tmp_path)
    backend = FakeBackend(path)
    assert backend.snapshot(1).temperature_c == 35
    for celsius in (70, 71, 72):  # same size, same tick: seen by content
        inject(path, Injection("temperature", 1, celsius))
        assert backend.snapshot(1).temperature_c == celsius
    inject(path, Injection("card_count", None, 4))
    assert backend.device_count() == 4
    inject(path, Injection("fail_read", 0))
    with pytest.raises(BackendError, match="GPU 0 has fallen off the bus") as info:
        backend.snapshot(0)
    assert info.value.index == 0
    inject(path, Injection("nvml_init_error", None, 9))
    with pytest.raises(BackendError, match="nvmlInit failed: 9"):
        backend.device_count()


def test_a_broken_edit_keeps_the_last_good_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = fault_file(tmp_path)
    backend = FakeBackend(path)
    inject(path, Injection("temperature", 0, 60))
    assert backend.snapshot(0).temperature_c == 60
    path.write_text("[gpus\n")
    with caplog.at_level(logging.WARNING, logger="shoal.control.health.fake"):
        assert backend.snapshot(0).temperature_c == 60
        assert backend.device_count() == 2
    assert "keeping the last good file" in caplog.text
    path.unlink()
    assert backend.snapshot(0).temperature_c == 60


def test_each_listed_xid_is_delivered_once(tmp_path: Path) -> None:
    path = fault_file(tmp_path)
    inject(path, Injection("xid", 1, 79))
    backend = FakeBackend(path, clock=lambda: 5.0)
    assert backend.wait_xid(0) == [XidEvent(1, 79, 5.0, "GPU-00000000-0000-4000-8000-000000000001")]
    assert backend.wait_xid(0) == []
    inject(path, Injection("xid", 1, 48))
    inject(path, Injection("xid", 0, 13))
    assert [(e.index, e.xid) for e in backend.wait_xid(0)] == [(0, 13), (1, 48)]
    inject(path, Injection("clear", 1))  # the list shrank: nothing is delivered again
    inject(path, Injection("xid", 1, 94))
    assert [(e.index, e.xid) for e in backend.wait_xid(0)] == [(1, 94)]


def test_wait_xid_polls_the_file_until_an_xid_appears(tmp_path: Path) -> None:
    path = fault_file(tmp_path)
    naps: list[float] = []

    def sleep(seconds: float) -> None:  # an operator injects while the watcher waits
        naps.append(seconds)
        if len(naps) == 3:
            inject(path, Injection("xid", 0, 95))

    backend = FakeBackend(path, sleep=sleep, poll_s=0.05)
    events = backend.wait_xid(60.0)
    assert [(e.index, e.xid) for e in events] == [(0, 95)]
    assert naps == [0.05, 0.05, 0.05]


def test_collect_never_raises_for_a_lost_gpu_or_a_lost_nvml(tmp_path: Path) -> None:
    path = fault_file(tmp_path)
    backend = FakeBackend(path)
    ledger = XidLedger(clock=lambda: 0.0)
    inject(path, Injection("fail_read", 1))
    ledger.record(XidEvent(1, 79, 0.0))
    health = collect(backend, node="n", ledger=ledger, expect_gpus=2, now=7.0)
    assert [(g.index, g.uuid, g.healthy) for g in health.gpus] == [
        (0, "GPU-00000000-0000-4000-8000-000000000000", True),
        (1, "", False),
    ]
    assert [p.check for p in health.gpus[1].problems] == ["xid", "unreadable"]
    inject(path, Injection("nvml_init_error", None, 9))
    lost = collect(backend, node="n", ledger=ledger, expect_gpus=2, now=8.0)
    assert (lost.gpus, [p.check for p in lost.problems], lost.time) == ((), ["nvml"], 8.0)
    assert lost.problems[0].detail.startswith("cannot count the GPUs: nvmlInit failed: 9")
