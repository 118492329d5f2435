"""Requests held while no engine serves their model: scale from zero (issue 13), and
LoRA adapters loaded on demand (issue 14).

::

    a request for model M finds no healthy engine serving M (zero engines, or all of
    them still starting; NOT a saturated fleet: that is a 429 at once)
      try_hold(M)  -> None when max_requests are held already    -> 503 hold_full
      hold(M)      waits for one of
                     wake(M): an engine became healthy, or one
                              lists M (an adapter was loaded)     -> routed normally
                     refuse(M, error): M will not come (the LoRA
                              manager does not know it)           -> error (404) at once
                     the ticket's deadline (timeout_s)            -> 503 hold_timeout
                     the client hangs up (task cancelled)         -> dropped, no answer
    while anything is held for M, the proxy asks the autoscaler for an engine (and the
    LoRA manager for the adapter, with --lora-url), at most
    once per ``WakeGate.interval_s`` per model

Invariant: a ticket is in exactly one model's FIFO from ``try_hold`` until it is woken,
refused, expires or is cancelled, and then in none; ``num_held`` is the sum of the FIFOs'
lengths and never exceeds ``max_requests``. ``wake(M)`` takes M's tickets in arrival
order and resolves their futures in that order, so the event loop resumes the waiters
first-come first-served.

Choices:

- One bound over all models (what it protects is the router's memory and sockets), and
  a request beyond it is refused at once: a client that cannot be held should retry
  elsewhere rather than wait in the kernel's accept queue.
- Each waiter awaits its own future, resolved by ``wake``; the pool's health check is
  the event that calls ``wake`` (``EnginePool.on_health_change``): no polling sleep per
  request, and the deadline is one loop timer per waiter.
- Deadlines come from the injected clock (``time.monotonic`` by default); ``take_expired``
  is the pure form of the timeout (tests drive it on virtual time), ``hold`` the waiting
  one (STYLE.md 9: ``try_hold``/``hold``, ``statistics()``).

Rejected: an ``asyncio.Condition`` per model (``notify_all`` wakes in FIFO order too, but
a timed-out or cancelled waiter must then be found and removed by hand anyway, and the
statistics need the tickets); holding on saturation as well (it would hide overload from
clients and from the autoscaler, which sees engine queues for that); a per-model bound
(a client sending many model names would get more room, not less).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from router.errors import HoldFull, HoldTimedOut

__all__ = ["HoldQueue", "HoldStats", "Ticket", "WakeGate"]


class Ticket:
    """One held request (the queue's mutable record of it)."""

    __slots__ = ("deadline", "future", "held_at", "model", "state")

    def __init__(self, model: str, held_at: float, deadline: float) -> None:
        self.model = model
        self.held_at = held_at
        self.deadline = deadline
        self.state = "held"  # -> "woken" | "refused" | "expired" | "cancelled"
        self.future: asyncio.Future[None] | None = None


@dataclass(frozen=True, slots=True)
class HoldStats:
    held: Mapping[str, int]  # model -> requests held now (models with none are absent)
    num_held: int  # held now, all models
    num_admitted: int  # ever held (counted once per hold, a re-hold after a wake again)
    num_woken: int
    num_timed_out: int
    num_cancelled: int  # the client hung up while held
    num_full: int  # refused because max_requests were held
    num_refused: int = 0  # answered with an error while held (refuse: an unknown adapter)


class HoldQueue:
    """Per-model FIFOs of held requests under one bound (module docstring)."""

    def __init__(
        self,
        *,
        max_requests: int,
        timeout_s: float,
        retry_after_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert max_requests >= 0 and timeout_s >= 0, f"bad bounds {max_requests}, {timeout_s}"
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self._clock = clock
        self._queues: dict[str, deque[Ticket]] = {}
        self._num_held = 0
        self._num_admitted = self._num_woken = self._num_timed_out = 0
        self._num_cancelled = self._num_full = self._num_refused = 0

    @property
    def enabled(self) -> bool:
        return self.max_requests > 0 and self.timeout_s > 0

    # ---- the logic (no waiting) -------------------------------------------------------

    def try_hold(self, model: str, *, deadline: float | None = None) -> Ticket | None:
        """Queue a request for ``model`` until ``deadline`` (default now + timeout_s);
        None when the queue is full (or holding is off)."""
        if not self.enabled:
            return None
        if self._num_held >= self.max_requests:
            self._num_full += 1
            return None
        now = self._clock()
        ticket = Ticket(model, now, now + self.timeout_s if deadline is None else deadline)
        self._queues.setdefault(model, deque()).append(ticket)
        self._num_held += 1
        self._num_admitted += 1
        return ticket

    def wake(self, model: str) -> list[Ticket]:
        """Every ticket held for ``model``, oldest first, woken (their waiters resume in
        that order)."""
        queue = self._queues.pop(model, None)
        if not queue:
            return []
        woken = list(queue)
        for ticket in woken:
            ticket.state = "woken"
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(None)
        self._num_held -= len(woken)
        self._num_woken += len(woken)
        return woken

    def refuse(self, model: str, error: BaseException) -> list[Ticket]:
        """Every ticket held for ``model``, oldest first, ended with ``error`` (their
        waiters raise it)."""
        queue = self._queues.pop(model, None)
        if not queue:
            return []
        refused = list(queue)
        for ticket in refused:
            ticket.state = "refused"
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_exception(error)
        self._num_held -= len(refused)
        self._num_refused += len(refused)
        return refused

    def take_expired(self) -> list[Ticket]:
        """Tickets whose deadline has passed, removed (oldest first per model)."""
        now = self._clock()
        expired = [t for queue in self._queues.values() for t in queue if t.deadline <= now]
        for ticket in expired:
            self._remove(ticket, "expired")
        return expired

    def cancel(self, ticket: Ticket) -> bool:
        """Drop a ticket whose client left; False when it was no longer held."""
        return self._remove(ticket, "cancelled")

    def _remove(self, ticket: Ticket, state: str) -> bool:
        queue = self._queues.get(ticket.model)
        if ticket.state != "held" or queue is None:
            return False
        queue.remove(ticket)
        if not queue:
            del self._queues[ticket.model]
        ticket.state = state
        self._num_held -= 1
        if state == "expired":
            self._num_timed_out += 1
        else:
            self._num_cancelled += 1
        return True

    def held_models(self) -> list[str]:
        return list(self._queues)

    def num_held(self, model: str | None = None) -> int:
        if model is None:
            return self._num_held
        queue = self._queues.get(model)
        return len(queue) if queue else 0

    def statistics(self) -> HoldStats:
        return HoldStats(
            held={model: len(queue) for model, queue in self._queues.items()},
            num_held=self._num_held,
            num_admitted=self._num_admitted,
            num_woken=self._num_woken,
            num_timed_out=self._num_timed_out,
            num_cancelled=self._num_cancelled,
            num_full=self._num_full,
            num_refused=self._num_refused,
        )

    # ---- the waiting ------------------------------------------------------------------

    async def hold(self, model: str, *, deadline: float | None = None) -> float:
        """Wait until an engine for ``model`` is up (``wake``); the seconds held; the
        error ``refuse`` gave, raised.
        ``HoldFull`` at once when the queue is full, ``HoldTimedOut`` at the deadline; a
        cancelled waiter (the client left) is dropped from the queue."""
        ticket = self.try_hold(model, deadline=deadline)
        if ticket is None:
            raise HoldFull(
                f"no engine serves {model or 'the model'} yet and {self.max_requests} "
                "requests are already waiting for one; retry later",
                retry_after_s=self.retry_after_s,
            )
        loop = asyncio.get_running_loop()
        ticket.future = loop.create_future()
        remaining = max(0.0, ticket.deadline - self._clock())
        try:
            async with asyncio.timeout(remaining):
                await ticket.future
        except TimeoutError:
            if ticket.state == "woken":  # woken in the same loop turn as the timer
                return self._clock() - ticket.held_at
            self._remove(ticket, "expired")
            raise HoldTimedOut(
                f"no engine serving {model or 'the model'} became ready within "
                f"{self.timeout_s:g} s of holding the request; retry later",
                retry_after_s=self.retry_after_s,
            ) from None
        except asyncio.CancelledError:
            self.cancel(ticket)
            raise
        return self._clock() - ticket.held_at


class WakeGate:
    """At most one autoscaler wake per model per ``interval_s`` (time passed in).

    Remembers only models passed within the last interval once it holds more than
    ``max_models`` (bounded whatever names clients send)."""

    def __init__(self, interval_s: float = 1.0, *, max_models: int = 1024) -> None:
        assert interval_s > 0, f"bad wake interval {interval_s}"
        self.interval_s = interval_s
        self.max_models = max_models
        self._last: dict[str, float] = {}

    def try_pass(self, model: str, now: float) -> bool:
        last = self._last.get(model)
        if last is not None and now - last < self.interval_s:
            return False
        if len(self._last) >= self.max_models:
            self._last = {m: t for m, t in self._last.items() if now - t < self.interval_s}
        self._last[model] = now
        return True
