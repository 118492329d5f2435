"""Adapters' traffic: requests/s per model name from the router's arrivals counter,
smoothed over a sliding window.

The router counts every request whose body it parsed in ``shoal_router_arrivals_total
{model}``, held requests included (a request for an adapter no engine holds yet counts
too, which is what placement needs). ``RouterTraffic.rates()`` scrapes ``<router>/metrics``,
adds the counters to a ``RateWindow`` and answers each model's rate over the window.

Why a window (issue 14, bench/lora.py): rates over one 5 s round are noise for adapters of
a few requests/s (a 0.5 req/s adapter shows 0, 0.2 or 0.4), and placement and wake eviction
both rank adapters by them; rates over 60 s gave +3 points of hit ratio and 28% fewer loads
under a Zipf popularity. A *sliding window of counter samples* was chosen over an EWMA: it
is the plain average over the last ``window_s`` (exact, easy to check against the router's
own counter), and an adapter's rate reaches exactly 0 once ``window_s`` has passed without
a request, where an EWMA decays forever and would need a threshold for "no traffic".
The price: a surge shows in full only after ``window_s`` (a new adapter's first copy comes
from the router's wake anyway, not from its rate). Memory: one sample per scrape kept
for ``window_s``.

Invariants of ``RateWindow`` (as ``control.autoscale.scrape``): a name is rated from the
newest sample at least ``window_s`` old (the oldest when the history is shorter) to the
newest, so a window shorter than the scrape interval means "since the previous scrape";
a name missing from a sample counts 0 there (a labelled counter appears with its first
request; the manager's wake counts start at 0); a counter that went down (the router
restarted) is rated from the first sample after the reset, and gets no rate when that is
the newest: never a negative or a huge rate. A failed scrape adds no sample: ``RouterTraffic``
then answers the rates of the samples it has (stale by at most one window, after which
they age out to none), so a router outage neither unloads every adapter at once nor
freezes old rates for ever.

The router labels at most its first 64 model names that no engine serves (``router/
metrics.py`` ``ModelLabels``, never freed); past those, arrivals for a never-loaded
adapter count as ``other`` and give it no rate here. Its wakes still count (the manager
adds them, ``manager.py``), so a new adapter gets its first copy from its wake either way
(issue 14 review, finding 8; the cap is the router's, kept to bound its label set).

The scrape is read whole and refused past ``MAX_METRICS_BYTES``
(``shoal.bodies.read_capped``).

``parse_arrivals`` and ``RateWindow`` are pure; ``RouterTraffic`` does
the I/O with an injected clock.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from control.lora.engines import read_body
from control.lora.errors import AnswerTooLarge

__all__ = ["RateWindow", "RouterTraffic", "parse_arrivals"]

log = logging.getLogger("shoal." + __name__)

ARRIVALS = "shoal_router_arrivals_total"
MAX_METRICS_BYTES = 16 << 20  # a router's /metrics; read whole, refused past this


def parse_arrivals(text: str) -> dict[str, float]:
    """``shoal_router_arrivals_total`` per ``model`` label; ``ValueError`` on bad text."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == ARRIVALS and math.isfinite(sample.value):
                model = sample.labels.get("model", "")
                counts[model] = counts.get(model, 0.0) + float(sample.value)
    return counts


class RateWindow:
    """Per-name rates over the last ``window_s`` from samples of cumulative counters.

    ``add(now_s, totals)`` records a sample (counters since some start, per name);
    ``rates()`` answers requests/s per name over the window (module docstring)."""

    def __init__(self, window_s: float) -> None:
        assert window_s > 0, "window_s must be > 0"
        self.window_s = window_s
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def add(self, now_s: float, totals: Mapping[str, float]) -> None:
        if self._samples and now_s <= self._samples[-1][0]:
            self._samples[-1] = (self._samples[-1][0], dict(totals))  # same instant: newest
        else:
            self._samples.append((now_s, dict(totals)))
        # keep the newest sample at least window_s old (the baseline) and all newer ones
        while len(self._samples) >= 2 and self._samples[1][0] <= now_s - self.window_s:
            self._samples.popleft()

    def rates(self, now_s: float | None = None) -> dict[str, float]:
        """Requests/s per name; none at all when ``now_s`` is given and the newest sample
        is older than the window (samples stopped coming: stale rates age out)."""
        if len(self._samples) < 2:
            return {}
        if now_s is not None and now_s - self._samples[-1][0] > self.window_s:
            return {}
        end_s, end = self._samples[-1]
        out: dict[str, float] = {}
        for name, count in end.items():  # a name missing from the newest: none
            start_s, start = self._samples[0][0], 0.0  # (time, count) after the last reset
            previous = 0.0
            for t, totals in self._samples:
                value = totals.get(name, 0.0)
                if t == self._samples[0][0] or value < previous:
                    start_s, start = t, value  # the baseline, or the counter reset here
                previous = value
            if end_s > start_s:
                out[name] = (count - start) / (end_s - start_s)
        return out


class RouterTraffic:
    def __init__(
        self,
        router_url: str,
        *,
        timeout_s: float = 2.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.router_url = router_url.rstrip("/")
        self.timeout_s = timeout_s
        self._clock = clock
        self.window = RateWindow(window_s)
        self._session: aiohttp.ClientSession | None = None
        self.num_failures = 0

    async def rates(self) -> dict[str, float]:
        """Requests/s per model over the window; empty without a router or a second sample."""
        if not self.router_url:
            return {}
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._session.get(self.router_url + "/metrics") as reply:
                    if reply.status != 200:
                        raise ValueError(f"HTTP {reply.status}")
                    body = await read_body(reply, MAX_METRICS_BYTES, self.router_url + "/metrics")
            current = parse_arrivals(body.decode("utf-8", errors="replace"))
        except (TimeoutError, aiohttp.ClientError, ValueError, AnswerTooLarge) as exc:
            self.num_failures += 1
            log.warning("router scrape %s/metrics failed: %s", self.router_url, exc or "timeout")
            return self.window.rates(self._clock())
        self.window.add(self._clock(), current)
        return self.window.rates()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
