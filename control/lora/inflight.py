"""Moves in flight and per-name exclusion: what lets the manager do I/O without a lock.

Invariant: at most one move (a load or an unload) per (engine, adapter) is in flight;
each is ``claim``ed in the synchronous section that decided it and ``release``d exactly
once when its I/O ended, which resolves its future (``None``: done, else the error), so
``quiet(name)`` and a wake joining a load always return. ``exclusive(name)`` serialises
what must not overlap for one name (fetching its files, registering it, removing it)
while other names go on; its locks live only while someone holds or waits for them
(bounded by concurrency, not by every name ever seen).

Rejected: one manager-wide lock held over network calls (issue 14 review, finding 4: a
hung engine's 30 s load stalled every other wake, round and unload); a lock per engine
(a wake would still wait for another adapter's slow load on the engine it picks).
"""

from __future__ import annotations

import asyncio
import contextlib
from asyncio import Future
from collections.abc import AsyncIterator
from typing import Literal

__all__ = ["InFlight", "MoveKind"]

MoveKind = Literal["load", "unload"]


class InFlight:
    def __init__(self) -> None:
        self._moves: dict[tuple[str, str], tuple[MoveKind, Future[BaseException | None]]] = {}
        self._names: dict[str, tuple[asyncio.Lock, list[int]]] = {}  # lock, [users]

    def claim(self, url: str, name: str, kind: MoveKind) -> Future[BaseException | None]:
        """Claim the move; its future (``release`` resolves it) is also its token."""
        assert (url, name) not in self._moves, f"two moves of {name} on {url} at once"
        done: Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self._moves[(url, name)] = (kind, done)
        return done

    def release(self, url: str, name: str, error: BaseException | None,
                token: Future[BaseException | None] | None = None) -> None:  # fmt: skip
        """The move of ``name`` on ``url`` ended (``error`` None: done); waiters wake.
        With ``token``, only that claim (a cancelled caller cleaning up what it never
        started must not end a newer claim of the same pair)."""
        entry = self._moves.get((url, name))
        if entry is None or (token is not None and entry[1] is not token):
            return
        del self._moves[(url, name)]
        if not entry[1].done():
            entry[1].set_result(error)

    def busy(self, url: str, name: str) -> bool:
        return (url, name) in self._moves

    def pairs(self) -> list[tuple[str, str]]:
        return list(self._moves)

    def of(
        self, name: str, kind: MoveKind | None = None
    ) -> dict[str, Future[BaseException | None]]:
        """Engine -> the future of ``name``'s move there, of ``kind`` when given."""
        return {u: f for (u, n), (k, f) in self._moves.items()
                if n == name and (kind is None or k == kind)}  # fmt: skip

    def on(self, url: str, kind: MoveKind | None = None) -> set[str]:
        """Adapters moving on ``url`` (of ``kind`` when given)."""
        return {n for (u, n), (k, _) in self._moves.items()
                if u == url and (kind is None or k == kind)}  # fmt: skip

    async def quiet(self, name: str) -> None:
        """Until no move of ``name`` is in flight."""
        while waiting := list(self.of(name).values()):
            await asyncio.wait(waiting)

    @contextlib.asynccontextmanager
    async def exclusive(self, name: str) -> AsyncIterator[None]:
        """One fetch, registration or removal of ``name`` at a time."""
        entry = self._names.setdefault(name, (asyncio.Lock(), [0]))
        entry[1][0] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1][0] -= 1
            if entry[1][0] == 0:
                del self._names[name]
