"""The cluster index's contract: holders per key with tiers, prefix runs, O(1) drops."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvcache.cluster.index import ClusterIndex, Holder, PrefixMatch
from kvcache.tiers import Tier

SHM, DRAM, SSD = int(Tier.SHM), int(Tier.DRAM), int(Tier.SSD)


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def keys(*ids: int) -> list[bytes]:
    return [key(i) for i in ids]


def chain(n: int) -> list[bytes]:
    return keys(*range(n))


def index_with(**held: list[int]) -> ClusterIndex:
    """An index where each member (keyword) holds the given key ids in SHM, joined in order."""
    index = ClusterIndex()
    for node, ids in held.items():
        index.store(node, keys(*ids), [SHM] * len(ids))
    return index


def sweep_all(index: ClusterIndex, limit: int = 10_000) -> int:
    """Run ``sweep`` to completion; returns how many calls it took."""
    calls = 1
    while index.sweep(limit):
        calls += 1
    return calls


class TestHolders:
    def test_a_stored_key_names_its_holder_and_tier(self) -> None:
        index = ClusterIndex()
        index.store("a", keys(1, 2), [SHM, SSD])
        assert index.holders(key(1)) == [Holder("a", SHM)]
        assert index.holders(key(2)) == [Holder("a", SSD)]
        assert index.holders(key(3)) == []

    def test_every_tier_value_is_kept_apart_from_the_neighbouring_slots(self) -> None:
        index = index_with(a=[], b=[], c=[])
        for tier in (SHM, DRAM, SSD):
            index.store("b", keys(1), [tier])
            assert index.holders(key(1)) == [Holder("b", tier)]

    def test_holders_are_listed_in_join_order(self) -> None:
        index = ClusterIndex()
        index.store("z", keys(1), [DRAM])
        index.store("a", keys(1), [SHM])
        index.store("m", keys(1), [SSD])
        assert index.holders(key(1)) == [Holder("z", DRAM), Holder("a", SHM), Holder("m", SSD)]

    def test_storing_again_moves_the_key_to_the_new_tier_without_counting_it_twice(self) -> None:
        index = index_with(a=[1, 2])
        index.store("a", keys(1), [SSD])
        assert index.holders(key(1)) == [Holder("a", SSD)]
        assert index.num_blocks("a") == 2

    def test_remove_forgets_only_that_members_copy(self) -> None:
        index = index_with(a=[1, 2], b=[1])
        index.remove("a", keys(1))
        assert index.holders(key(1)) == [Holder("b", SHM)]
        assert index.num_blocks("a") == 1
        index.remove("b", keys(1))
        assert index.holders(key(1)) == []
        assert len(index) == 1, "a key with no holder has no entry"

    def test_removing_what_is_not_held_changes_nothing(self) -> None:
        index = index_with(a=[1], b=[2])
        index.remove("a", keys(2, 3))
        index.remove("stranger", keys(1, 2))
        assert index.holders(key(1)) == [Holder("a", SHM)]
        assert index.holders(key(2)) == [Holder("b", SHM)]
        assert (index.num_blocks("a"), index.num_blocks("b")) == (1, 1)
        assert index.members == ["a", "b"], "remove never makes a member"

    def test_counts_per_member_and_in_all(self) -> None:
        index = index_with(a=[1, 2, 3], b=[3, 4])
        assert (index.num_blocks("a"), index.num_blocks("b"), index.num_blocks("c")) == (3, 2, 0)
        assert index.num_blocks() == 5, "a key held by two members counts once per member"
        assert len(index) == 4, "one entry per distinct key"
        index.store("b", keys(3, 3, 5), [SHM, DRAM, SHM])
        assert index.num_blocks("b") == 3, "a key repeated in one store counts once"

    def test_keys_of_lists_exactly_what_a_member_holds(self) -> None:
        index = index_with(a=[1, 2, 3], b=[3, 4])
        assert sorted(index.keys_of("a")) == keys(1, 2, 3)
        assert sorted(index.keys_of("b")) == keys(3, 4)
        assert index.keys_of("c") == []

    def test_members_are_sorted_names(self) -> None:
        assert index_with(b=[1], a=[2]).members == ["a", "b"]


class TestLongestPrefix:
    def test_runs_are_ordered_longest_first_then_by_name(self) -> None:
        index = index_with(c=[0, 1], b=[0, 1, 2, 3], a=[0, 1])
        assert index.longest_prefix(chain(6)) == PrefixMatch(
            start=0, length=4, runs=(("b", 4), ("a", 2), ("c", 2))
        )

    def test_the_prefix_spans_holders_even_when_no_one_holds_all_of_it(self) -> None:
        index = index_with(a=[0, 1], b=[2, 3])
        match = index.longest_prefix(chain(5))
        assert (match.length, match.runs) == (4, (("a", 2),))

    def test_a_holder_whose_run_breaks_keeps_only_its_contiguous_part(self) -> None:
        index = index_with(a=[0, 1, 3, 4], b=[0, 1, 2, 3, 4])
        assert index.longest_prefix(chain(5)).runs == (("b", 5), ("a", 2))

    def test_a_holder_missing_the_first_key_has_no_run(self) -> None:
        index = index_with(a=[0, 1, 2], b=[1, 2])
        assert index.longest_prefix(chain(3)) == PrefixMatch(0, 3, (("a", 3),))

    def test_the_first_key_no_one_holds_ends_the_prefix(self) -> None:
        index = index_with(a=[0, 1, 3], b=[0, 1, 3])
        assert index.longest_prefix(chain(4)) == PrefixMatch(0, 2, (("a", 2), ("b", 2)))

    def test_start_skips_the_keys_held_locally(self) -> None:
        index = index_with(a=[2, 3, 4], b=[0, 1, 2, 3])
        assert index.longest_prefix(chain(6), start=2) == PrefixMatch(
            start=2, length=3, runs=(("a", 5), ("b", 4))
        )

    def test_no_holder_or_start_at_the_end_is_an_empty_match(self) -> None:
        index = index_with(a=[1])
        assert index.longest_prefix(chain(3)) == PrefixMatch(0, 0, ())
        assert index.longest_prefix(chain(3), start=3) == PrefixMatch(3, 0, ())
        assert index.longest_prefix([]) == PrefixMatch(0, 0, ())

    def test_a_key_held_here_neither_ends_the_prefix_nor_breaks_a_run(self) -> None:
        index = index_with(a=[0, 1, 3, 4], b=[0, 1])
        here = set(keys(2))
        assert index.longest_prefix(chain(5)) == PrefixMatch(0, 2, (("a", 2), ("b", 2)))
        assert index.longest_prefix(chain(5), held_here=here.__contains__) == PrefixMatch(
            0, 5, (("a", 5), ("b", 3))
        ), "b's run goes on through key 2, which needs no fetch, and breaks at key 3"

    def test_keys_held_here_at_the_end_extend_the_prefix(self) -> None:
        index = index_with(a=[0, 1])
        here = set(keys(2, 3))
        assert index.longest_prefix(chain(5), held_here=here.__contains__) == PrefixMatch(
            0, 4, (("a", 4),)
        )

    def test_a_key_held_neither_here_nor_by_a_peer_still_ends_the_prefix(self) -> None:
        index = index_with(a=[0, 2])
        here = set(keys(3))
        assert index.longest_prefix(chain(4), held_here=here.__contains__) == PrefixMatch(
            0, 1, (("a", 1),)
        )

    def test_the_tier_does_not_matter_for_the_prefix(self) -> None:
        index = ClusterIndex()
        index.store("a", chain(3), [SHM, DRAM, SSD])
        assert index.longest_prefix(chain(3)).runs == (("a", 3),)


class TestEngineStreams:
    """Members named ``<node>/<engine>`` are engines' GPUs: located, never fetched from."""

    def test_an_engine_is_neither_a_holder_nor_part_of_the_fetchable_prefix(self) -> None:
        index = index_with(**{"a": [0, 1], "a/gpu0": [0, 1, 2]})
        assert index.holders(key(2)) == []
        assert index.holders(key(0)) == [Holder("a", SHM)]
        assert index.longest_prefix(chain(3)) == PrefixMatch(0, 2, (("a", 2),))

    def test_engine_runs_start_at_the_first_key_longest_first(self) -> None:
        index = index_with(**{"a/gpu0": [0, 1], "b/gpu0": [0, 1, 2], "b/gpu1": [1, 2], "c": [0]})
        assert index.engine_runs(chain(4)) == (("b/gpu0", 3), ("a/gpu0", 2))
        assert index.engine_runs([]) == ()

    def test_an_engine_run_breaks_at_its_first_missing_key(self) -> None:
        index = index_with(**{"a/gpu0": [0, 1, 3]})
        assert index.engine_runs(chain(4)) == (("a/gpu0", 2),)

    def test_a_dropped_engine_vanishes_and_its_slot_serves_a_daemon_again(self) -> None:
        index = index_with(**{"a/gpu0": [0]})
        index.drop_member("a/gpu0")
        sweep_all(index)
        index.store("b", keys(0), [SHM])  # reuses the slot
        assert index.engine_runs(chain(1)) == ()
        assert index.holders(key(0)) == [Holder("b", SHM)]


class TestDropAndSweep:
    def test_a_dropped_member_vanishes_from_every_answer_at_once(self) -> None:
        index = index_with(a=[0, 1, 2], b=[0, 1])
        assert index.drop_member("a") == 3
        assert index.holders(key(0)) == [Holder("b", SHM)]
        assert index.holders(key(2)) == []
        assert index.keys_of("a") == []
        assert (index.num_blocks("a"), index.num_blocks()) == (0, 2)
        assert index.members == ["b"]
        assert index.longest_prefix(chain(3)) == PrefixMatch(0, 2, (("b", 2),))
        assert len(index) == 3, "the entries linger until swept"

    def test_dropping_an_unknown_member_is_a_no_op(self) -> None:
        index = index_with(a=[1])
        assert index.drop_member("stranger") == 0
        assert index.sweep() is False, "nothing to sweep"

    def test_clear_is_a_drop(self) -> None:
        index = index_with(a=[1, 2])
        index.clear("a")
        assert (index.members, index.holders(key(1))) == ([], [])

    def test_sweep_clears_dead_entries_in_bounded_steps(self) -> None:
        index = index_with(a=list(range(10)), b=[0, 1])
        index.drop_member("a")
        assert index.sweep(limit=4) is True
        assert index.sweep(limit=4) is True
        assert index.sweep(limit=4) is False, "ten keys, four per step: three steps"
        assert len(index) == 2, "only the keys b holds are left"
        assert index.holders(key(0)) == [Holder("b", SHM)]
        assert index.sweep() is False

    def test_a_swept_slot_is_reused_by_the_next_member_and_starts_empty(self) -> None:
        index = index_with(a=[0, 1], b=[1])
        index.drop_member("a")
        sweep_all(index)
        index.store("c", keys(5), [DRAM])
        assert index._slots["c"] == 0, "c took a's swept slot"
        assert sorted(index.keys_of("c")) == keys(5)
        assert index.holders(key(0)) == []
        assert index.holders(key(1)) == [Holder("b", SHM)]
        assert index.num_blocks("c") == 1

    def test_a_member_joining_before_the_sweep_ends_gets_a_fresh_slot(self) -> None:
        index = index_with(a=[0, 1, 2])
        index.drop_member("a")
        index.sweep(limit=1)
        index.store("c", keys(9), [SHM])
        assert index.keys_of("c") == keys(9)
        assert index.holders(key(1)) == []

    def test_a_rejoining_member_gets_a_fresh_slot_and_none_of_its_old_keys(self) -> None:
        index = index_with(a=[0, 1], b=[0])
        index.drop_member("a")
        index.store("a", keys(1, 7), [DRAM, DRAM])
        assert sorted(index.keys_of("a")) == keys(1, 7)
        assert index.holders(key(0)) == [Holder("b", SHM)]
        assert index.holders(key(1)) == [Holder("a", DRAM)]
        assert index.num_blocks("a") == 2
        sweep_all(index)
        assert index.holders(key(1)) == [Holder("a", DRAM)], "the sweep spares the new slot"
        assert len(index) == 3

    def test_a_member_dropped_mid_sweep_is_swept_before_its_slot_is_reused(self) -> None:
        # b drops after the pass for a already visited key 0, which b also holds: its slot
        # must not be freed with a's at the end of that pass, or the next member inherits
        # b's bit on key 0.
        index = index_with(a=[0, 1, 2], b=[0])
        index.drop_member("a")
        assert index.sweep(limit=1) is True
        index.drop_member("b")
        sweep_all(index, limit=1)
        index.store("c", keys(5), [SHM])
        index.store("d", keys(6), [SHM])
        assert index.holders(key(0)) == []
        assert sorted(index.keys_of("c")) == keys(5)
        assert sorted(index.keys_of("d")) == keys(6)
        assert len(index) == 2

    def test_seventy_members_masks_wider_than_128_bits(self) -> None:
        index = ClusterIndex()
        names = [f"n{i:02d}" for i in range(70)]
        for i, node in enumerate(names):  # member i holds keys 0..i; slot i, bits 2i..2i+1
            index.store(node, chain(i + 1), [i % 3] * (i + 1))
        assert index.holders(key(0)) == [Holder(node, i % 3) for i, node in enumerate(names)]
        assert index.holders(key(69)) == [Holder("n69", 69 % 3)]
        match = index.longest_prefix(chain(80))
        assert match.length == 70
        assert match.runs == tuple((node, i + 1) for i, node in reversed(list(enumerate(names))))

        index.drop_member("n69")
        index.drop_member("n00")
        assert index.longest_prefix(chain(80)).length == 69
        assert index.holders(key(69)) == []
        assert [h.node for h in index.holders(key(0))] == names[1:69]
        sweep_all(index, limit=7)
        index.store("late", keys(69), [SSD])
        assert index.holders(key(69)) == [Holder("late", SSD)]
        assert index.holders(key(0))[0].node == "n01", "a reused low slot holds nothing old"
        assert index.num_blocks() == sum(range(2, 70)) + 1


NODES = ["a", "b", "c"]


class IndexMachine(RuleBasedStateMachine):
    """Any mix of stores, removes, drops and partial sweeps answers like a plain dict."""

    def __init__(self) -> None:
        super().__init__()
        self.index = ClusterIndex()
        self.model: dict[str, dict[bytes, int]] = {}  # live member -> key -> tier

    @rule(
        node=st.sampled_from(NODES),
        ids=st.lists(st.integers(0, 7), max_size=4),
        tier=st.sampled_from([SHM, DRAM, SSD]),
    )
    def store(self, node: str, ids: list[int], tier: int) -> None:
        self.index.store(node, keys(*ids), [tier] * len(ids))
        self.model.setdefault(node, {}).update(dict.fromkeys(keys(*ids), tier))

    @rule(node=st.sampled_from(NODES), ids=st.lists(st.integers(0, 7), max_size=4))
    def remove(self, node: str, ids: list[int]) -> None:
        self.index.remove(node, keys(*ids))
        for k in keys(*ids):
            self.model.get(node, {}).pop(k, None)

    @rule(node=st.sampled_from(NODES))
    def drop(self, node: str) -> None:
        assert self.index.drop_member(node) == len(self.model.pop(node, {}))

    @rule(limit=st.integers(1, 3))
    def sweep(self, limit: int) -> None:
        self.index.sweep(limit)

    @invariant()
    def answers_match_the_model(self) -> None:
        assert self.index.members == sorted(self.model)
        for i in range(8):
            expected = {(node, held[key(i)]) for node, held in self.model.items() if key(i) in held}
            assert {(h.node, h.tier) for h in self.index.holders(key(i))} == expected
        for node in NODES:
            held = self.model.get(node, {})
            assert sorted(self.index.keys_of(node)) == sorted(held)
            assert self.index.num_blocks(node) == len(held)
        assert self.index.num_blocks() == sum(len(held) for held in self.model.values())

    @invariant()
    def the_prefix_is_what_the_model_says(self) -> None:
        keys8 = chain(8)
        length = 0
        while length < 8 and any(keys8[length] in held for held in self.model.values()):
            length += 1
        runs = []
        for node, held in self.model.items():
            upto = 0
            while upto < 8 and keys8[upto] in held:
                upto += 1
            if upto:
                runs.append((node, upto))
        runs.sort(key=lambda run: (-run[1], run[0]))
        assert self.index.longest_prefix(keys8) == PrefixMatch(0, length, tuple(runs))


TestIndexMachine = IndexMachine.TestCase
TestIndexMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
