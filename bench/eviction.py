"""Hit ratio of the eviction policies on a prefix-chained request trace.

Replays a Mooncake-format trace (JSONL, one request per line, ``hash_ids`` = the
request's chain of block ids) or the synthetic conversation workload of
``bench/eviction_replay.py`` against each policy at 2, 5, 10 and 20% of the trace's
unique blocks, with the replay semantics documented there. ``belady`` is Belady's MIN,
the offline optimum for a block cache: evict the block whose next request is furthest
in the future (never requested again first); it is the ceiling the online policies are
measured against. It is exact for the block sequence, not for prefix hits, which only
ever make it look better than any online policy could. ``--ceilings`` adds two more
offline rows, LRU told whether a block will ever be requested again: at its insertion
(``oracle-new``) or at each hit (``oracle-hit``); they bound what a reuse predictor
acting at that event can win (``ReuseOraclePolicy``).

    .venv/bin/python bench/eviction.py --trace ../shared/traces/mooncake_conversation.jsonl
    .venv/bin/python bench/eviction.py --synthetic --json
    .venv/bin/python bench/eviction.py --synthetic --ceilings

Prints a table, or with ``--json`` one object:
``{"unique_blocks": n, "hit_ratio": {policy: {"0.02": r, ...}, ...}}``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

# bench/kvcache.py is named like the package: drop this folder from the path so that
# `import kvcache` finds the package, whether or not PYTHONPATH names the repository.
REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

from bench.eviction_replay import (  # noqa: E402
    ConversationWorkload,
    replay_prefix_trace,
    synthetic_conversations,
)
from kvcache.eviction import make_policy  # noqa: E402

CAPACITY_FRACTIONS = (0.02, 0.05, 0.1, 0.2)
ONLINE_POLICIES = ("lru", "s3fifo", "default")
_NEVER = sys.maxsize


class Clock:
    """The index of the request being replayed, advanced by ``ticking``."""

    def __init__(self) -> None:
        self.now = -1

    def ticking(self, requests: Sequence[Sequence[int]]) -> Iterator[Sequence[int]]:
        for index, request in enumerate(requests):
            self.now = index
            yield request


class BeladyPolicy:
    """Belady's MIN over the known future of ``requests``, as an ``EvictionPolicy``.

    A max-heap of (next use, key) with lazy deletion: an entry is live while it equals
    the key's current next use. Every key of request ``t`` gets a new next use when the
    clock reaches ``t`` (whether the replay touches it, inserts it, or neither), so
    the heap top is always the resident key used furthest in the future.
    """

    name: ClassVar[str] = "belady"

    def __init__(self, requests: Sequence[Sequence[int]], clock: Clock) -> None:
        self._requests = requests
        self._clock = clock
        self._uses: dict[int, deque[int]] = {}
        for index, request in enumerate(requests):
            for key in request:
                self._uses.setdefault(key, deque()).append(index)
        self._next_use: dict[int, int] = {}
        self._heap: list[tuple[int, int]] = []
        self._synced = -1

    def resize(self, capacity_blocks: int) -> None:
        del capacity_blocks  # the replay evicts while over capacity: nothing is sized

    def insert(self, key: int, parent: int | None) -> None:
        self._sync()
        self._schedule(key)

    def touch(self, key: int) -> None:
        self._sync()

    def remove(self, key: int) -> None:
        self._next_use.pop(key, None)

    def pop_victim(self, is_pinned: Callable[[int], bool]) -> int | None:
        self._sync()
        passed: list[tuple[int, int]] = []
        victim = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            key = entry[1]
            if self._next_use.get(key) != -entry[0]:
                continue  # stale
            if is_pinned(key):
                passed.append(entry)
                continue
            del self._next_use[key]
            victim = key
            break
        for entry in passed:
            heapq.heappush(self._heap, entry)
        return victim

    def __len__(self) -> int:
        return len(self._next_use)

    def __contains__(self, key: object) -> bool:
        return key in self._next_use

    def _sync(self) -> None:
        while self._synced < self._clock.now:
            self._synced += 1
            for key in self._requests[self._synced]:
                if key in self._next_use:
                    self._schedule(key)

    def _schedule(self, key: int) -> None:
        uses = self._uses[key]
        while uses and uses[0] <= self._clock.now:
            uses.popleft()
        next_use = uses[0] if uses else _NEVER
        self._next_use[key] = next_use
        heapq.heappush(self._heap, (-next_use, key))


class ReuseOraclePolicy:
    """LRU told, at some events, whether a block will ever be requested again.

    A block known to be dead (``knows_new``: at its insertion; ``knows_hits``: at a hit
    that is its last use) joins a dead queue, which is evicted before the LRU order of
    the others. ``oracle-new`` and ``oracle-hit`` are the ceilings of predicting reuse
    at those two events: they say where a reuse predictor can win, whatever it sees.
    """

    name: ClassVar[str] = "oracle"

    def __init__(
        self, requests: Sequence[Sequence[int]], clock: Clock, *, knows_new: bool, knows_hits: bool
    ) -> None:
        self._clock = clock
        self._knows_new, self._knows_hits = knows_new, knows_hits
        self._last_use: dict[int, int] = {}
        for index, request in enumerate(requests):
            for key in request:
                self._last_use[key] = index
        self._dead: OrderedDict[int, None] = OrderedDict()
        self._live: OrderedDict[int, None] = OrderedDict()

    def _is_dead(self, key: int) -> bool:
        return self._last_use[key] <= self._clock.now

    def resize(self, capacity_blocks: int) -> None:
        del capacity_blocks  # the replay evicts while over capacity: nothing is sized

    def insert(self, key: int, parent: int | None) -> None:
        dead = self._knows_new and self._is_dead(key)
        (self._dead if dead else self._live)[key] = None

    def touch(self, key: int) -> None:
        self.remove(key)
        dead = self._knows_hits and self._is_dead(key)
        (self._dead if dead else self._live)[key] = None

    def remove(self, key: int) -> None:
        if self._dead.pop(key, False) is not None:
            self._live.pop(key, None)

    def pop_victim(self, is_pinned: Callable[[int], bool]) -> int | None:
        for queue in (self._dead, self._live):
            for _ in range(len(queue)):
                key = next(iter(queue))
                if not is_pinned(key):
                    del queue[key]
                    return key
                queue.move_to_end(key)
        return None

    def __len__(self) -> int:
        return len(self._dead) + len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._dead or key in self._live


CEILINGS = {"oracle-new": (True, False), "oracle-hit": (False, True)}


def _policy(name: str, requests: Sequence[Sequence[int]], clock: Clock, capacity: int) -> Any:
    if name == "belady":
        return BeladyPolicy(requests, clock)
    if name in CEILINGS:
        knows_new, knows_hits = CEILINGS[name]
        return ReuseOraclePolicy(requests, clock, knows_new=knows_new, knows_hits=knows_hits)
    return make_policy(name, capacity)


def hit_ratios(requests: Sequence[Sequence[int]], *, ceilings: bool = False) -> dict[str, Any]:
    unique_blocks = len({key for request in requests for key in request})
    table: dict[str, dict[str, float]] = {}
    names = (*ONLINE_POLICIES, "belady", *(CEILINGS if ceilings else ()))
    for name in names:
        row = table[name] = {}
        for fraction in CAPACITY_FRACTIONS:
            capacity = max(1, int(unique_blocks * fraction))
            clock = Clock()
            policy = _policy(name, requests, clock, capacity)
            hits, total = replay_prefix_trace(clock.ticking(requests), policy, capacity)
            row[str(fraction)] = round(hits / total, 4)
    return {"unique_blocks": unique_blocks, "hit_ratio": table}


TRACE_BLOCK_TOKENS = 512  # the Mooncake traces' block size (tokens per hash id)


def load_trace(path: Path, partial_blocks: bool = False) -> list[list[int]]:
    """Each request's chain of block ids. A request stores only the blocks its prompt
    fills (``input_length // 512``): the trace also names the partial last block, which
    no engine saves and the daemon never caches (``kvcache.keys``); replaying it would
    fill the cache with blocks reused 0.8% of the time. ``partial_blocks`` keeps them
    (the replay of the results recorded before issue 17)."""
    chains = []
    with path.open() as lines:
        for line in lines:
            if not line.strip():
                continue
            request = json.loads(line)
            chain = request["hash_ids"]
            if not partial_blocks and "input_length" in request:
                chain = chain[: int(request["input_length"]) // TRACE_BLOCK_TOKENS]
            if chain:
                chains.append(chain)
    return chains


def print_table(result: dict[str, Any], label: str, seconds: float) -> None:
    print(f"{label}: {result['unique_blocks']} unique blocks, replayed in {seconds:.1f} s")
    print(f"{'policy':<10}" + "".join(f"{f'{f:.0%} cap':>10}" for f in CAPACITY_FRACTIONS))
    for name, row in result["hit_ratio"].items():
        print(f"{name:<10}" + "".join(f"{row[str(f)]:>10.4f}" for f in CAPACITY_FRACTIONS))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="Mooncake-format JSONL trace")
    source.add_argument(
        "--synthetic", action="store_true", help="the seeded synthetic conversation workload"
    )
    parser.add_argument(
        "--partial-blocks",
        action="store_true",
        help="replay each request's partial last block too (the pre-issue-17 replay)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --synthetic (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--ceilings",
        action="store_true",
        help="add the reuse-oracle rows (oracle-new, oracle-hit): what predicting reuse can win",
    )
    args = parser.parse_args(argv)
    if args.synthetic:
        requests = synthetic_conversations(ConversationWorkload(), seed=args.seed)
        label = f"synthetic conversations (seed {args.seed})"
    else:
        requests = load_trace(args.trace, args.partial_blocks)
        label = str(args.trace)
    started = time.perf_counter()
    result = hit_ratios(requests, ceilings=args.ceilings)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, label, time.perf_counter() - started)


if __name__ == "__main__":
    main()
