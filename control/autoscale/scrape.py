"""Engines' and the router's ``/metrics``, scraped concurrently, as canonical metric values.

Invariant: *a scrape that failed is unknown, never zero*. An engine that refused the
connection, timed out (``scrape_timeout_s``), answered non-200, sent more than
``max_body_bytes`` or text that does not parse gives ``ReplicaSample(ok=False)``; a metric
the engine did not export is absent from ``values``. A hung replica therefore never looks
idle (AIBrix's KPA reads a failed scrape as 0 and scales down under load).

Two layers:

* pure: ``parse_engine``/``parse_router`` turn exposition text into a ``Reading``
  (gauges, counters and histogram sum/count, summed over labels such as ``model_name`` and
  ``engine``); ``engine_values``/``router_values`` turn two consecutive readings of one
  source into canonical values. Rates are counter deltas over the time between the two
  scrapes; a counter that went down (the engine restarted) or a first scrape gives no rate
  (unknown) rather than a huge or negative one. ``ttft_mean_s`` is the histogram's
  sum delta over its count delta (unknown when no request got a first token in between).
  A NaN or infinite sample makes its metric unknown for that source (dropped, not summed):
  policies do arithmetic (``math.ceil``) on every known value.
* I/O: ``Scraper`` fetches every endpoint at once with aiohttp, each under its own
  timeout, keeps the previous reading per endpoint (forgotten when the endpoint leaves)
  and stamps readings with the injected clock.

Names mapped (vLLM's; the simulator exports the same)::

    vllm:kv_cache_usage_perc | vllm:gpu_cache_usage_perc  -> kv_cache_usage
    vllm:num_requests_waiting / _running                  -> requests_waiting / _running
    vllm:prompt_tokens_total, vllm:generation_tokens_total -> *_tokens_per_s (rates)
    vllm:request_success_total                            -> requests_per_s (rate)
    vllm:time_to_first_token_seconds (histogram)          -> ttft_mean_s
    shoal_router_in_flight{model}                         -> router_in_flight
    shoal_router_held_requests{model}                     -> router_held
    shoal_router_arrivals_total{model}                    -> router_arrivals_per_s (rate)

The parser is prometheus_client's (``text_string_to_metric_families``); a regex parser
was rejected: label values may hold any escaped text.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from control.autoscale.types import (
    GENERATION_TOKENS_PER_S,
    KV_CACHE_USAGE,
    PROMPT_TOKENS_PER_S,
    REQUESTS_PER_S,
    REQUESTS_RUNNING,
    REQUESTS_WAITING,
    ROUTER_ARRIVALS_PER_S,
    ROUTER_HELD,
    ROUTER_IN_FLIGHT,
    TTFT_MEAN_S,
    ReplicaSample,
)
from shoal.bodies import read_capped

__all__ = [
    "ENGINE_COUNTERS",
    "ENGINE_GAUGES",
    "Reading",
    "Scraper",
    "engine_values",
    "parse_engine",
    "parse_router",
    "router_values",
]

log = logging.getLogger("shoal." + __name__)

# Sample name -> canonical metric. The new KV name wins over the legacy one when an engine
# exports both (vLLM did during the deprecation window).
ENGINE_GAUGES: Mapping[str, str] = {
    "vllm:kv_cache_usage_perc": KV_CACHE_USAGE,
    "vllm:gpu_cache_usage_perc": KV_CACHE_USAGE,
    "vllm:num_requests_waiting": REQUESTS_WAITING,
    "vllm:num_requests_running": REQUESTS_RUNNING,
}
ENGINE_COUNTERS: Mapping[str, str] = {
    "vllm:prompt_tokens_total": PROMPT_TOKENS_PER_S,
    "vllm:generation_tokens_total": GENERATION_TOKENS_PER_S,
    "vllm:request_success_total": REQUESTS_PER_S,
}
_TTFT = "vllm:time_to_first_token_seconds"
_PREFERRED = {KV_CACHE_USAGE: "vllm:kv_cache_usage_perc"}

ROUTER_GAUGES: Mapping[str, str] = {
    "shoal_router_in_flight": ROUTER_IN_FLIGHT,
    "shoal_router_held_requests": ROUTER_HELD,
}
ROUTER_COUNTERS: Mapping[str, str] = {"shoal_router_arrivals_total": ROUTER_ARRIVALS_PER_S}


@dataclass(frozen=True, slots=True)
class Reading:
    """One scrape of one source, summed over labels; ``at_s`` on the controller's clock."""

    at_s: float
    gauges: Mapping[str, float] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)
    ttft_sum: float | None = None
    ttft_count: float | None = None


def _samples(text: str) -> Iterable[tuple[str, Mapping[str, str], float]]:
    """(name, labels, value) of every sample; ``ValueError`` on malformed text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, float(sample.value)


def _sum(by_name: dict[str, float], bad: set[str], name: str, value: float) -> None:
    """Add ``value`` to ``by_name[name]``; a NaN or infinity makes the name unknown (``bad``):
    a policy cannot do arithmetic on it, and a partial sum would understate the load."""
    if not math.isfinite(value):
        bad.add(name)
    by_name[name] = by_name.get(name, 0.0) + value


def _known(by_name: dict[str, float], bad: set[str]) -> dict[str, float]:
    return {name: value for name, value in by_name.items() if name not in bad}


def _finite(values: dict[str, float]) -> dict[str, float]:
    """Only finite values: a rate or mean of huge counters can still overflow."""
    return {metric: value for metric, value in values.items() if math.isfinite(value)}


def parse_engine(text: str, at_s: float) -> Reading:
    """An engine's ``/metrics`` text as a ``Reading``; ``ValueError`` if it does not parse.
    A metric with a NaN or infinite sample is left out (unknown), not kept."""
    raw: dict[str, float] = {}
    bad: set[str] = set()
    for name, _labels, value in _samples(text):
        if name in ENGINE_GAUGES or name in ENGINE_COUNTERS or name.startswith(_TTFT):
            _sum(raw, bad, name, value)
    by_name = _known(raw, bad)
    gauges: dict[str, float] = {}
    for name, metric in ENGINE_GAUGES.items():
        if name in by_name and (metric not in gauges or _PREFERRED.get(metric) == name):
            gauges[metric] = by_name[name]
    counters = {name: by_name[name] for name in ENGINE_COUNTERS if name in by_name}
    return Reading(
        at_s, gauges, counters, by_name.get(_TTFT + "_sum"), by_name.get(_TTFT + "_count")
    )


def parse_router(text: str, at_s: float, model: str = "") -> Reading:
    """The router's ``/metrics`` for ``model`` (every model when empty); a metric with a
    NaN or infinite sample is left out (unknown)."""
    raw: dict[str, float] = {}
    bad: set[str] = set()
    for name, labels, value in _samples(text):
        if name in ROUTER_GAUGES or name in ROUTER_COUNTERS:
            if model and labels.get("model") != model:
                continue
            _sum(raw, bad, name, value)
    by_name = _known(raw, bad)
    gauges = {metric: by_name[name] for name, metric in ROUTER_GAUGES.items() if name in by_name}
    counters = {name: by_name[name] for name in ROUTER_COUNTERS if name in by_name}
    return Reading(at_s, gauges, counters)


def _rates(
    previous: Reading | None, current: Reading, names: Mapping[str, str]
) -> dict[str, float]:
    if previous is None or current.at_s <= previous.at_s:
        return {}
    elapsed = current.at_s - previous.at_s
    rates: dict[str, float] = {}
    for name, metric in names.items():
        if name in current.counters and name in previous.counters:
            delta = current.counters[name] - previous.counters[name]
            if delta >= 0:  # a reset (restart) is unknown this round, not negative
                rates[metric] = delta / elapsed
    return rates


def engine_values(previous: Reading | None, current: Reading) -> dict[str, float]:
    """Canonical values of one engine: its gauges now, rates since ``previous``."""
    values = dict(current.gauges)
    values.update(_rates(previous, current, ENGINE_COUNTERS))
    if (
        previous is not None
        and None not in (previous.ttft_sum, previous.ttft_count)
        and None not in (current.ttft_sum, current.ttft_count)
    ):
        assert previous.ttft_count is not None and current.ttft_count is not None
        assert previous.ttft_sum is not None and current.ttft_sum is not None
        count = current.ttft_count - previous.ttft_count
        total = current.ttft_sum - previous.ttft_sum
        if count > 0 and total >= 0:
            values[TTFT_MEAN_S] = total / count
    return _finite(values)


def router_values(previous: Reading | None, current: Reading) -> dict[str, float]:
    """Canonical router values: in flight and held now, the arrival rate since ``previous``."""
    values = dict(current.gauges)
    values.update(_rates(previous, current, ROUTER_COUNTERS))
    return _finite(values)


class ScrapeFailed(Exception):
    """Internal: one source could not be read this round (becomes ``ok=False``)."""


class Scraper:
    """Scrapes engines and the router; keeps one previous reading per source for rates."""

    def __init__(
        self,
        *,
        timeout_s: float = 1.0,
        router_url: str = "",
        model: str = "",
        max_body_bytes: int = 4 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout_s = timeout_s
        self._router_url = router_url.rstrip("/")
        self._model = model
        self._max_body_bytes = max_body_bytes
        self._clock = clock
        self._previous: dict[str, Reading] = {}
        self._router_previous: Reading | None = None
        self._session: aiohttp.ClientSession | None = None
        self.num_failures = 0  # scrapes that failed, all sources, since start

    async def _fetch(self, url: str) -> str:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._session.get(url + "/metrics") as reply:
                    if reply.status != 200:
                        raise ScrapeFailed(f"HTTP {reply.status}")
                    body = await read_capped(reply, self._max_body_bytes)
                    if body is None:
                        raise ScrapeFailed(f"body over {self._max_body_bytes} bytes")
                    return body.decode("utf-8", errors="replace")
        except TimeoutError:
            raise ScrapeFailed(f"no answer in {self._timeout_s} s") from None
        except aiohttp.ClientError as exc:
            raise ScrapeFailed(f"{type(exc).__name__}: {exc}") from None

    async def _engine(self, url: str) -> ReplicaSample:
        try:
            text = await self._fetch(url)
            reading = parse_engine(text, self._clock())
        except (ScrapeFailed, ValueError) as exc:
            self.num_failures += 1
            log.warning("scrape of %s/metrics failed (unknown this round): %s", url, exc)
            return ReplicaSample(url, {}, ok=False)
        values = engine_values(self._previous.get(url), reading)
        self._previous[url] = reading
        return ReplicaSample(url, values)

    async def scrape(self, endpoints: Iterable[str]) -> tuple[ReplicaSample, ...]:
        """One sample per endpoint, in order; all fetched at once."""
        urls = [url.rstrip("/") for url in endpoints]
        for gone in set(self._previous) - set(urls):
            del self._previous[gone]
        return tuple(await asyncio.gather(*(self._engine(url) for url in urls)))

    async def scrape_router(self) -> dict[str, float]:
        """The router's values for the model; empty (unknown) without a router or on failure."""
        if not self._router_url:
            return {}
        try:
            reading = parse_router(await self._fetch(self._router_url), self._clock(), self._model)
        except (ScrapeFailed, ValueError) as exc:
            self.num_failures += 1
            log.warning("scrape of the router %s failed: %s", self._router_url, exc)
            return {}
        values = router_values(self._router_previous, reading)
        self._router_previous = reading
        return values

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
