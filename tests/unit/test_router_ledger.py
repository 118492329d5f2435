"""The in-memory ledger: in-flight requests and pending prompt tokens per engine."""

from __future__ import annotations

import asyncio

import pytest

from router.ledger import InMemoryLedger


def test_pending_tokens_leave_at_the_first_token_and_requests_at_release() -> None:
    ledger = InMemoryLedger()
    ledger.acquire_nowait("e1", 100)
    ledger.acquire_nowait("e1", 50)
    ledger.acquire_nowait("e2", 7)
    assert ledger.snapshot() == {"e1": (2, 150), "e2": (1, 7)}
    ledger.first_token_nowait("e1", 100)
    assert ledger.snapshot()["e1"] == (2, 50)
    ledger.release_nowait("e1", 0)  # the one that had its first token
    ledger.release_nowait("e1", 50)  # one that failed before any token
    assert ledger.snapshot() == {"e2": (1, 7)}  # idle engines drop out


def test_the_async_face_is_the_same_and_close_forgets() -> None:
    async def run() -> dict[str, tuple[int, int]]:
        ledger = InMemoryLedger()
        await ledger.acquire("e", 3)
        await ledger.refresh()
        seen = dict(ledger.snapshot())
        await ledger.close()
        assert ledger.snapshot() == {}
        return seen

    assert asyncio.run(run()) == {"e": (1, 3)}


def test_releasing_more_than_was_acquired_is_a_bug() -> None:
    ledger = InMemoryLedger()
    ledger.acquire_nowait("e", 1)
    with pytest.raises(AssertionError, match="released more"):
        ledger.release_nowait("e", 2)
