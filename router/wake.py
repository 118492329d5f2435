"""Asking for an engine while requests are held: the autoscaler (scale from zero, issue
13) and the LoRA manager (an adapter no engine has loaded yet, issue 14).

::

    the proxy holds a request (router/hold.py)   -> waker.notify()
    the waker's one loop                          -> for each model held now, at most once
                                                     per interval_s (WakeGate):
                                                     POST URL/v1/wake {"model": M}
                                                  -> while anything is still held, again
                                                     after interval_s; then it sleeps until
                                                     the next notify()

Invariant: at most one wake per model per ``interval_s`` from this process, and a wake
that fails (refused, timeout, an error status) never reaches a request: it is logged (a
warning when a failure streak starts, debug after) and the request keeps waiting; the next
round may land. The controller answers a wake with zero ready and pending replicas by
scaling to at least one at once (``control/autoscale/server.py``), and ignores it
otherwise, so repeating it while requests wait is harmless and survives an autoscaler
that was not up yet when the first request came.

An autoscaler listening beyond loopback requires a bearer token (its
``--auth-token-file``); the router sends the same file's token
(``--autoscaler-token-file``) as ``Authorization: Bearer TOKEN``.

The LoRA manager (``--lora-url``, ``shoal lora serve``) takes the same ``POST /v1/wake
{"model"}``: 202 when the name is a registered adapter (it loads it on an engine now), 404
when it is not. A waker built with ``on_not_found`` reports that 404 upward (the proxy
then answers the model's held requests 404 at once: router/proxy.py) and remembers it for
``interval_s`` (``was_not_found``), so requests for the name arriving meanwhile are not
held for a second answer; any other status is a failure as above.

``Waker`` is the boundary (STYLE.md 8): ``HttpWaker`` speaks HTTP (``AutoscalerWaker`` is
its old name; the LoRA manager's is ``router.adapters``'), ``NullWaker`` is the router
without a target; tests record wakes with a stand-in receiver.

Rejected: a wake per held request (a burst of 256 requests would be 256 POSTs); a task per
held model (one loop serves every model, and stops when nothing is held).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import aiohttp

from router.hold import WakeGate
from shoal.bodies import read_capped
from shoal.config import read_secret

__all__ = ["AutoscalerWaker", "HttpWaker", "NullWaker", "Waker", "read_token"]

log = logging.getLogger("shoal." + __name__)

WAKE_MAX_BYTES = 64 << 10  # a wake's answer: a short JSON object

_TIMEOUT = aiohttp.ClientTimeout(total=2.0)


def read_token(path: str, flag: str = "--autoscaler-token-file") -> str:
    """The bearer token in ``path``, read as the autoscaler reads its own; ``ConfigError``
    naming ``flag`` when unreadable or empty."""
    return read_secret(path, flag)


class Waker(Protocol):
    def start(self, session: aiohttp.ClientSession) -> None: ...

    def notify(self) -> None:
        """A request started holding: ask for engines of the held models soon."""

    async def close(self) -> None: ...


class NullWaker:
    """No autoscaler to ask (engines appear through discovery alone)."""

    def start(self, session: aiohttp.ClientSession) -> None:
        pass

    def notify(self) -> None:
        pass

    async def close(self) -> None:
        pass


class HttpWaker:
    """``POST URL/v1/wake`` for each held model (module docstring)."""

    def __init__(
        self,
        url: str,
        held_models: Callable[[], Sequence[str]],
        *,
        interval_s: float = 1.0,
        token: str = "",
        clock: Callable[[], float] = time.monotonic,
        what: str = "the autoscaler",
        on_not_found: Callable[[str], None] | None = None,
    ) -> None:
        self.what = what
        self._on_not_found = on_not_found
        self._not_found: dict[str, float] = {}  # model -> when the target answered 404
        self.url = url.rstrip("/") + "/v1/wake"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._held_models = held_models
        self._gate = WakeGate(interval_s)
        self._interval_s = interval_s
        self._clock = clock
        self._needed = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.num_sent = 0
        self.num_failed = 0

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._task = asyncio.create_task(self._run())

    def notify(self) -> None:
        self._needed.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._needed.wait()
            self._needed.clear()
            try:
                now = self._clock()
                due = [m for m in self._held_models() if self._gate.try_pass(m, now)]
                await asyncio.gather(*(self._post(model) for model in due))
            except Exception:  # a bug here must not end the loop: held requests need it
                self.num_failed += 1
                log.exception("waking %s at %s failed; retrying", self.what, self.url)
            if self._held_models():
                await asyncio.sleep(self._interval_s)
                self._needed.set()

    async def _post(self, model: str) -> None:
        assert self._session is not None, "wakes are sent between start() and close()"
        try:
            async with self._session.post(self.url, json={"model": model},
                                          headers=self._headers,
                                          timeout=_TIMEOUT) as reply:  # fmt: skip
                status = reply.status
                body = await read_capped(reply, WAKE_MAX_BYTES)
                problem = None if status < 300 else f"answered {status}"
                if body is None:  # a wake's answer is a short JSON object
                    problem = f"answered {status} with a body over {WAKE_MAX_BYTES} bytes"
                    status = 0
        except (aiohttp.ClientError, TimeoutError) as exc:
            status, problem = 0, repr(exc)
        if status == 404 and self._on_not_found is not None:
            self.num_sent += 1
            self._remember_not_found(model)
            log.info("%s does not know %s (404): its held requests are answered 404",
                     self.what, model)  # fmt: skip
            self._on_not_found(model)
            return
        if problem is None:
            self.num_sent += 1
            self._not_found.pop(model, None)
            if self._failing:
                log.info("%s at %s answers again", self.what, self.url)
            self._failing = False
            log.debug("asked %s for an engine of %s", self.url, model or "any model")
            return
        self.num_failed += 1
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "cannot ask %s for an engine of %s: POST %s %s",
                self.what, model or "any model", self.url, problem)  # fmt: skip
        self._failing = True

    def _remember_not_found(self, model: str) -> None:
        now = self._clock()
        if len(self._not_found) >= self._gate.max_models:  # bounded, whatever clients send
            self._not_found = {
                m: t for m, t in self._not_found.items() if now - t < self._interval_s
            }
        self._not_found[model] = now

    def was_not_found(self, model: str) -> bool:
        """The target answered 404 for ``model`` within the last ``interval_s``."""
        at = self._not_found.get(model)
        return at is not None and self._clock() - at < self._interval_s


AutoscalerWaker = HttpWaker  # its name before the LoRA manager was a second target
