"""The eviction policies' contract, their exact orders, and the default's prefix awareness."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bench.eviction_replay import (
    ConversationWorkload,
    replay_prefix_trace,
    synthetic_conversations,
)
from kvcache.eviction import (
    POLICIES,
    EvictionPolicy,
    LRUPolicy,
    S3FIFOPolicy,
    ShoalDefaultPolicy,
    make_policy,
)

Policy = EvictionPolicy[Any]


def nothing_pinned(key: object) -> bool:
    return False


def pinned(*keys: int) -> Any:
    return frozenset(keys).__contains__


def insert_chain(policy: Policy, *keys: int) -> None:
    """Insert ``keys`` as one prefix chain, root first (as the store commits them)."""
    parent = None
    for key in keys:
        policy.insert(key, parent)
        parent = key


def drain(policy: Policy) -> list[int]:
    """Every victim, in order, until the policy is empty."""
    victims = []
    while (victim := policy.pop_victim(nothing_pinned)) is not None:
        victims.append(victim)
    return victims


def hit_ratio(name: str, requests: Sequence[Sequence[int]], capacity: int) -> float:
    hits, total = replay_prefix_trace(requests, make_policy(name, capacity), capacity)
    return hits / total


class PolicyContract:
    """What every policy promises; each policy's test class inherits this."""

    policy_name: ClassVar[str]

    def make(self, capacity_blocks: int = 100) -> Policy:
        return make_policy(self.policy_name, capacity_blocks)

    def test_is_registered_under_its_name(self) -> None:
        assert self.make().name == self.policy_name
        assert POLICIES[self.policy_name](10).name == self.policy_name

    def test_starts_empty_and_has_no_victim(self) -> None:
        policy = self.make()
        assert len(policy) == 0
        assert 1 not in policy
        assert policy.pop_victim(nothing_pinned) is None

    def test_inserted_keys_are_resident(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2)
        policy.insert(3, None)
        assert len(policy) == 3
        assert 1 in policy and 2 in policy and 3 in policy
        assert 4 not in policy

    def test_touch_keeps_a_key_resident(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2)
        policy.touch(1)
        policy.touch(1)
        assert len(policy) == 2 and 1 in policy

    def test_remove_forgets_a_key_and_ignores_unknown_ones(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2, 3)
        policy.remove(2)
        policy.remove(2)
        policy.remove(99)
        assert len(policy) == 2
        assert 2 not in policy
        assert sorted(drain(policy)) == [1, 3]

    def test_pop_victim_forgets_and_returns_each_key_once(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2, 3)
        insert_chain(policy, 10, 11)
        policy.touch(10)
        victims = drain(policy)
        assert sorted(victims) == [1, 2, 3, 10, 11]
        assert len(policy) == 0

    def test_pinned_keys_are_never_victims(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2, 3, 4)
        is_pinned = pinned(1, 2, 4)
        assert policy.pop_victim(is_pinned) == 3
        assert policy.pop_victim(is_pinned) is None
        assert len(policy) == 3, "a call that finds every key pinned evicts nothing"
        assert sorted(drain(policy)) == [1, 2, 4]

    def test_none_when_every_key_is_pinned(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2)
        policy.insert(3, None)
        assert policy.pop_victim(pinned(1, 2, 3)) is None
        assert len(policy) == 3

    def test_an_evicted_key_can_be_inserted_again(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2)
        victim = policy.pop_victim(nothing_pinned)
        assert victim is not None and victim not in policy
        policy.insert(victim, 1 if victim == 2 else None)
        assert victim in policy and len(policy) == 2

    def test_removed_key_can_be_inserted_again(self) -> None:
        policy = self.make()
        insert_chain(policy, 1, 2)
        policy.remove(1)
        policy.insert(1, None)
        assert sorted(drain(policy)) == [1, 2]

    def test_resizing_keeps_every_resident_and_victims_still_come(self) -> None:
        policy = self.make(100)
        insert_chain(policy, 1, 2, 3, 4)
        policy.touch(2)
        policy.resize(2)
        assert len(policy) == 4 and all(key in policy for key in (1, 2, 3, 4))
        policy.resize(1000)
        assert sorted(drain(policy)) == [1, 2, 3, 4]


class TestLRU(PolicyContract):
    policy_name = "lru"

    def test_least_recently_used_leaves_first(self) -> None:
        policy = LRUPolicy[int]()
        for key in (1, 2, 3, 4):
            policy.insert(key, None)
        policy.touch(2)
        assert drain(policy) == [1, 3, 4, 2]

    def test_a_chain_loses_its_root_first(self) -> None:
        """The failure the default fixes: LRU orders a chain root-first."""
        policy = LRUPolicy[int]()
        insert_chain(policy, 1, 2, 3)
        assert drain(policy) == [1, 2, 3]

    def test_a_pinned_key_at_the_cold_end_becomes_the_hottest(self) -> None:
        policy = LRUPolicy[int]()
        for key in (1, 2, 3):
            policy.insert(key, None)
        assert policy.pop_victim(pinned(1)) == 2
        assert drain(policy) == [3, 1]


class TestS3FIFO(PolicyContract):
    """Capacity 20: the small queue holds 10% (2 keys), the ghost 18 keys."""

    policy_name = "s3fifo"

    def make_s3fifo(self) -> S3FIFOPolicy[int]:
        return S3FIFOPolicy(20)

    def test_one_hit_wonders_leave_the_small_queue_in_insertion_order(self) -> None:
        policy = self.make_s3fifo()
        for key in (1, 2, 3):
            policy.insert(key, None)
        assert drain(policy) == [1, 2, 3]

    def test_a_key_read_in_small_moves_to_main_which_waits_while_small_holds_its_share(
        self,
    ) -> None:
        policy = self.make_s3fifo()
        for key in (1, 2, 3, 4):
            policy.insert(key, None)
        policy.touch(1)
        assert drain(policy) == [2, 3, 1, 4]

    def test_a_key_the_ghost_remembers_is_inserted_into_main(self) -> None:
        policy = self.make_s3fifo()
        for key in (1, 2, 3):
            policy.insert(key, None)
        assert policy.pop_victim(nothing_pinned) == 1
        policy.insert(1, None)
        assert drain(policy) == [2, 1, 3], "without the ghost, 1 would leave last"

    def test_main_reinserts_read_keys_and_frequency_saturates_at_three(self) -> None:
        policy = self.make_s3fifo()
        for key in (1, 2, 3):
            policy.insert(key, None)
        assert [policy.pop_victim(nothing_pinned) for _ in range(2)] == [1, 2]
        policy.insert(1, None)  # both return from the ghost into main, 1 ahead of 2
        policy.insert(2, None)
        for _ in range(5):
            policy.touch(1)
        for _ in range(4):
            policy.touch(2)
        policy.insert(4, None)  # small: 3, 4 (its 10% share is 2 keys)
        assert policy.pop_victim(nothing_pinned) == 3, "small holds its share: its tail first"
        # Then small is below its share, so main goes first: 1 and 2 both saturated at
        # frequency 3, take three passes each, and leave in main's FIFO order.
        assert drain(policy) == [1, 2, 4]


class TestShoalDefault(PolicyContract):
    """Below one turnover of accesses the miniatures have not spoken: share 0, so the
    default orders blocks like LRU, but by chain (children colder than parents)."""

    policy_name = "default"

    def test_a_chain_leaves_leaf_first(self) -> None:
        policy = ShoalDefaultPolicy[int](100)
        insert_chain(policy, 1, 2, 3)
        assert drain(policy) == [3, 2, 1]

    def test_chains_leave_in_least_recently_used_order(self) -> None:
        policy = ShoalDefaultPolicy[int](100)
        insert_chain(policy, 1, 2)
        insert_chain(policy, 10, 11)
        policy.touch(1)
        policy.touch(2)
        assert drain(policy) == [11, 10, 2, 1]

    def test_the_unread_suffix_of_a_hit_chain_leaves_before_other_chains(self) -> None:
        policy = ShoalDefaultPolicy[int](100)
        insert_chain(policy, 1, 2, 3)
        insert_chain(policy, 10, 11)
        policy.touch(1)  # a request hit 1 and went on elsewhere
        assert drain(policy) == [3, 2, 11, 10, 1]

    def test_when_a_parent_is_evicted_its_descendants_leave_next(self) -> None:
        policy = ShoalDefaultPolicy[int](100)
        insert_chain(policy, 1, 2, 3, 4)
        insert_chain(policy, 10)
        # Pins make the policy evict 2 while 3 and 4 are resident: they are orphans now,
        # can never hit, and leave before older blocks that still can (1, then 10).
        assert policy.pop_victim(pinned(3, 4)) == 2
        assert drain(policy) == [3, 4, 1, 10]

    def test_a_parent_inserted_again_takes_back_its_orphans(self) -> None:
        policy = ShoalDefaultPolicy[int](100)
        insert_chain(policy, 1, 2, 3)
        assert policy.pop_victim(pinned(3)) == 2  # 3 is orphaned, at the cold end
        policy.insert(9, None)
        policy.touch(1)
        policy.insert(2, 1)  # the chain is whole again: 3 is linked just below 2
        assert drain(policy) == [9, 3, 2, 1], "an orphan would have left before 9"

    def test_remove_does_not_orphan_children(self) -> None:
        """The store removes a block when it moves up a tier; its children stay put."""
        policy = ShoalDefaultPolicy[int](100)
        insert_chain(policy, 1, 2, 3)
        insert_chain(policy, 10)
        policy.remove(2)
        assert drain(policy) == [3, 1, 10]

    def test_a_scan_does_not_flush_a_frequently_read_working_set(self) -> None:
        """Rounds of: 8 conversations (25 blocks, read twice), then a scan of 3 one-off
        documents (96 blocks) through a 64-block cache. Measured: hits of each round's
        first read of the conversations, the one that comes right after a scan."""
        capacity = 64
        conversations = [[0, *range(100 * c + 1, 100 * c + 4)] for c in range(1, 9)]
        scan = iter(range(10_000, 1_000_000))
        for name, expected in (("lru", pytest.approx(0.25)), ("default", 1.0)):
            policy = make_policy(name, capacity)
            ratios = []
            for _ in range(30):
                hits, total = replay_prefix_trace(conversations, policy, capacity)
                ratios.append(hits / total)
                replay_prefix_trace(conversations, policy, capacity)
                documents = [[0, *(next(scan) for _ in range(32))] for _ in range(3)]
                replay_prefix_trace(documents, policy, capacity)
            # LRU keeps only the shared system block 0; the default's miniatures find
            # within a few rounds that protecting read blocks wins, and it then holds.
            assert ratios[-1] == expected, (name, ratios)
            assert min(ratios[10:]) == expected, (name, ratios)


class TestReplay:
    def test_a_request_hits_the_longest_resident_prefix(self) -> None:
        requests = [[1, 2, 3], [1, 2, 4], [5, 2, 3]]
        assert replay_prefix_trace(requests, LRUPolicy[int](), 10) == (2, 9)

    def test_a_request_longer_than_the_cache_stores_what_fits(self) -> None:
        policy = LRUPolicy[int]()
        assert replay_prefix_trace([[1, 2, 3, 4, 5]], policy, 3) == (0, 5)
        assert sorted(drain(policy)) == [1, 2, 3]

    def test_a_request_does_not_evict_its_own_prefix_to_store_its_suffix(self) -> None:
        policy = LRUPolicy[int]()
        assert replay_prefix_trace([[9], [1, 2, 3, 4]], policy, 3) == (0, 5)
        assert sorted(drain(policy)) == [1, 2, 3], "9 made room for 3; nothing for 4"

    def test_rejects_an_empty_cache(self) -> None:
        with pytest.raises(ValueError, match="at least one block"):
            replay_prefix_trace([[1]], LRUPolicy[int](), 0)

    def test_the_synthetic_workload_is_seeded(self) -> None:
        workload = ConversationWorkload(num_requests=300, num_sessions=30, scan_period=50)
        first = synthetic_conversations(workload, seed=7)
        assert first == synthetic_conversations(workload, seed=7)
        assert first != synthetic_conversations(workload, seed=8)
        assert len(first) == 300

    def test_default_is_not_below_lru_on_the_synthetic_conversations(self) -> None:
        workload = ConversationWorkload(
            num_requests=3_000, num_sessions=300, scan_period=100, scan_burst=5
        )
        requests = synthetic_conversations(workload, seed=0)
        unique_blocks = len({key for request in requests for key in request})
        for fraction in (0.05, 0.1):
            capacity = int(unique_blocks * fraction)
            lru = hit_ratio("lru", requests, capacity)
            default = hit_ratio("default", requests, capacity)
            assert default >= lru, f"at {fraction:.0%}: default {default:.4f} < lru {lru:.4f}"


def test_make_policy_names_the_choices_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="default, lru, s3fifo"):
        make_policy("arc", 10)


# -- random operation sequences ---------------------------------------------------

KEYS = st.integers(min_value=0, max_value=24)


class PolicyMachine(RuleBasedStateMachine):
    """Random inserts, touches, removes and pinned evictions against a set of keys."""

    policy_name: ClassVar[str]

    def __init__(self) -> None:
        super().__init__()
        # A tiny capacity hint: the default's miniatures decide every few accesses.
        self.policy = make_policy(self.policy_name, 6)
        self.resident: set[int] = set()

    @rule(key=KEYS, parent=st.one_of(st.none(), KEYS))
    def insert(self, key: int, parent: int | None) -> None:
        if key in self.resident or key == parent:
            return
        self.policy.insert(key, parent)
        self.resident.add(key)

    @precondition(lambda self: self.resident)
    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        self.policy.touch(data.draw(st.sampled_from(sorted(self.resident))))

    @rule(key=KEYS)
    def remove(self, key: int) -> None:
        self.policy.remove(key)
        self.resident.discard(key)

    @rule(pins=st.frozensets(KEYS))
    def pop_victim(self, pins: frozenset[int]) -> None:
        victim = self.policy.pop_victim(pins.__contains__)
        if victim is None:
            assert self.resident <= pins, "None although an unpinned key is resident"
            return
        assert victim in self.resident, f"victim {victim} is not resident"
        assert victim not in pins, f"pinned key {victim} was evicted"
        self.resident.remove(victim)

    @invariant()
    def membership_matches(self) -> None:
        assert len(self.policy) == len(self.resident)
        for key in range(25):
            assert (key in self.policy) == (key in self.resident), key


class LRUMachine(PolicyMachine):
    policy_name = "lru"


class S3FIFOMachine(PolicyMachine):
    policy_name = "s3fifo"


class ShoalDefaultMachine(PolicyMachine):
    policy_name = "default"


_STATEFUL = settings(max_examples=60, stateful_step_count=60, deadline=None)
LRUMachine.TestCase.settings = _STATEFUL
S3FIFOMachine.TestCase.settings = _STATEFUL
ShoalDefaultMachine.TestCase.settings = _STATEFUL
TestLRUStateful = LRUMachine.TestCase
TestS3FIFOStateful = S3FIFOMachine.TestCase
TestShoalDefaultStateful = ShoalDefaultMachine.TestCase


def test_the_default_samples_block_keys_with_a_hash_stable_across_processes() -> None:
    from kvcache.eviction import stable_key_hash

    key = bytes(range(16))
    assert stable_key_hash(key) == int.from_bytes(key[:8], "little")
    assert stable_key_hash(12345) == 12345
    assert stable_key_hash(b"\x01\x02") == 0x0201, "keys shorter than 8 bytes: all of them"


# -- the default's miniature caches -------------------------------------------------


class TextbookSLRU:
    """The miniature cache as first written (before issue 17's fast path): a segmented
    LRU with a ghost, bounds restored by loops. The fast miniatures must hit exactly
    where this one does, or the default's share (and every decision) would change."""

    def __init__(self, capacity: int, protected_share: float) -> None:
        self.capacity = max(1, capacity)
        self.protected_capacity = int(self.capacity * protected_share)
        self.probation: dict[int, None] = {}
        self.protected: dict[int, None] = {}
        self.ghost: dict[int, None] = {}

    def access(self, key: int) -> bool:
        if key in self.protected:
            del self.protected[key]
            self.protected[key] = None
            return True
        hit = self.probation.pop(key, False) is None
        returning = hit or self.ghost.pop(key, False) is None
        if returning and self.protected_capacity:
            self.protected[key] = None
            while len(self.protected) > self.protected_capacity:
                demoted = next(iter(self.protected))
                del self.protected[demoted]
                self.probation[demoted] = None
        else:
            self.probation[key] = None
        while len(self.probation) + len(self.protected) > self.capacity:
            evicted = next(iter(self.probation))
            del self.probation[evicted]
            self.ghost[evicted] = None
            if len(self.ghost) > self.capacity:
                del self.ghost[next(iter(self.ghost))]
        return hit


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=12),
    share=st.sampled_from([0.0, 0.125, 0.25, 0.5]),
    accesses=st.lists(st.integers(min_value=0, max_value=30), max_size=300),
)
def test_each_miniature_hits_exactly_where_the_textbook_slru_does(
    capacity: int, share: float, accesses: list[int]
) -> None:
    from kvcache.eviction import _miniature

    fast, textbook = _miniature(capacity, share), TextbookSLRU(capacity, share)
    assert [fast.access(key) for key in accesses] == [textbook.access(k) for k in accesses]


def test_after_a_resize_touches_are_sampled_by_the_key_hash_at_the_new_rate() -> None:
    """A resize changes the sampling rate; a key inserted before it is sampled as one
    hashed afresh would be (the default's sample is a function of the key alone)."""
    policy = ShoalDefaultPolicy[int](100)  # rate 1: every key is observed
    keys = range(1, 400)
    insert_chain(policy, *keys)
    policy.resize(1 << 20)  # rate 64; a decision every 16,384 observed keys
    chooser = policy._chooser
    before = chooser._until_decision
    for key in keys:
        policy.touch(key)
    mix, mask = 0x9E3779B97F4A7C15, (1 << 64) - 1
    sampled = [key for key in keys if not ((key * mix & mask) >> 32) % 64]
    assert before - chooser._until_decision == len(sampled) > 0
