"""The offline rows of ``bench/eviction.py``: what knowing the future at each event wins.

These are measuring instruments, not policies the daemon runs: each test pins the one
piece of foresight a row is allowed, against LRU on the same requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.eviction import BeladyPolicy, Clock, ReuseOraclePolicy
from bench.eviction_replay import replay_prefix_trace
from kvcache.eviction import LRUPolicy


def replay_oracle(
    requests: Sequence[Sequence[int]], capacity: int, *, knows_new: bool, knows_hits: bool
) -> tuple[int, int]:
    clock = Clock()
    policy = ReuseOraclePolicy(requests, clock, knows_new=knows_new, knows_hits=knows_hits)
    return replay_prefix_trace(clock.ticking(requests), policy, capacity)


def replay_lru(requests: Sequence[Sequence[int]], capacity: int) -> tuple[int, int]:
    return replay_prefix_trace(requests, LRUPolicy[int](), capacity)


# Block 2 is stored once and never requested again; LRU evicts the older block 1 instead.
NEW_BLOCK_NEVER_REUSED = [[1, 2], [3], [1]]
# Block 1's hit in the third request is its last use; LRU evicts block 2, needed later.
HIT_WAS_THE_LAST_USE = [[1], [2], [1], [3], [2]]


def test_lru_misses_both_reuses() -> None:
    assert replay_lru(NEW_BLOCK_NEVER_REUSED, 2) == (0, 4)
    assert replay_lru(HIT_WAS_THE_LAST_USE, 2) == (1, 5)


def test_oracle_new_evicts_a_block_known_dead_at_its_insertion_first() -> None:
    assert replay_oracle(NEW_BLOCK_NEVER_REUSED, 2, knows_new=True, knows_hits=False) == (1, 4)
    assert replay_oracle(HIT_WAS_THE_LAST_USE, 2, knows_new=True, knows_hits=False) == (1, 5)


def test_oracle_hit_evicts_a_block_whose_hit_was_its_last_use_first() -> None:
    assert replay_oracle(HIT_WAS_THE_LAST_USE, 2, knows_new=False, knows_hits=True) == (2, 5)
    assert replay_oracle(NEW_BLOCK_NEVER_REUSED, 2, knows_new=False, knows_hits=True) == (0, 4)


def test_pinned_blocks_are_passed_over_and_an_all_pinned_cache_has_no_victim() -> None:
    requests = [[1], [2]]
    clock = Clock()
    policy = ReuseOraclePolicy(requests, clock, knows_new=True, knows_hits=True)
    for _ in clock.ticking(requests):
        break
    policy.insert(1, None)
    policy.insert(2, None)
    assert policy.pop_victim(frozenset({1}).__contains__) == 2
    assert policy.pop_victim(frozenset({1}).__contains__) is None
    assert len(policy) == 1 and 1 in policy


def test_belady_keeps_the_block_needed_soonest() -> None:
    requests = [[1], [2], [3], [1], [2]]
    clock = Clock()
    hits, total = replay_prefix_trace(clock.ticking(requests), BeladyPolicy(requests, clock), 2)
    assert (hits, total) == (1, 5), "2, needed last, made room for 3, so 1 hits"
    assert replay_lru(requests, 2) == (0, 5)
