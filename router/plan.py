"""Polling the placement planner's plan for the ``slo`` strategy (issue 14).

::

    every interval_s:  GET URL/v1/plan  (Authorization: Bearer TOKEN with a token file)
        200, a usable plan      -> current() answers it until 3 intervals pass without
                                   another success
        404 (no plan yet), any other status, a refused or timed-out connection, a
        malformed plan (BadPlan), an answer over 1 MiB, more than 64 ticks or GPU
        types  -> current() answers None at once

Invariant: ``current()`` is a plan fetched successfully within the last ``3 x
interval_s`` seconds (by the injected monotonic clock) by the latest poll, or None. A
router whose planner is down, slow or confused routes as if it had no planner
(``slo`` without a plan), never on a plan it cannot confirm. Failures are logged once per
streak (a warning when it starts, debug while it lasts, info when a plan arrives again).

Staleness is measured from the router's own fetch, not from the plan's ``created``: the
planner re-plans on its own interval, which the router does not know, and the two clocks
are different machines'. (A planner that keeps serving an old plan is trusted: it is the
planner's to refresh.)

``PlanSource`` is the boundary (STYLE.md 8): ``PlanPoller`` speaks HTTP, ``NullPlanSource``
is the router without ``--placement-url``; strategies only see ``current``
(``StrategyDeps.placement``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp

from router.errors import BadPlan
from router.strategies.placement import plan_from_json
from router.types import PlacementPlan
from shoal.bodies import read_capped

__all__ = ["STALE_INTERVALS", "NullPlanSource", "PlanPoller", "PlanSource"]

log = logging.getLogger("shoal." + __name__)

STALE_INTERVALS = 3
MAX_PLAN_BYTES = 1 << 20  # a 12x12 plan of 4 types is ~10 KiB; more is not a plan


class PlanSource(Protocol):
    def current(self) -> PlacementPlan | None: ...

    def status(self) -> dict[str, Any] | None:
        """What ``GET /router/engines`` shows under ``placement`` (None: no planner)."""

    def start(self, session: aiohttp.ClientSession) -> None: ...

    async def close(self) -> None: ...


class NullPlanSource:
    """No planner: no plan, ever."""

    def current(self) -> PlacementPlan | None:
        return None

    def status(self) -> dict[str, Any] | None:
        return None

    def start(self, session: aiohttp.ClientSession) -> None:
        pass

    async def close(self) -> None:
        pass


class PlanPoller:
    """``GET URL/v1/plan`` every ``interval_s`` (module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        token: str = "",
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert interval_s > 0, f"bad plan interval {interval_s}"
        self.url = url.rstrip("/") + "/v1/plan"
        self.interval_s = interval_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=min(2.0, STALE_INTERVALS * interval_s))
        self._clock = clock
        self._plan: PlacementPlan | None = None
        self._fetched_at = 0.0
        self._failing = False
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.num_polls = 0
        self.num_failures = 0

    # ---- the logic (no waiting) -------------------------------------------------------

    def current(self) -> PlacementPlan | None:
        if self._plan is None:
            return None
        if self._clock() - self._fetched_at > STALE_INTERVALS * self.interval_s:
            return None
        return self._plan

    def status(self) -> dict[str, Any] | None:
        plan = self.current()
        return {
            "url": self.url,
            "plan": plan is not None,
            "model": None if plan is None else plan.model or None,
            "gpu_types": [] if plan is None else sorted(plan.shares),
            "age_s": None if plan is None else round(self._clock() - self._fetched_at, 3),
            "num_polls": self.num_polls,
            "num_failures": self.num_failures,
        }

    def accept(self, document: object) -> PlacementPlan:
        """A fetched plan document becomes the current plan (``BadPlan`` when unusable:
        then there is none)."""
        try:
            plan = plan_from_json(document)
        except BadPlan:
            self._plan = None
            raise
        self._plan, self._fetched_at = plan, self._clock()
        if self._failing:
            log.info("placement plan from %s available again", self.url)
        self._failing = False
        return plan

    def fail(self, problem: str, *, level: int = logging.WARNING) -> None:
        """A poll that brought no plan: none until the next success."""
        self._plan = None
        self.num_failures += 1
        log.log(
            logging.DEBUG if self._failing else level,
            "no placement plan from %s: %s; routing without one",
            self.url,
            problem,
        )
        self._failing = True

    # ---- the polling ------------------------------------------------------------------

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval_s)

    async def poll_once(self) -> None:
        assert self._session is not None, "polls run between start() and close()"
        self.num_polls += 1
        try:
            async with self._session.get(
                self.url, headers=self._headers, timeout=self._timeout
            ) as reply:
                if reply.status == 404:
                    self.fail("it has no plan yet (404)", level=logging.INFO)
                    return
                body = await read_capped(reply, MAX_PLAN_BYTES)
                if reply.status != 200:
                    text = (body or b"")[:200].decode(errors="replace")
                    self.fail(f"answered {reply.status} {text}")
                    return
                if body is None:
                    self.fail(f"the plan is over {MAX_PLAN_BYTES} bytes")
                    return
                document = json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.fail(repr(exc))
            return
        try:
            self.accept(document)
        except BadPlan as exc:
            self.fail(str(exc))
