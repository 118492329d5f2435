"""Load signals every strategy reads the same way: saturation, the router's own load, freshness.

Invariant: a strategy never reads a missing metric as zero. ``EngineView.metrics`` is
``None`` when the scrape is stale or failed, and each field is ``None`` when the engine does
not export it; the helpers here return ``None`` for "unknown" and the callers fall back to
the router-local in-flight accounting (``in_flight``, ``in_flight_tokens``), which is always
known because the router itself produced it (issue 12, complaint 3: AIBrix #1185, GIE #1497,
where missing metrics silently turned into zeros and every request went to the engine that
had not reported).

Saturation is the router's own count reaching ``StrategyDeps.max_in_flight_per_engine``:
every strategy refuses (``math.inf``) a saturated engine, so the pipeline answers
``Saturated`` (429/503 with Retry-After) only when all candidates are saturated, whichever
strategy the client chose. Rejected: saturation from scraped ``num_waiting`` (stale by up to
a scrape interval, and absent on some engines); it feeds the cost models instead.

The time-to-first-token model (``expected_ttft``) shared by ``precise-prefix``, ``slo`` and
``shoal`` prices one request on one engine in seconds, with ``StrategyDeps``' per-token
tunables::

    queue_s   = (pending_tokens(engine)
                 + in_flight x running_request_tokens) x prefill_s_per_token
                                                         (a running request's decode steps
                                                          share the batch with prefill)
    pending   = in_flight_tokens (router-tracked, all replicas)
              + unseen_waiting x tokens per request       (engine-reported waiting requests
                                                          the ledger does not know of)
    own_s     = node-only tokens x node_load_s_per_token
              + peer-only tokens x peer_fetch_s_per_token
              + uncached tokens x prefill_s_per_token
    ttft      = queue_s + own_s

Tiers are read as ``EnginePrefix`` states them: each is a prefix length from token 0
("leading prompt tokens"), so they overlap: the GPU supplies ``gpu``, the node cache adds
what it holds beyond that, a peer what it holds beyond both, and the rest is recomputed.
How it fails: prefill is not linear in tokens (attention grows with context) and decode
steps interleave with prefill in a running batch; the model ranks engines, it does not
predict a latency to the millisecond. ``unseen_waiting`` needs a fresh scrape; without one
only the router's own accounting counts (never zero-filled from a stale number).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from router.strategies.base import StrategyDeps
from router.types import EnginePrefix, EngineView, PrefixView, RouteRequest

__all__ = [
    "expected_ttft",
    "fresh_waiting",
    "in_flight_costs",
    "is_saturated",
    "lexicographic",
    "own_seconds",
    "pending_tokens",
    "prompt_tokens",
    "queue_pressure",
    "queue_seconds",
    "refuse_saturated",
]


def is_saturated(engine: EngineView, deps: StrategyDeps) -> bool:
    """The router already has ``max_in_flight_per_engine`` requests on ``engine``."""
    return engine.in_flight >= deps.max_in_flight_per_engine


def refuse_saturated(
    costs: Sequence[float], engines: Sequence[EngineView], deps: StrategyDeps
) -> list[float]:
    """``costs`` with every saturated engine's cost replaced by ``math.inf``."""
    assert len(costs) == len(engines), "one cost per candidate"
    return [math.inf if is_saturated(e, deps) else c for c, e in zip(costs, engines, strict=True)]


def in_flight_costs(engines: Sequence[EngineView]) -> list[float]:
    """Least-request order as one number: requests in flight, then their pending tokens.

    ``in_flight + in_flight_tokens / (1 + max in_flight_tokens)``: the fraction is below one,
    so requests always dominate and pending prompt tokens only break ties between engines
    with as many requests (a long prompt waiting costs more than a short one).
    """
    scale = 1.0 + max((e.in_flight_tokens for e in engines), default=0)
    return [e.in_flight + e.in_flight_tokens / scale for e in engines]


def lexicographic(primary: Sequence[float], secondary: Sequence[float]) -> list[float]:
    """One cost per candidate ordering by ``primary``, then by ``secondary`` among equals.

    ``secondary`` is scaled into half the smallest gap between distinct primaries, so it can
    never reorder two candidates whose primaries differ (infinite primaries stay infinite).
    """
    finite = sorted({p for p in primary if math.isfinite(p)})
    gaps = [b - a for a, b in itertools.pairwise(finite)]
    room = min(gaps) / 2 if gaps else 1.0
    low = min(secondary, default=0.0)
    span = max(secondary, default=0.0) - low
    if span <= 0:
        return list(primary)
    return [p + room * (s - low) / span * 0.999 for p, s in zip(primary, secondary, strict=True)]


def fresh_waiting(engine: EngineView) -> float | None:
    """Requests the engine itself reports waiting, or ``None`` when unknown (stale, absent)."""
    if engine.metrics is None or engine.metrics.num_waiting is None:
        return None
    return max(0.0, engine.metrics.num_waiting)


def pending_tokens(engine: EngineView, typical_request_tokens: int) -> float:
    """Prompt tokens queued ahead of a new request on ``engine``.

    The router's own pending tokens, plus requests the engine reports waiting beyond those
    the router has in flight there (sent by someone else), each counted at the average size
    of the router's own pending requests (or ``typical_request_tokens`` when it has none).
    """
    pending = float(engine.in_flight_tokens)
    waiting = fresh_waiting(engine)
    if waiting is not None and waiting > engine.in_flight:
        per_request = (
            engine.in_flight_tokens / engine.in_flight
            if engine.in_flight and engine.in_flight_tokens
            else float(typical_request_tokens)
        )
        pending += (waiting - engine.in_flight) * per_request
    return pending


def queue_seconds(engine: EngineView, deps: StrategyDeps, typical_request_tokens: int) -> float:
    """Seconds of prefill queued ahead of a new request (see the module's model)."""
    running = engine.in_flight * deps.running_request_tokens
    return (pending_tokens(engine, typical_request_tokens) + running) * deps.prefill_s_per_token


def queue_pressure(engines: Sequence[EngineView], prompt_tokens: int) -> float:
    """About how many requests wait for prefill per engine: the fleet's load, 0 when idle.

    Mean pending tokens per engine over the size of a typical pending request: the larger
    of this prompt and the mean pending tokens per in-flight request (so a tiny prompt does
    not make a short queue look long).
    """
    if not engines:
        return 0.0
    pending = [pending_tokens(e, prompt_tokens) for e in engines]
    in_flight = sum(e.in_flight for e in engines)
    typical = sum(e.in_flight_tokens for e in engines) / in_flight if in_flight else 0.0
    return sum(pending) / len(engines) / max(float(prompt_tokens), typical, 1.0)


def own_seconds(prompt_tokens: int, tiers: EnginePrefix, deps: StrategyDeps) -> float:
    """Seconds to get this request's KV onto the engine: load, fetch, recompute."""
    gpu = min(prompt_tokens, tiers.gpu_tokens)
    node = max(gpu, min(prompt_tokens, tiers.node_tokens))
    peer = max(node, min(prompt_tokens, tiers.peer_tokens))
    return (
        (node - gpu) * deps.node_load_s_per_token
        + (peer - node) * deps.peer_fetch_s_per_token
        + (prompt_tokens - peer) * deps.prefill_s_per_token
    )


def expected_ttft(
    engine: EngineView, prompt_tokens: int, tiers: EnginePrefix, deps: StrategyDeps
) -> float:
    """Queue wait plus this request's own cost on ``engine``, in seconds."""
    return queue_seconds(engine, deps, prompt_tokens) + own_seconds(prompt_tokens, tiers, deps)


def prompt_tokens(request: RouteRequest, prefix: PrefixView | None) -> int:
    """The prompt's length: the view's (exact when precise) unless it has none."""
    if prefix is None or prefix.prompt_tokens <= 0:
        return request.prompt_tokens
    return prefix.prompt_tokens
