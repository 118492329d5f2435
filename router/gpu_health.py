"""Polling the GPU health watchers for the engine pool (issue 15, ``--gpu-health``).

::

    every interval_s, for each watcher URL (in parallel):
        GET URL/v1/gpus  (Authorization: Bearer TOKEN with --gpu-health-token-file)
        200, a NodeHealth document (control.health.types.NodeHealth.from_json)
                                   -> that watcher's report is replaced       result "ok"
        refused, reset, timed out  -> the last good report stays          "unreachable"
        any other status (503 before the watcher's first check)
                                   -> the last good report stays           "bad_status"
        not JSON, not a NodeHealth (wrong types, nested too deep), over 1 MiB
                                   -> the last good report stays            "malformed"
        a NodeHealth whose ``time`` is older than the stale limit plus CLOCK_SKEW_S
        (wall clock: the watcher's loop itself is stuck)
                                   -> the last good report stays                "stale"
    then: a report not confirmed for 3 intervals is forgotten (logged); the union of the
    remaining reports' unhealthy GPUs is handed to ``on_change`` when it changed.

A ``dns+http://NAME:PORT`` item (the watchers' headless Service on Kubernetes) stands for
every address NAME resolves to, re-resolved before each round
(``control.health.targets.WatcherTargets``: the loop's resolver thread, the last good
answer kept when DNS fails); each address is a watcher of its own. One that leaves the
answer is no longer polled and its report is forgotten like any watcher unreadable for 3
intervals; once forgotten, it is dropped from ``status()`` too.

Invariant: ``unhealthy_gpus()`` is the union of ``NodeHealth.unhealthy_gpus()`` (``NODE/
gpuI`` names: a GPU with a critical problem, or every GPU of a node with a critical
node-level problem) over the reports each watcher answered successfully within the last
``STALE_INTERVALS x interval_s`` seconds (by the injected monotonic clock). Unknown is
not sick: a watcher that dies, hangs or talks nonsense keeps its last good report for
three intervals (a blip changes nothing) and is then forgotten, so its engines are
routable again; a dead watcher never takes engines out. The router's own ``/health``
checks and circuit breakers remain whatever the watchers say.

A critical node-level problem (NVML lost, fewer GPUs than expected) makes every GPU the
report lists unhealthy; ``shoal health watch`` lists the GPUs it last saw (or
``0..expect_gpus-1``) when NVML is lost, so those engines go out. A report that lists no
GPUs at all names none: the engines' own health checks then say whether they serve.

A watcher whose *check* hangs (NVML blocked on a GPU falling off the bus) does not
serve its last healthy report as fresh: after max(3 intervals, 30 s) it serves a
critical ``check_hung`` report naming the GPUs it last saw (control/health/watch.py), so
those engines go out. The ``time`` rule above is for a watcher that serves nothing new at
all: its answers stop counting, and after three intervals it is forgotten like a silent
one (unknown is not sick). The watcher's hung deadline is shorter than the stale limit
plus the skew allowance, so a hung check is reported before its report would go stale.

One answer can never end the polling: every parse failure is ``malformed``, and a round
that raises anyway is logged with its traceback, counted (``error``) and the loop goes on.

Failures are logged once per streak and watcher (a warning when it starts, debug while it
lasts, info when the watcher answers again); every poll is counted by result
(``on_poll``: ``shoal_router_gpu_health_polls_total{result}``).

Rejected: using ``control.health.client.HealthFeed`` (the router keeps its HTTP in its own
session and its own counters; it shares the wire format, ``control.health.types``, which
is pure); forgetting a watcher at its first failed poll (one lost packet would put a sick
GPU back into service for an interval); keeping a report forever (a watcher removed from
a node would pin its engines out of service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import aiohttp

from control.health.targets import Resolve, WatcherTargets, getaddrinfo_addresses
from control.health.types import NodeHealth, parse_report
from shoal.bodies import read_capped

__all__ = ["MAX_HEALTH_BYTES", "POLL_RESULTS", "STALE_INTERVALS", "GpuHealthPoller"]

log = logging.getLogger("shoal." + __name__)

STALE_INTERVALS = 3
MAX_HEALTH_BYTES = 1 << 20  # 1024 GPUs with a few problems each is ~300 KiB
POLL_RESULTS = ("ok", "unreachable", "bad_status", "malformed", "stale", "error")
CLOCK_SKEW_S = 30.0  # how far a watcher's wall clock may lag ours before its reports are old


class _Watcher:
    """One watcher's last good report and its failure streak."""

    __slots__ = ("failing", "ok_at", "report", "url")

    def __init__(self, url: str) -> None:
        self.url = url
        self.report: NodeHealth | None = None
        self.ok_at = 0.0
        self.failing = False


class GpuHealthPoller:
    """``GET URL/v1/gpus`` of every watcher every ``interval_s`` (module docstring)."""

    def __init__(
        self,
        urls: Iterable[str],
        *,
        token: str = "",
        interval_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_change: Callable[[frozenset[str]], None] | None = None,
        on_poll: Callable[[str], None] | None = None,
        resolve: Resolve = getaddrinfo_addresses,
    ) -> None:
        assert interval_s > 0, f"bad GPU health interval {interval_s}"
        # dns+http:// names resolved each round; settings checked every URL (ValueError here
        # is a bug)
        self._targets = WatcherTargets(urls, resolve=resolve, timeout_s=min(2.0, interval_s))
        self._watchers = {url: _Watcher(url) for url in self._targets.current_nowait()}
        assert self._watchers or self._targets.resolves, "GpuHealthPoller needs a watcher URL"
        self.interval_s = interval_s
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=min(2.0, interval_s))
        self._clock = clock
        self._wall = wall
        self.on_change = on_change
        self._on_poll = on_poll
        self._unhealthy: frozenset[str] = frozenset()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self.num_polls = 0

    @property
    def urls(self) -> list[str]:
        return list(self._watchers)

    # ---- the logic (no waiting) -------------------------------------------------------

    def accept(self, url: str, body: bytes) -> NodeHealth | None:
        """A watcher's 200 body: its new report, or (``malformed``) None and the last good
        report stays."""
        watcher = self._watchers[url]
        try:
            report = parse_report(body)
        except ValueError as exc:  # JSON, UTF-8, nesting, shape and types: all ValueError
            self.fail(url, "malformed", f"not a NodeHealth document: {exc}")
            return None
        age = self._wall() - report.time
        if age > STALE_INTERVALS * self.interval_s + CLOCK_SKEW_S:
            self.fail(url, "stale", f"its report is {age:.0f} s old (checked at {report.time})")
            return None
        self._count("ok")
        if watcher.failing or watcher.report is None:
            log.info("GPU health watcher %s answers: node %s, %d GPU(s), unhealthy: %s",
                     url, report.node, len(report.gpus),
                     ", ".join(sorted(report.unhealthy_gpus())) or "none")  # fmt: skip
        watcher.report, watcher.ok_at, watcher.failing = report, self._clock(), False
        return report

    def fail(self, url: str, result: str, problem: str) -> None:
        """A poll of ``url`` that brought no report (``result`` one of ``POLL_RESULTS``)."""
        watcher = self._watchers[url]
        self._count(result)
        level = logging.DEBUG if watcher.failing else logging.WARNING
        kept = "keeping its last report" if watcher.report is not None else "no report yet"
        log.log(level, "GPU health watcher %s: %s; %s", url, problem, kept)
        watcher.failing = True

    def _count(self, result: str) -> None:
        if self._on_poll is not None:
            self._on_poll(result)

    def expire(self) -> None:
        """Forget reports not confirmed for ``STALE_INTERVALS`` intervals."""
        now = self._clock()
        for watcher in self._watchers.values():
            if watcher.report is None:
                continue
            if now - watcher.ok_at > STALE_INTERVALS * self.interval_s:
                log.warning("GPU health watcher %s unreadable for %.1f s: forgetting node %s "
                            "(its GPUs count as healthy: unknown is not sick)", watcher.url,
                            now - watcher.ok_at, watcher.report.node)  # fmt: skip
                watcher.report = None

    def reports(self) -> dict[str, NodeHealth]:
        """Each watcher's current report (stale ones are left out)."""
        now = self._clock()
        return {
            url: w.report
            for url, w in self._watchers.items()
            if w.report is not None and now - w.ok_at <= STALE_INTERVALS * self.interval_s
        }

    def unhealthy_gpus(self) -> frozenset[str]:
        names: set[str] = set()
        for report in self.reports().values():
            names |= report.unhealthy_gpus()
        return frozenset(names)

    def settle(self) -> frozenset[str]:
        """After a round: expire, recompute, tell ``on_change`` when the set changed."""
        self.expire()
        unhealthy = self.unhealthy_gpus()
        if unhealthy != self._unhealthy:
            self._unhealthy = unhealthy
            if self.on_change is not None:
                self.on_change(unhealthy)
        return unhealthy

    def status(self) -> list[dict[str, Any]]:
        """One row per watcher (for logs and status views)."""
        now = self._clock()
        current: Mapping[str, NodeHealth] = self.reports()
        return [
            {
                "url": url,
                "node": current[url].node if url in current else None,
                "age_s": round(now - w.ok_at, 3) if url in current else None,
                "failing": w.failing,
                "unhealthy_gpus": sorted(current[url].unhealthy_gpus()) if url in current else [],
            }
            for url, w in self._watchers.items()
        ]

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
            try:
                await self.poll_once()
            except Exception:  # a bug in one round must not end GPU health for good
                log.exception("GPU health poll failed; polling goes on")
                self._count("error")
            await asyncio.sleep(self.interval_s)

    async def poll_once(self) -> frozenset[str]:
        """Resolve the ``dns+`` names, read every watcher once, then ``settle``; the
        unhealthy set."""
        self.num_polls += 1
        urls = await self._targets.current()
        for url in urls:
            self._watchers.setdefault(url, _Watcher(url))
        await asyncio.gather(*(self._fetch(url) for url in urls))
        unhealthy = self.settle()
        for url in [u for u, w in self._watchers.items() if u not in urls and w.report is None]:
            del self._watchers[url]  # left DNS, and its report is forgotten: no trace left
        return unhealthy

    async def _fetch(self, url: str) -> None:
        assert self._session is not None, "polls run between start() and close()"
        try:
            async with self._session.get(
                url + "/v1/gpus", headers=self._headers, timeout=self._timeout
            ) as reply:
                body = await read_capped(reply, MAX_HEALTH_BYTES)
                if reply.status != 200:
                    text = (body or b"")[:200].decode(errors="replace")
                    self.fail(url, "bad_status", f"answered {reply.status} {text}")
                    return
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.fail(url, "unreachable", repr(exc))
            return
        if body is None:
            self.fail(url, "malformed", f"the answer is over {MAX_HEALTH_BYTES} bytes")
            return
        self.accept(url, body)
