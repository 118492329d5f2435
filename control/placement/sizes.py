"""The router's request sizes as the planner reads them: ``GET /v1/request_sizes`` ->
``RequestSizes`` -> a ``Workload`` on the profiles' ticks.

::

    RouterSizes.fetch()      GET {router}/v1/request_sizes?model=M&window_s=W (a bearer
                             token when given); at most 1 MiB read, at most 64 edges
    parse_request_sizes()    the agreed JSON (router/sizes.py) as a frozen value; the
                             router's optional "arrivals" / "arrival_rate" when present
    workload_from()          rebinned shares of the finished requests, and
                             max(finished rate, arrival rate) x headroom

Invariant: every failure to read or understand the router is ``SizesUnavailable``
(aiohttp's errors and timeouts translated here, once), so a planning round has one error
to hold on. Split from planner.py (the loop) because the wire format and the loop change
for different reasons. ``SizeSource`` is the boundary the planner's tests replace.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from control.placement.errors import SizesUnavailable
from control.placement.types import Matrix, Workload
from shoal.bodies import read_capped

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_EDGES",
    "RebinFn",
    "RequestSizes",
    "RouterSizes",
    "SizeSource",
    "parse_request_sizes",
    "workload_from",
]

RebinFn = Callable[..., Matrix]  # formats.rebin(counts, out_edges, in_edges, out_ticks, in_ticks)

MAX_ANSWER_BYTES = 1 << 20  # the router's sizes answer is ~2 KiB; more is not its answer
MAX_EDGES = 64  # bins per axis in the sizes answer (the router sends 12)


@dataclass(frozen=True, slots=True)
class RequestSizes:
    """The router's ``GET /v1/request_sizes`` answer: finished requests of the window
    counted per (completion tokens, prompt tokens) bin, ``counts[out][in]``."""

    count: int
    rate: float  # requests/s over span_s
    span_s: float
    out_edges: tuple[int, ...]
    in_edges: tuple[int, ...]
    counts: Matrix
    window_s: float = 0.0
    model: str | None = None
    arrivals: int | None = None  # every request received (None: a router without them)
    arrival_rate: float | None = None  # arrivals / span_s

    @property
    def planned_rate(self) -> float:
        """The rate to plan for: finished or arrived, whichever is higher."""
        return max(self.rate, self.arrival_rate or 0.0)


def parse_request_sizes(data: Any) -> RequestSizes:
    """The router's JSON as ``RequestSizes``; ``SizesUnavailable`` naming what is wrong."""
    try:
        sizes = RequestSizes(
            count=int(data["count"]),
            rate=float(data["rate"]),
            span_s=float(data["span_s"]),
            out_edges=tuple(int(e) for e in data["out_edges"]),
            in_edges=tuple(int(e) for e in data["in_edges"]),
            counts=tuple(tuple(float(c) for c in row) for row in data["counts"]),
            window_s=float(data.get("window_s", 0.0)),
            model=data.get("model"),
            arrivals=None if data.get("arrivals") is None else int(data["arrivals"]),
            arrival_rate=(
                None if data.get("arrival_rate") is None else float(data["arrival_rate"])
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SizesUnavailable(f"request sizes: not the agreed shape ({exc!r})") from None
    shape_ok = len(sizes.counts) == len(sizes.out_edges) and all(
        len(row) == len(sizes.in_edges) for row in sizes.counts
    )
    if len(sizes.out_edges) > MAX_EDGES or len(sizes.in_edges) > MAX_EDGES:
        raise SizesUnavailable(f"request sizes: more than {MAX_EDGES} edges on an axis")
    if not shape_ok or not math.isfinite(sizes.rate) or sizes.rate < 0 or sizes.count < 0:
        raise SizesUnavailable("request sizes: counts do not match the edges, or a bad rate")
    arrival_rate = sizes.arrival_rate
    if arrival_rate is not None and (not math.isfinite(arrival_rate) or arrival_rate < 0):
        raise SizesUnavailable("request sizes: a bad arrival_rate")
    return sizes


def workload_from(
    sizes: RequestSizes,
    out_ticks: tuple[int, ...],
    in_ticks: tuple[int, ...],
    *,
    headroom: float,
    slice_factor: int,
    rebin: RebinFn,
) -> Workload:
    """The window as a ``Workload`` on the profiles' ticks: shares of each cell (finished
    requests), and the higher of the finished and the arrival rate times ``headroom``;
    rate 0 (and zero shares) for a window without finished requests."""
    counts = rebin(sizes.counts, sizes.out_edges, sizes.in_edges, out_ticks, in_ticks)
    total = sum(sum(row) for row in counts)
    if sizes.count == 0 or sizes.rate == 0 or total == 0:
        zeros = tuple(tuple(0.0 for _ in in_ticks) for _ in out_ticks)
        return Workload(0.0, zeros, out_ticks, in_ticks, slice_factor)
    histogram = tuple(tuple(c / total for c in row) for row in counts)
    return Workload(sizes.planned_rate * headroom, histogram, out_ticks, in_ticks, slice_factor)


class SizeSource(Protocol):
    async def fetch(self) -> RequestSizes: ...

    async def close(self) -> None: ...


class RouterSizes:
    """``GET {router_url}/v1/request_sizes?model=M&window_s=W`` through aiohttp."""

    def __init__(
        self, router_url: str, *, model: str = "", window_s: float = 300.0,
        token: str | None = None, timeout_s: float = 5.0,
    ) -> None:  # fmt: skip
        self.url = router_url.rstrip("/") + "/v1/request_sizes"
        self.params = {"window_s": f"{window_s:g}", **({"model": model} if model else {})}
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self) -> RequestSizes:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.get(
                self.url, params=self.params, headers=self._headers
            ) as reply:
                body = await read_capped(reply, MAX_ANSWER_BYTES)
                if body is None:
                    raise SizesUnavailable(
                        f"{self.url}: the answer is over {MAX_ANSWER_BYTES} bytes"
                    )
                if reply.status != 200:
                    raise SizesUnavailable(
                        f"{self.url}: HTTP {reply.status}: {body[:200].decode(errors='replace')}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SizesUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from None
        try:
            return parse_request_sizes(json.loads(body))
        except ValueError:
            raise SizesUnavailable(f"{self.url}: the answer is not JSON") from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
