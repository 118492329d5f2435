"""Replaying request traces against an eviction policy, and a synthetic chat workload.

Shared by ``bench/eviction.py`` and ``tests/unit/test_eviction.py`` so that the number
a benchmark prints and the property a test asserts come from the same replay.

Replay semantics (the Mooncake trace's, ``../shared/traces/README.md``): a request is
the chain of its block ids. It hits the longest prefix of its chain that is resident
(those blocks count as hits and are touched, root first, as a lookup would); then
every block of the chain is stored: missing blocks are inserted in chain order with
the previous block as parent, making room with ``pop_victim`` while the cache is full.
The request's own blocks are pinned while it is stored (the engine holds them), so a
request longer than the cache stores what fits and drops the rest. Hit ratio = hit
blocks / requested blocks. Resident blocks past the first miss are not touched: the
lookup stopped before them.

Synthetic workload (``ConversationWorkload``): ``num_sessions`` open conversations,
picked per request with Zipf popularity; each turn resends the whole history, completes
the previous turn's partial last block (a new id) and appends new blocks; a
conversation ends after a turn with probability ``end_probability`` and a new one takes
its popularity rank. Conversations start with one of a few shared system prompts
(Zipf). Every ``scan_period`` requests a burst of one-off long documents under a system
prompt arrives: a scan, which a policy must not let flush the conversations.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvcache.eviction import EvictionPolicy

__all__ = ["ConversationWorkload", "replay_prefix_trace", "synthetic_conversations"]

K = TypeVar("K", bound=Hashable)


def replay_prefix_trace(
    requests: Iterable[Sequence[K]], policy: EvictionPolicy[K], capacity: int
) -> tuple[int, int]:
    """Replay ``requests`` against ``policy`` holding ``capacity`` blocks: (hits, total)."""
    if capacity < 1:
        raise ValueError(f"capacity must be at least one block, got {capacity}")
    hits = total = 0
    for chain in requests:
        total += len(chain)
        num_hit = 0
        while num_hit < len(chain) and chain[num_hit] in policy:
            num_hit += 1
        for key in chain[:num_hit]:
            policy.touch(key)
        hits += num_hit
        pinned = frozenset(chain).__contains__
        parent: K | None = None
        for key in chain:
            if key not in policy:
                if not _make_room(policy, capacity, pinned):
                    break
                policy.insert(key, parent)
            parent = key
    return hits, total


def _make_room(policy: EvictionPolicy[K], capacity: int, pinned: Callable[[K], bool]) -> bool:
    while len(policy) >= capacity:
        if policy.pop_victim(pinned) is None:
            return False
    return True


@dataclass(frozen=True, slots=True)
class ConversationWorkload:
    """Shape of the synthetic multi-turn chat workload (block counts are inclusive)."""

    num_requests: int = 20_000
    num_sessions: int = 2_000
    session_zipf: float = 0.9
    end_probability: float = 0.2
    num_prompts: int = 8
    prompt_blocks: tuple[int, int] = (2, 8)
    first_turn_blocks: tuple[int, int] = (4, 32)
    turn_blocks: tuple[int, int] = (1, 4)
    scan_period: int = 100
    scan_burst: int = 10
    scan_blocks: tuple[int, int] = (64, 256)


def synthetic_conversations(workload: ConversationWorkload, seed: int = 0) -> list[list[int]]:
    """The requests of ``workload`` as block-id chains; equal seeds give equal traces."""
    rng = random.Random(seed)
    ids = itertools.count()

    def blocks(bounds: tuple[int, int]) -> list[int]:
        return [next(ids) for _ in range(rng.randint(*bounds))]

    def zipf_picker(n: int, exponent: float) -> Callable[[], int]:
        cumulative = list(itertools.accumulate(1 / (rank + 1) ** exponent for rank in range(n)))
        return lambda: min(bisect.bisect_left(cumulative, rng.random() * cumulative[-1]), n - 1)

    prompts = [blocks(workload.prompt_blocks) for _ in range(workload.num_prompts)]
    pick_prompt = zipf_picker(workload.num_prompts, 1.0)
    pick_session = zipf_picker(workload.num_sessions, workload.session_zipf)

    def new_session() -> list[int]:
        return prompts[pick_prompt()] + blocks(workload.first_turn_blocks)

    sessions = [new_session() for _ in range(workload.num_sessions)]
    requests: list[list[int]] = []
    while len(requests) < workload.num_requests:
        if len(requests) % workload.scan_period == workload.scan_period - 1:
            for _ in range(workload.scan_burst):
                requests.append(prompts[pick_prompt()] + blocks(workload.scan_blocks))
            continue
        rank = pick_session()
        # The last block of the previous turn was partial: this turn completes it (a new
        # id, since the block's tokens changed) and appends the new messages.
        history = [*sessions[rank][:-1], next(ids), *blocks(workload.turn_blocks)]
        requests.append(history)
        ended = rng.random() < workload.end_probability
        sessions[rank] = new_session() if ended else history
    return requests[: workload.num_requests]
