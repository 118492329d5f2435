"""Adapters' traffic: requests/s per model name from the router's arrivals counter.

The router counts every request whose body it parsed in ``shoal_router_arrivals_total
{model}``, held requests included (a request for an adapter no engine holds yet counts
too, which is what placement needs). ``RouterTraffic.rates()`` scrapes ``<router>/metrics``
and answers each model's counter delta over the time since the previous scrape.

Invariant (as ``control.autoscale.scrape``): a failed scrape, a first scrape, or a counter
that went down (the router restarted) gives no rate for that model, never a negative or a
huge one; the manager then sees the adapter's last-used time only, so a router outage does
not unload every adapter at once (``--idle-unload-s`` is long against a scrape).

``parse_arrivals`` is pure; ``RouterTraffic`` does the I/O with an injected clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["RouterTraffic", "parse_arrivals", "rates_between"]

log = logging.getLogger("shoal." + __name__)

ARRIVALS = "shoal_router_arrivals_total"


def parse_arrivals(text: str) -> dict[str, float]:
    """``shoal_router_arrivals_total`` per ``model`` label; ``ValueError`` on bad text."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ARRIVALS and math.isfinite(sample.value):
                model = sample.labels.get("model", "")
                counts[model] = counts.get(model, 0.0) + float(sample.value)
    return counts


def rates_between(
    previous: dict[str, float], current: dict[str, float], elapsed_s: float
) -> dict[str, float]:
    """Per-model rates; a model missing before, or whose counter went down, has none."""
    if elapsed_s <= 0:
        return {}
    return {
        model: (count - previous[model]) / elapsed_s
        for model, count in current.items()
        if model in previous and count >= previous[model]
    }


class RouterTraffic:
    def __init__(
        self,
        router_url: str,
        *,
        timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.timeout_s = timeout_s
        self._clock = clock
        self._previous: tuple[float, dict[str, float]] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.num_failures = 0

    async def rates(self) -> dict[str, float]:
        """Requests/s per model since the last call; empty without a router or on failure."""
        if not self.router_url:
            return {}
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._session.get(self.router_url + "/metrics") as reply:
                    if reply.status != 200:
                        raise ValueError(f"HTTP {reply.status}")
                    text = (await reply.read()).decode("utf-8", errors="replace")
            current = parse_arrivals(text)
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            self.num_failures += 1
            log.warning("router scrape %s/metrics failed: %s", self.router_url, exc or "timeout")
            return {}
        now = self._clock()
        previous, self._previous = self._previous, (now, current)
        if previous is None:
            return {}
        return rates_between(previous[1], current, now - previous[0])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
