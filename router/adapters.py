"""LoRA adapters loaded on demand (``--lora-url``, issue 14).

::

    a request for M; healthy engines answer, none lists M (the pipeline's ModelNotFound)
      -> held (router/hold.py: same queue, same bounds as scale from zero)
      -> POST LORA_URL/v1/wake {"model": M}, at most once a second per model (HttpWaker)
           202: the manager loads M on an engine     -> keep holding
           404: M is no registered adapter            -> M's held requests: 404 at once,
                                                         and new ones for a second after
           anything else / no answer: logged         -> keep holding (until the deadline)
      -> while anything is held: every poll_s (0.5 s) re-poll healthy engines'
         /v1/models; a model an allowed engine now lists wakes its requests, which are
         routed normally (lora-affinity or any strategy sees the engine list it)

Invariant: a request is held for an adapter only while the fleet answers (some allowed
engine has a known model list) and the manager has not said 404 for its model within the
last second; a 404 ends every request held for that model, at once, with the router's
usual model-not-found answer. The manager is asked only while the fleet answers: with no
engine up the request waits as scale from zero does (router/proxy.py), and a 404 then
would only say "not an adapter" of what may be a base model an autoscaler is bringing up.

Choices: re-polling models at 0.5 s only while something is held (the pool's own poll is
every ``--models-interval-s``, 10 s: too slow for a request waiting on a load, too costly to
run that fast always); one loop for all held models, like the waker (a burst of requests
for one adapter is one poll per engine per round).

Rejected: loading the adapter from the router itself (``/v1/load_lora_adapter`` on an
engine it picks): placement within ``max_loras`` budgets, eviction and reload on restart
are the manager's (control/lora), and two writers of an engine's adapters would fight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from router.engines import EnginePool
from router.errors import ModelNotFound
from router.hold import HoldQueue
from router.wake import HttpWaker

__all__ = ["POLL_S", "OnDemandAdapters"]

log = logging.getLogger("shoal." + __name__)

POLL_S = 0.5


class OnDemandAdapters:
    """Asks the LoRA manager for held models and wakes them once an engine lists them."""

    def __init__(
        self,
        pool: EnginePool,
        hold: HoldQueue,
        url: str,
        *,
        token: str = "",
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._hold = hold
        self.poll_s = poll_s
        self.waker = HttpWaker(url, self._models_to_ask, token=token, clock=clock,
                               what="the LoRA manager", on_not_found=self._not_found)  # fmt: skip
        self._needed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- the logic (no waiting) -------------------------------------------------------

    def fleet_answers(self) -> bool:
        """Some allowed engine has told its models: a model missing from every list is
        missing, not unknown yet."""
        return any(
            self._pool.allows(view.engine_id) and view.models for view in self._pool.views({})
        )

    def may_hold(self, model: str) -> bool:
        """Whether a request the fleet does not serve waits for the manager to load it."""
        return not self.waker.was_not_found(model)

    def listed(self, model: str) -> bool:
        return any(
            self._pool.allows(view.engine_id) and model in view.models
            for view in self._pool.views({})
        )

    def wake_listed(self) -> list[str]:
        """Wake every held model an allowed engine now lists; those models."""
        woken = [model for model in self._hold.held_models() if model and self.listed(model)]
        for model in woken:
            tickets = self._hold.wake(model)
            log.info("%s is loaded: %d held request(s) go on", model, len(tickets))
        return woken

    def _models_to_ask(self) -> list[str]:
        return self._hold.held_models() if self.fleet_answers() else []

    def _not_found(self, model: str) -> None:
        if self.fleet_answers():
            self._hold.refuse(model, ModelNotFound(model))

    # ---- the waiting ------------------------------------------------------------------

    def held(self) -> None:
        """A request started holding for an adapter: ask the manager, watch the engines."""
        self.waker.notify()
        self._needed.set()

    def start(self, session: aiohttp.ClientSession) -> None:
        self.waker.start(session)
        self._task = asyncio.create_task(self._watch())

    async def close(self) -> None:
        await self.waker.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await self._needed.wait()
            self._needed.clear()
            while self._hold.num_held():
                await asyncio.sleep(self.poll_s)
                ids = [e for e in self._pool.engine_ids if self._pool.is_healthy(e)]
                try:
                    await asyncio.gather(*(self._pool.poll_models(e) for e in ids))
                except (aiohttp.ClientError, OSError, ValueError, TimeoutError) as exc:
                    # each poll handles its engine's errors; this keeps the watch alive
                    log.warning("re-polling engines' models failed: %r", exc)
                self.wake_listed()
