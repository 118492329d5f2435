"""In-flight accounting: which engine has how many of this router's requests, and how
many of their prompt tokens are still waiting for a first token.

The ledger is the router's primary load signal (issue 12: engines' ``/metrics`` lag by a
scrape interval; the router knows the instant it sends a request). Per request::

    acquire(engine, tokens)        sent: in_flight += 1, pending += tokens
    first_token(engine, tokens)    first byte back: pending -= tokens
    release(engine, pending_left)  finished: in_flight -= 1, pending -= pending_left
                                   (pending_left = tokens when no first token came)

Invariant: every ``acquire`` is matched by exactly one ``release`` (the proxy's
``finally``), so counts never drift; ``snapshot`` never does I/O (strategies read it on
the hot path). One replica keeps it in memory (``InMemoryLedger``); several share it
through Redis (``router/shared.py``'s ``RedisLedger``, same Protocol), whose ``refresh``
pulls the other replicas' counts in the background.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

__all__ = ["InMemoryLedger", "Ledger"]


class Ledger(Protocol):
    async def acquire(self, engine_id: str, tokens: int) -> None: ...

    async def first_token(self, engine_id: str, tokens: int) -> None: ...

    async def release(self, engine_id: str, tokens_pending: int) -> None: ...

    def snapshot(self) -> Mapping[str, tuple[int, int]]: ...

    async def refresh(self) -> None: ...

    async def close(self) -> None: ...


class InMemoryLedger:
    """This process's counts (one router replica, or a test)."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}

    def acquire_nowait(self, engine_id: str, tokens: int) -> None:
        counts = self._counts.setdefault(engine_id, [0, 0])
        counts[0] += 1
        counts[1] += tokens

    def first_token_nowait(self, engine_id: str, tokens: int) -> None:
        counts = self._counts[engine_id]
        counts[1] -= tokens
        assert counts[1] >= 0, f"pending tokens of {engine_id} went negative: {counts}"

    def release_nowait(self, engine_id: str, tokens_pending: int) -> None:
        counts = self._counts[engine_id]
        counts[0] -= 1
        counts[1] -= tokens_pending
        assert counts[0] >= 0 and counts[1] >= 0, f"{engine_id} released more than acquired"
        if counts == [0, 0]:
            del self._counts[engine_id]

    async def acquire(self, engine_id: str, tokens: int) -> None:
        self.acquire_nowait(engine_id, tokens)

    async def first_token(self, engine_id: str, tokens: int) -> None:
        self.first_token_nowait(engine_id, tokens)

    async def release(self, engine_id: str, tokens_pending: int) -> None:
        self.release_nowait(engine_id, tokens_pending)

    def snapshot(self) -> Mapping[str, tuple[int, int]]:
        return {engine: (c[0], c[1]) for engine, c in self._counts.items()}

    async def refresh(self) -> None:
        """Nothing to pull: this process is the only replica."""

    async def close(self) -> None:
        self._counts.clear()
