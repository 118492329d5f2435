"""Engines' ``/metrics`` scraped with explicit freshness: stale metrics are unknown.

Every ``metrics_interval_s`` the scraper GETs every engine's ``/metrics`` concurrently,
each with ``metrics_timeout_s``; an engine that does not answer in time keeps its last
good scrape, which turns into ``None`` (unknown) once older than ``metrics_stale_s``.
Strategies therefore see ``EngineView.metrics is None`` for an engine whose metrics
cannot be trusted, never zeros (AIBrix #1185, GIE #1497: missing metrics read as an idle
engine drew all the traffic).

What is read (vLLM's names; ``sim/metrics.py`` exports the same ones)::

    vllm:num_requests_running / _waiting              gauges, summed over label sets
    vllm:kv_cache_usage_perc (vllm:gpu_cache_usage_perc before v0.10)   0..1
    vllm:time_to_first_token_seconds_{sum,count}      mean over the last interval
    vllm:request_time_per_output_token_seconds_{sum,count}
        (vllm:time_per_output_token_seconds before)   mean over the last interval
    vllm:prompt_tokens_total, vllm:generation_tokens_total   counters -> per second
    vllm:lora_requests_info{running_lora_adapters, waiting_lora_adapters}
        the newest sample (its value is a timestamp) names the loaded adapters

Interval means and rates need two scrapes; the first one leaves them ``None``, and a
counter that went down (an engine restart) restarts the difference.

Rejected: ``prometheus_client``'s text parser (it builds objects for every sample and
bucket; this one walks the lines it needs, several times faster on vLLM's ~600 lines).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from router.types import EngineMetrics
from shoal.bodies import read_capped

__all__ = ["MetricsScraper", "Sample", "parse_scrape", "to_metrics"]

log = logging.getLogger("shoal." + __name__)

METRICS_MAX_BYTES = 4 << 20  # a vLLM /metrics is ~100-300 KB; LoRA and many models add more

_SUMMED = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv",
    "vllm:gpu_cache_usage_perc": "kv_legacy",
    "vllm:time_to_first_token_seconds_sum": "ttft_sum",
    "vllm:time_to_first_token_seconds_count": "ttft_count",
    "vllm:request_time_per_output_token_seconds_sum": "tpot_sum",
    "vllm:request_time_per_output_token_seconds_count": "tpot_count",
    "vllm:time_per_output_token_seconds_sum": "tpot_legacy_sum",
    "vllm:time_per_output_token_seconds_count": "tpot_legacy_count",
    "vllm:prompt_tokens_total": "prompt",
    "vllm:generation_tokens_total": "generation",
}
_LORA = "vllm:lora_requests_info"


@dataclass(frozen=True, slots=True)
class Sample:
    """The numbers of one scrape that matter to routing (absent ones are missing keys)."""

    at: float  # clock() when the scrape finished
    values: dict[str, float]
    loras: frozenset[str] = frozenset()


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in text.split('",'):
        key, _, value = part.partition('="')
        labels[key.strip().lstrip(",")] = value.rstrip('"')
    return labels


def parse_scrape(text: str, at: float) -> Sample:
    """The routing-relevant numbers of one Prometheus text exposition."""
    values: dict[str, float] = {}
    lora_stamp, loras = -1.0, frozenset[str]()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        brace = line.find("{")
        space = line.rfind(" ")
        if space < 0:
            continue
        name = line[:brace] if 0 <= brace < space else line[:space]
        if name == _LORA:
            stamp = _number(line[space + 1 :])
            if stamp is not None and stamp > lora_stamp and brace >= 0:
                labels = _labels(line[brace + 1 : line.rfind("}")])
                names = (labels.get("running_lora_adapters", ""),
                         labels.get("waiting_lora_adapters", ""))  # fmt: skip
                loras = frozenset(n for joined in names for n in joined.split(",") if n)
                lora_stamp = stamp
            continue
        key = _SUMMED.get(name)
        if key is None:
            continue
        value = _number(line[space + 1 :])
        if value is not None:
            values[key] = values.get(key, 0.0) + value
    return Sample(at, values, loras)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _mean(now: Sample, before: Sample | None, sum_key: str, count_key: str) -> float | None:
    if before is None or count_key not in now.values or count_key not in before.values:
        return None
    count = now.values[count_key] - before.values[count_key]
    total = now.values.get(sum_key, 0.0) - before.values.get(sum_key, 0.0)
    return total / count if count > 0 and total >= 0 else None


def _rate(now: Sample, before: Sample | None, key: str) -> float | None:
    if before is None or key not in now.values or key not in before.values:
        return None
    delta, elapsed = now.values[key] - before.values[key], now.at - before.at
    return delta / elapsed if delta >= 0 and elapsed > 0 else None


def to_metrics(now: Sample, before: Sample | None, age_s: float) -> EngineMetrics:
    """An ``EngineMetrics`` from the newest scrape and the one before it."""
    v = now.values
    tpot = _mean(now, before, "tpot_sum", "tpot_count")
    if tpot is None:
        tpot = _mean(now, before, "tpot_legacy_sum", "tpot_legacy_count")
    return EngineMetrics(
        age_s=age_s,
        num_running=v.get("running"),
        num_waiting=v.get("waiting"),
        kv_cache_usage=v.get("kv", v.get("kv_legacy")),
        ttft_mean_s=_mean(now, before, "ttft_sum", "ttft_count"),
        tpot_mean_s=tpot,
        prompt_tokens_per_s=_rate(now, before, "prompt"),
        generation_tokens_per_s=_rate(now, before, "generation"),
        loras_loaded=now.loras,
    )


class MetricsScraper:
    """The last two good scrapes of every engine, and their freshness."""

    def __init__(
        self,
        *,
        timeout_s: float,
        stale_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._stale_s = stale_s
        self._clock = clock
        self._samples: dict[str, tuple[Sample | None, Sample]] = {}
        self._cached: dict[str, EngineMetrics] = {}

    def record(self, engine_id: str, text: str) -> None:
        """One good scrape of ``engine_id`` (also the unit tests' entry point)."""
        sample = parse_scrape(text, self._clock())
        previous = self._samples.get(engine_id)
        before = previous[1] if previous is not None else None
        if before is not None and any(
            sample.values.get(k, 0.0) < before.values.get(k, 0.0)
            for k in ("prompt", "generation", "ttft_count")
        ):
            before = None  # a counter went down: the engine restarted
        self._samples[engine_id] = (before, sample)
        self._cached[engine_id] = to_metrics(sample, before, 0.0)

    def metrics(self, engine_id: str) -> EngineMetrics | None:
        """The engine's metrics, or ``None`` when never scraped or stale."""
        samples = self._samples.get(engine_id)
        if samples is None:
            return None
        age = self._clock() - samples[1].at
        if age > self._stale_s:
            return None
        cached = self._cached[engine_id]
        return EngineMetrics(
            age_s=age,
            num_running=cached.num_running,
            num_waiting=cached.num_waiting,
            kv_cache_usage=cached.kv_cache_usage,
            ttft_mean_s=cached.ttft_mean_s,
            tpot_mean_s=cached.tpot_mean_s,
            prompt_tokens_per_s=cached.prompt_tokens_per_s,
            generation_tokens_per_s=cached.generation_tokens_per_s,
            loras_loaded=cached.loras_loaded,
        )

    def age_s(self, engine_id: str) -> float | None:
        samples = self._samples.get(engine_id)
        return None if samples is None else self._clock() - samples[1].at

    def forget(self, engine_id: str) -> None:
        self._samples.pop(engine_id, None)
        self._cached.pop(engine_id, None)

    async def scrape_one(self, session: aiohttp.ClientSession, engine_id: str, url: str) -> bool:
        """Scrape one engine; False (and a debug line) when it failed or timed out."""
        try:
            async with session.get(url + "/metrics", timeout=self._timeout) as reply:
                if reply.status != 200:
                    log.debug("scrape of %s answered %d", url, reply.status)
                    return False
                body = await read_capped(reply, METRICS_MAX_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.debug("scrape of %s failed: %r", url, exc)
            return False
        if body is None:
            log.debug("scrape of %s: body over %d bytes", url, METRICS_MAX_BYTES)
            return False
        text = body.decode("utf-8", errors="replace")
        self.record(engine_id, text)
        return True

    async def scrape(
        self, session: aiohttp.ClientSession, engines: Iterable[tuple[str, str]]
    ) -> dict[str, bool]:
        """Scrape every (engine id, url) concurrently; which ones succeeded."""
        engines = list(engines)
        results = await asyncio.gather(*(self.scrape_one(session, e, u) for e, u in engines))
        return {engine: ok for (engine, _), ok in zip(engines, results, strict=True)}
