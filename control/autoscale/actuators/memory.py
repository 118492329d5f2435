"""In-memory scale target: replicas that exist only as numbers (tests, ``--dry-run``).

Invariant: ``ready + pending == spec`` once every start delay elapsed; a replica asked for
at time t is pending until ``t + start_delay_s`` on the injected clock, then ready. Scaling
down removes pending replicas first (the newest), then ready ones, at once: there is
nothing to drain. ``fail_next`` makes the next calls raise ``ActuatorError`` so the
controller's error path can be tested without a cluster.

Endpoints of ready replicas are ``memory://replica-N``; with ``endpoint_for`` a test maps
replica numbers to real URLs (simulated engines already running).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from control.autoscale.errors import ActuatorError
from control.autoscale.types import ReplicaState

__all__ = ["MemoryActuator"]


class MemoryActuator:
    def __init__(
        self,
        replicas: int = 0,
        *,
        start_delay_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        endpoint_for: Callable[[int], str] | None = None,
    ) -> None:
        self._clock = clock
        self._start_delay_s = start_delay_s
        self._endpoint_for = endpoint_for or (lambda n: f"memory://replica-{n}")
        self._ready_at: list[float] = [clock()] * replicas  # one per replica, by number
        self.fail_next = 0  # raise ActuatorError on this many coming calls
        self.scale_calls: list[int] = []  # every desired count asked for, in order

    def _maybe_fail(self, what: str) -> None:
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ActuatorError(f"memory target: injected failure of {what}")

    def state_nowait(self) -> ReplicaState:
        now = self._clock()
        ready = [n for n, at in enumerate(self._ready_at) if at <= now]
        return ReplicaState(
            spec=len(self._ready_at),
            ready=len(ready),
            pending=len(self._ready_at) - len(ready),
            endpoints=tuple(self._endpoint_for(n) for n in ready),
        )

    async def state(self) -> ReplicaState:
        self._maybe_fail("state")
        return self.state_nowait()

    async def scale(self, desired: int) -> None:
        assert desired >= 0, f"scale to {desired} replicas"
        self._maybe_fail("scale")
        self.scale_calls.append(desired)
        now = self._clock()
        while len(self._ready_at) < desired:
            self._ready_at.append(now + self._start_delay_s)
        if len(self._ready_at) > desired:
            # Pending (latest ready_at) go first, then the newest ready ones.
            keep = sorted(range(len(self._ready_at)), key=lambda n: self._ready_at[n])[:desired]
            self._ready_at = [self._ready_at[n] for n in sorted(keep)]

    async def close(self) -> None:
        return None
