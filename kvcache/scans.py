"""Long scans run in bounded steps between requests (finding M3 of the 2026-12 review).

A scan is a generator that does a bounded piece of work per ``next`` and returns its
result (e.g. ``BlockStore.evict_steps``: blocks removed); the loop that owns it steps every
running scan once a turn and hands each finished one's result to its callback, so no
request waits behind a pass over a million blocks. Used by the daemon's engine socket and
the cluster node's operator requests.
"""

from __future__ import annotations

from collections.abc import Callable, Generator

__all__ = ["StepScans"]


class StepScans:
    """The scans one loop is running, each with the callback its result goes to."""

    __slots__ = ("_running",)

    def __init__(self) -> None:
        self._running: list[tuple[Generator[None, None, int], Callable[[int], None]]] = []

    def start(self, steps: Generator[None, None, int], done: Callable[[int], None]) -> None:
        self._running.append((steps, done))

    def step(self) -> bool:
        """One step of each scan; a finished one's callback runs. True if any remain."""
        for scan in list(self._running):
            steps, done = scan
            try:
                next(steps)
            except StopIteration as finished:
                self._running.remove(scan)
                done(int(finished.value))
        return bool(self._running)

    def __bool__(self) -> bool:
        return bool(self._running)
