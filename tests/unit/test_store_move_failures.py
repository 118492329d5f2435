"""A tier move's completion runs on the daemon's loop, outside any request's ``try``:
whatever fails in it is logged and counted, and every reader waiting on the move is
still woken (else its get hangs until the client times out, or the loop dies).
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

import kvcache.store_file_moves
from tests.unit.test_store_moves import Fixture, data, key


@pytest.fixture
def fx(tmp_path: Path) -> Fixture:
    fixture = Fixture(tmp_path)
    for i in range(3):  # the third evicts block 0 to the SSD
        fixture.put(i)
    fixture.io.run_all()
    return fixture


def test_a_waiter_that_raises_does_not_keep_the_others_asleep(fx: Fixture) -> None:
    woken: list[str] = []

    def broken() -> None:
        woken.append("broken")
        raise RuntimeError("a bug in a parked get")

    assert not fx.store.prepare([key(0)], broken)
    assert not fx.store.prepare([key(0)], lambda: woken.append("second"))
    fx.io.run_all()  # nothing escapes into the I/O loop
    assert woken == ["broken", "second"]
    assert fx.store.statistics().callback_errors == 1
    assert fx.read(0) == data(0), "the move itself landed"


def test_a_completion_that_raises_still_wakes_its_waiters(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    fx.ssd.write(fx.store._entries[key(0)].offset, memoryview(b"\xff" * 4096))  # corrupt

    def count_error(error: Exception, entry: object) -> None:
        raise RuntimeError("a bug in the completion's bookkeeping")

    monkeypatch.setattr(fx.store, "_count_error", count_error)
    woken: list[bool] = []
    assert not fx.store.prepare([key(0)], lambda: woken.append(True))
    fx.io.run_all()
    assert woken == [True]
    assert fx.store.statistics().callback_errors == 1
    assert fx.store.num_moving == 0


def test_no_memory_for_a_staging_buffer_drops_the_demotion_and_frees_its_slots(
    fx: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stage(*args: object) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(kvcache.store_file_moves, "stage", stage)
    # Bringing 0 back makes room in SHM: the victim's staging fails inside prepare().
    assert not fx.store.prepare([key(0)], lambda: None)
    assert fx.io.num_pending == 1, "only the read: no write was queued"
    fx.io.run_all()
    assert fx.read(0) == data(0)
    fx.put(3)  # evicts another: its staging fails too, inside reserve()
    assert fx.io.num_pending == 0, "no write was queued"
    stats = fx.store.statistics()
    assert stats.io_errors == 2 and stats.dropped == 2
    allocated = sum(t.statistics().num_allocations for t in fx.tiers)
    assert allocated == len(fx.store._entries), "the slots of the dropped blocks were freed"
    assert fx.read(3) == data(3) and fx.read(0) == data(0)
