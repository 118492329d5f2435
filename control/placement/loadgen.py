"""The profiler's load generator: open-loop Poisson streams against an OpenAI endpoint.

Invariant: a trial sends requests at the times its seeded Poisson process says,
whatever the endpoint does (open loop: a slow answer never delays the next arrival), and
every request it started is finished or aborted (its connection closed, which makes vLLM
and the simulator abort it) before ``trial`` returns.

Each request is ``POST /v1/completions`` with ``prompt`` a list of exactly ``in_tick``
token ids (vLLM and ``shoal sim engine`` take ids as they are: no tokenizer, no BOS
added, so the engine computes exactly that many prompt tokens), ``max_tokens = out_tick``,
``ignore_eos`` (vLLM's extension; the simulator never samples EOS) and
``stream_options.include_usage``: the final usage chunk is checked, and an answer whose
``prompt_tokens`` or ``completion_tokens`` differ from the cell's is an error, not a
measurement. Prompts differ in their first 32 ids (random per request), so the prefix
cache (chained block hashes) never hits; the rest is one random filler per trial.

Times are taken on the event loop's monotonic clock and multiplied by ``time_scale`` to
give the endpoint's seconds (a simulator run with ``--time-scale``). What comes from the
endpoint is translated once, here: an endpoint that cannot be reached raises
``ProfilerError`` naming the URL; a request that fails is a record with an ``error``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp

from control.placement.errors import ProfilerError
from control.placement.profile import RequestRecord, TrialPlan, TrialResult, evaluate_trial
from control.placement.types import Slos

__all__ = ["HttpLoad"]

log = logging.getLogger("shoal." + __name__)

_UNIQUE_PREFIX = 32  # random ids at the head of each prompt: no prefix-cache hits
_LOWEST_ID = 100  # clear of special tokens (BOS, EOS, padding sit at the bottom)
_PROBE_TIMEOUT_S = 600.0  # a lone request's lifetime, wall seconds, at most


class HttpLoad:
    """Trials against one endpoint and model; an async context manager (one session).

    ``max_token_id``: prompt ids are drawn from [100, max_token_id) (the tiny Llama's
    vocabulary is 8,192; the simulator's 32,000)."""

    def __init__(
        self,
        url: str,
        model: str,
        slos: Slos,
        *,
        time_scale: float = 1.0,
        seed: int = 0,
        max_token_id: int = 8000,
        min_throughput_ratio: float = 0.9,
        api_key: str = "",
    ) -> None:
        assert max_token_id > _LOWEST_ID, "the CLI checks --max-token-id"
        self.url = url.rstrip("/")
        self.model = model
        self.slos = slos
        self.time_scale = time_scale
        self.seed = seed
        self.max_token_id = max_token_id
        self.min_throughput_ratio = min_throughput_ratio
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HttpLoad:
        connector = aiohttp.TCPConnector(limit=0)  # open loop: no client-side queue
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=self._headers
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use HttpLoad as an async context manager"
        return self._session

    async def models(self) -> list[str]:
        """The models the endpoint lists; ``ProfilerError`` when it cannot be reached."""
        try:
            async with self.session.get(
                self.url + "/v1/models", timeout=aiohttp.ClientTimeout(total=10)
            ) as reply:
                if reply.status != 200:
                    text = (await reply.text())[:200]
                    raise ProfilerError(f"{self.url}/v1/models answered {reply.status}: {text}")
                body = await reply.json()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            reason = str(exc) or type(exc).__name__
            raise ProfilerError(f"cannot reach the endpoint {self.url}: {reason}") from None
        except ValueError as exc:
            raise ProfilerError(f"{self.url}/v1/models is not JSON: {exc}") from None
        try:
            return [str(m["id"]) for m in body["data"]]
        except (KeyError, TypeError) as exc:
            raise ProfilerError(f"{self.url}/v1/models is not a model list: {exc}") from None

    async def check(self) -> None:
        """``ProfilerError`` unless the endpoint answers and serves ``model``."""
        models = await self.models()
        if self.model not in models:
            raise ProfilerError(
                f"{self.url} does not serve model {self.model!r} (it lists {models})"
            )

    async def trial(self, out_tick: int, in_tick: int, plan: TrialPlan) -> TrialResult:
        """One trial (see ``profile.TrialPlan``): send, time, abort the leftovers, judge."""
        loop = asyncio.get_running_loop()
        scale = self.time_scale
        rng = random.Random(f"{self.seed}/{out_tick}/{in_tick}/{plan.rate!r}")
        filler = [rng.randrange(_LOWEST_ID, self.max_token_id) for _ in range(in_tick)]
        start_s, end_s = plan.window
        t0 = loop.time()
        slots: list[_Slot] = []
        tasks: set[asyncio.Task[None]] = set()
        measured_left = 0
        window_closed = False
        all_measured = asyncio.Event()
        lag_s = 0.0

        def now() -> float:
            return (loop.time() - t0) * scale

        def finished(slot: _Slot) -> None:
            nonlocal measured_left
            if start_s <= slot.arrival_s < end_s:
                measured_left -= 1
                if measured_left == 0 and window_closed:
                    all_measured.set()

        async def arrivals() -> None:
            nonlocal measured_left, window_closed, lag_s
            at = 0.0
            while True:
                at += rng.expovariate(plan.rate)
                if at >= end_s and not window_closed:
                    window_closed = True
                    if measured_left == 0:
                        all_measured.set()
                delay = (at - now()) / scale
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    lag_s = max(lag_s, -delay * scale)
                head = [rng.randrange(_LOWEST_ID, self.max_token_id) for _ in range(_UNIQUE_PREFIX)]
                prompt = head[:in_tick] + filler[len(head) :]
                slot = _Slot(at)
                slots.append(slot)
                if start_s <= at < end_s:
                    measured_left += 1
                task = loop.create_task(self._one(slot, prompt, in_tick, out_tick, now, finished))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        sender = loop.create_task(arrivals())
        try:
            remaining = plan.deadline_s / scale - (loop.time() - t0)
            try:
                await asyncio.wait_for(all_measured.wait(), timeout=max(0.0, remaining))
            except TimeoutError:
                log.debug("trial at %.3g/s: deadline with measured requests out", plan.rate)
        finally:
            sender.cancel()
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(sender, *tasks, return_exceptions=True)
        records = [slot.record() for slot in slots]
        result = evaluate_trial(
            records, plan, self.slos, out_tick, self.min_throughput_ratio, client_lag_s=lag_s
        )
        if result.num_measured and result.num_errors == result.num_measured:
            await self.check()  # every request failed: is the endpoint still there?
        return result

    async def probe(self, out_tick: int, in_tick: int) -> float | None:
        """One request of the cell sent alone (``profile.Probe``): its e2e in endpoint
        seconds, None when it failed or took over ``_PROBE_TIMEOUT_S`` (wall)."""
        loop = asyncio.get_running_loop()
        rng = random.Random(f"{self.seed}/{out_tick}/{in_tick}/probe")
        prompt = [rng.randrange(_LOWEST_ID, self.max_token_id) for _ in range(in_tick)]
        t0 = loop.time()
        slot = _Slot(0.0)

        def now() -> float:
            return (loop.time() - t0) * self.time_scale

        one = self._one(slot, prompt, in_tick, out_tick, now, lambda _: None)
        try:
            await asyncio.wait_for(one, timeout=_PROBE_TIMEOUT_S)
        except TimeoutError:
            return None
        record = slot.record()
        if not record.ok:
            log.info("probe of out %d in %d failed: %s", out_tick, in_tick, record.error)
            return None
        return record.finish_s

    async def _one(
        self,
        slot: _Slot,
        prompt: list[int],
        in_tick: int,
        out_tick: int,
        now: Callable[[], float],
        finished: Callable[[_Slot], None],
    ) -> None:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": out_tick,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        try:
            await self._stream(slot, body, in_tick, out_tick, now)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, OSError) as exc:
            slot.error = f"{type(exc).__name__}: {exc}"[:200]
        except ValueError as exc:
            slot.error = f"not an OpenAI stream: {exc}"[:200]
        finally:
            slot.done = True
            finished(slot)

    async def _stream(
        self,
        slot: _Slot,
        body: dict[str, Any],
        in_tick: int,
        out_tick: int,
        now: Callable[[], float],
    ) -> None:
        async with self.session.post(self.url + "/v1/completions", json=body) as reply:
            if reply.status != 200:
                slot.error = f"HTTP {reply.status}: {(await reply.text())[:160]}"
                slot.refused = 400 <= reply.status < 500 and reply.status != 429
                return
            usage: dict[str, Any] | None = None
            num_chunks = 0
            async for raw in reply.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    slot.error = f"stream error: {str(chunk['error'])[:160]}"
                    return
                if chunk.get("choices"):
                    t = now()
                    if slot.first_token_s is None:
                        slot.first_token_s = t
                    slot.last_token_s = t
                    num_chunks += 1
                if chunk.get("usage"):
                    usage = chunk["usage"]
        slot.num_output = int(usage["completion_tokens"]) if usage else num_chunks
        if usage is not None and int(usage.get("prompt_tokens", in_tick)) != in_tick:
            slot.error = (
                f"the endpoint counted {usage['prompt_tokens']} prompt tokens for {in_tick} ids"
            )
            slot.refused = True
        elif slot.num_output != out_tick:
            slot.error = (
                f"answered {slot.num_output} of {out_tick} tokens "
                "(does the endpoint honour ignore_eos and fit max_model_len?)"
            )
            slot.refused = True
        else:
            slot.finish_s = slot.last_token_s


class _Slot:
    """One request's timings as they arrive (mutable until the trial ends)."""

    __slots__ = (
        "arrival_s",
        "done",
        "error",
        "finish_s",
        "first_token_s",
        "last_token_s",
        "num_output",
        "refused",
    )

    def __init__(self, arrival_s: float) -> None:
        self.arrival_s = arrival_s
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.finish_s: float | None = None
        self.num_output = 0
        self.error: str | None = None
        self.refused = False
        self.done = False

    def record(self) -> RequestRecord:
        return RequestRecord(
            self.arrival_s,
            self.first_token_s,
            self.finish_s,
            self.num_output,
            self.error,
            self.refused,
        )
