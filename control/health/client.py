"""HealthFeed: the latest ``/v1/gpus`` of several watchers, for the Ray fleet.

::

    feed = HealthFeed(["http://node-a:8094", "http://node-b:8094"], token=T)
    await feed.poll()             every watcher at once, each with a deadline
    feed.unhealthy_gpus()         {"node-a/gpu3", ...}: GPUs to stop using
    feed.reports()                {url: NodeHealth} of the watchers known now
    await feed.close()

Invariant: ``reports()`` holds, per URL, the last answer that parsed whole (bounded body,
``NodeHealth.from_json``), and only while it is younger than ``stale_after_s`` (default
three intervals, by the injected monotonic clock). A failed read (refused, timeout, non-200,
over the cap, malformed JSON or document, wrong-typed fields, JSON nested too deep, or a
report whose own ``time`` is older than ``stale_after_s`` + ``CLOCK_SKEW_S`` by the wall
clock: the watcher's loop is stuck) keeps the last good answer until then, and after
that the watcher is forgotten: its GPUs are *unknown*, and unknown is not sick. A watcher
that dies must not take its node's engines out of service with it: the router and the
fleet have their own liveness checks for engines and nodes; this feed only adds "the
hardware says this GPU is bad".

A watcher whose *check* hangs (NVML blocked) keeps answering with fresh reports that say
so: a node-level critical ``check_hung`` over the GPUs it last saw (control/health/
watch.py), so those GPUs are sick, not unknown. The ``time`` rule is for a watcher that
serves nothing new at all; its hung deadline, max(3 intervals, 30 s), is shorter than
``stale_after_s`` + ``CLOCK_SKEW_S``, so the hung report arrives first.

Rejected: treating a silent watcher's GPUs as unhealthy (one crashed DaemonSet pod, or a
watcher rollout, would empty the fleet), and keeping the last answer for ever (a GPU that
was replaced and whose watcher moved would stay blocked).

A URL is the watcher's base (``http://host:8094``) or its ``/v1/gpus`` itself, or
``dns+http://NAME:PORT``: every address NAME resolves to, re-resolved at each poll
(``targets.py``; the watchers' headless Service on Kubernetes). An address that leaves the
answer is no longer read, and its report goes as a silent watcher's does (above). With a
token, requests carry ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from control.health.targets import Resolve, WatcherTargets, getaddrinfo_addresses
from control.health.types import NodeHealth, parse_report
from shoal.bodies import read_capped

__all__ = ["MAX_REPORT_BYTES", "FeedStatistics", "HealthFeed"]

log = logging.getLogger("shoal." + __name__)

CLOCK_SKEW_S = 30.0  # how far a watcher's wall clock may lag ours before its reports are old
MAX_REPORT_BYTES = 4 << 20  # 1024 GPUs with a dozen problems each fit many times over


@dataclass(frozen=True, slots=True)
class FeedStatistics:
    polls: int
    failures: int  # reads that failed, every URL together
    known: int  # watchers whose answer is fresh now


@dataclass(slots=True)
class _Entry:
    report: NodeHealth
    at: float  # monotonic time of the answer


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1/gpus") else url + "/v1/gpus"


class HealthFeed:
    def __init__(
        self,
        urls: Sequence[str],
        *,
        token: str | None = None,
        interval_s: float = 5.0,
        stale_after_s: float | None = None,
        timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        resolve: Resolve = getaddrinfo_addresses,
    ) -> None:
        assert interval_s > 0, "a positive poll interval"
        self.urls = tuple(dict.fromkeys(u.strip().rstrip("/") for u in urls if u.strip()))
        self._targets = WatcherTargets(self.urls, resolve=resolve,
                                       timeout_s=min(interval_s, 2.0))  # fmt: skip
        self.interval_s = interval_s
        self.stale_after_s = 3 * interval_s if stale_after_s is None else stale_after_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s or min(interval_s, 10.0))
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._clock = clock
        self._wall = wall
        self._entries: dict[str, _Entry] = {}
        self._session: aiohttp.ClientSession | None = None
        self._polls = 0
        self._failures = 0

    async def poll(self) -> None:
        """Read every watcher once, concurrently; never raises for a watcher's answer."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        self._polls += 1
        urls = await self._targets.current()  # dns+http:// names resolved now
        await asyncio.gather(*(self._poll_one(url) for url in urls))
        self._forget_stale()

    async def _poll_one(self, url: str) -> None:
        try:
            report = await self._read(url)
        except Exception:  # a bug in reading one watcher must not end the feed's poll
            log.exception("health watcher %s: reading its answer failed", url)
            report = None
        if report is None:
            self._failures += 1
            return
        self._entries[url] = _Entry(report, self._clock())

    async def _read(self, url: str) -> NodeHealth | None:
        assert self._session is not None
        try:
            async with self._session.get(_endpoint(url)) as reply:
                if reply.status != 200:
                    log.debug("health watcher %s answered %d", url, reply.status)
                    return None
                body = await read_capped(reply, MAX_REPORT_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("health watcher %s unreachable: %s", url, exc)
            return None
        if body is None:
            log.warning("health watcher %s: answer over %d bytes", url, MAX_REPORT_BYTES)
            return None
        try:
            report = parse_report(body)
        except ValueError as exc:  # JSON, UTF-8, nesting, shape and types: all ValueError
            log.warning("health watcher %s: malformed answer: %s", url, exc)
            return None
        age = self._wall() - report.time
        if age > self.stale_after_s + CLOCK_SKEW_S:
            log.warning("health watcher %s: its report is %.0f s old: not fresh", url, age)
            return None
        return report

    def _forget_stale(self) -> None:
        now = self._clock()
        for url in [u for u, e in self._entries.items() if now - e.at > self.stale_after_s]:
            silent = now - self._entries[url].at
            log.info("health watcher %s silent for %.0f s: its GPUs are unknown", url, silent)
            del self._entries[url]

    def reports(self) -> dict[str, NodeHealth]:
        """The fresh answers, by watcher URL."""
        self._forget_stale()
        return {url: e.report for url, e in self._entries.items()}

    def unhealthy_gpus(self) -> frozenset[str]:
        """``NODE/gpuI`` of every GPU a fresh answer calls unhealthy."""
        sick: set[str] = set()
        for report in self.reports().values():
            sick |= report.unhealthy_gpus()
        return frozenset(sick)

    def statistics(self) -> FeedStatistics:
        return FeedStatistics(self._polls, self._failures, len(self.reports()))

    async def run(self, stop: asyncio.Event) -> None:
        """``poll()`` every ``interval_s`` until ``stop``; a round that fails is logged and
        the loop goes on (one answer must never end the feed)."""
        while not stop.is_set():
            try:
                await self.poll()
            except Exception:
                log.exception("GPU health feed poll failed; polling goes on")
                self._failures += 1
            try:
                async with asyncio.timeout(self.interval_s):
                    await stop.wait()
            except TimeoutError:
                continue

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
