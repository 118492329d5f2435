"""GpuPrefixTracker: vLLM block events in, resident Shoal chunk keys out."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache.cluster.engine_events import (
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
)
from kvcache.cluster.gpu_prefixes import GpuPrefixTracker
from kvcache.cluster.messages import CLEARED_KEY, OP_CLEARED, OP_ON_GPU, OP_REMOVED
from kvcache.keys import Namespace, chain_keys

NS = Namespace(model="tracker-test@1")
TOKENS = list(range(1000, 1128))  # 128 tokens


def h(index: int, branch: str = "") -> bytes:
    """A vLLM-like block hash (32 bytes) for block ``index`` of a chain."""
    return f"{branch}block-{index}".encode().ljust(32, b".")


def store(
    hashes: Sequence[BlockHash],
    tokens: Sequence[int],
    block_size: int,
    parent: BlockHash | None = None,
    **overrides: object,
) -> BlockStored:
    values: dict[str, object] = {
        "block_hashes": list(hashes),
        "parent_block_hash": parent,
        "token_ids": list(tokens),
        "block_size": block_size,
        "lora": False,
        "medium": "GPU",
        "extra_keyed": (),
        "group_idx": 0,
        **overrides,
    }
    return BlockStored(**values)  # type: ignore[arg-type]


def remove(*hashes: BlockHash, medium: str | None = "GPU") -> BlockRemoved:
    return BlockRemoved(list(hashes), medium, 0)


def chain(num_blocks: int, block_size: int, branch: str = "") -> BlockStored:
    """One event storing the first ``num_blocks`` blocks of TOKENS from the root."""
    return store(
        [h(i, branch) for i in range(num_blocks)], TOKENS[: num_blocks * block_size], block_size
    )


def keys(chunk_tokens: int, num_tokens: int, tokens: Sequence[int] = TOKENS) -> list[bytes]:
    return list(chain_keys(NS, tokens[:num_tokens], chunk_tokens))


class TestMapping:
    def test_with_chunk_equal_to_block_each_block_is_one_key(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(4, 16)])
        want = keys(16, 64)
        assert tracker.take_events() == [(OP_ON_GPU, k) for k in want]
        assert tracker.run_length(want) == 4
        assert tracker.statistics().num_blocks == 4

    def test_with_chunk_of_four_blocks_a_key_appears_with_its_fourth_block(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        want = keys(16, 32)
        tracker.apply([store([h(0), h(1), h(2)], TOKENS[:12], 4)])
        assert tracker.take_events() == []
        tracker.apply([store([h(3)], TOKENS[12:16], 4, parent=h(2))])
        assert tracker.take_events() == [(OP_ON_GPU, want[0])]
        tracker.apply([store([h(i) for i in range(4, 8)], TOKENS[16:32], 4, parent=h(3))])
        assert tracker.take_events() == [(OP_ON_GPU, want[1])]
        assert tracker.run_length([*want, b"x" * 16]) == 2

    def test_keys_are_those_an_engine_side_client_computes(self) -> None:
        tracker = GpuPrefixTracker(NS.digest, 32)  # a namespace digest works too
        tracker.apply([chain(8, 16)])
        assert tracker.snapshot() == keys(32, 128)

    def test_a_block_larger_than_a_chunk_completes_several_keys(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(2, 32)])
        assert [k for _, k in tracker.take_events()] == keys(16, 64)

    def test_int_hashes_map_like_bytes(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([store([11, 12], TOKENS[:32], 16)])
        tracker.apply([store([13], TOKENS[32:48], 16, parent=12)])
        assert tracker.snapshot() == keys(16, 48)

    def test_branches_share_their_prefix_keys(self) -> None:
        tracker = GpuPrefixTracker(NS, 32)
        other = [*TOKENS[:16], *range(5000, 5016)]
        tracker.apply([store([h(0), h(1)], TOKENS[:32], 16)])
        tracker.apply([store([h(1, "b")], other[16:32], 16, parent=h(0))])
        assert set(tracker.snapshot()) == {*keys(32, 32), *keys(32, 32, other)}


class TestRemoval:
    def test_removing_a_block_removes_the_chunk_holding_it_and_only_that(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(8, 4)])
        first, second = keys(16, 32)
        tracker.take_events()
        tracker.apply([remove(h(5))])  # mid-chunk: the second chunk is no longer whole
        assert tracker.take_events() == [(OP_REMOVED, second)]
        assert tracker.snapshot() == [first]

    def test_removing_a_branch_point_removes_every_chunk_through_it(self) -> None:
        tracker = GpuPrefixTracker(NS, 32)
        other = [*TOKENS[:16], *range(5000, 5016)]
        tracker.apply([store([h(0), h(1)], TOKENS[:32], 16)])
        tracker.apply([store([h(1, "b")], other[16:32], 16, parent=h(0))])
        tracker.take_events()
        tracker.apply([remove(h(1, "b"))])
        assert tracker.take_events() == [(OP_REMOVED, keys(32, 32, other)[0])]
        tracker.apply([remove(h(0))])
        assert tracker.take_events() == [(OP_REMOVED, keys(32, 32)[0])]
        assert tracker.snapshot() == []

    def test_a_chain_announced_again_comes_back(self) -> None:
        # vLLM re-announces prefix-cache hits from the root (emit_cached_block_events).
        tracker = GpuPrefixTracker(NS, 16)
        first, second = keys(16, 32)
        tracker.apply([chain(8, 4)])
        tracker.apply([remove(h(1))])
        assert tracker.snapshot() == [second], "the second chunk's blocks are all still there"
        tracker.take_events()
        tracker.apply([chain(8, 4)])
        assert tracker.take_events() == [(OP_ON_GPU, first)]

    def test_a_key_reached_by_two_block_chains_stays_while_one_remains(self) -> None:
        # Equal tokens under different vLLM hashes (e.g. lookahead hashing): one Shoal key.
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(2, 16), chain(2, 16, branch="x")])
        assert len(tracker.take_events()) == 2
        tracker.apply([remove(h(1))])
        assert tracker.take_events() == []
        tracker.apply([remove(h(1, "x"))])
        assert tracker.take_events() == [(OP_REMOVED, keys(16, 32)[1])]

    def test_removal_in_another_medium_leaves_the_gpu_copy(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(2, 16), remove(h(1), medium="CPU")])
        assert tracker.snapshot() == keys(16, 32)

    def test_removing_an_unknown_block_changes_nothing(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(1, 16), remove(b"never seen")])
        assert tracker.snapshot() == keys(16, 16)

    def test_all_blocks_cleared_clears_the_engine(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([chain(3, 16)])
        tracker.take_events()
        tracker.apply([AllBlocksCleared()])
        assert tracker.take_events() == [(OP_CLEARED, CLEARED_KEY)]
        assert tracker.snapshot() == [] and tracker.statistics().num_blocks == 0
        tracker.apply([store([h(3)], TOKENS[48:64], 16, parent=h(2))])
        assert tracker.snapshot() == [], "the old chain is forgotten"


class TestNotMapped:
    def test_an_unknown_parent_is_counted_and_skipped(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([store([h(5)], TOKENS[:16], 16, parent=h(4))])
        assert tracker.snapshot() == []
        assert tracker.statistics().skipped == {"unknown_parent": 1}
        assert tracker.take_skipped() == {"unknown_parent": 1}
        assert tracker.take_skipped() == {}

    def test_lora_blocks_and_their_children_are_not_mapped(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([store([h(0)], TOKENS[:16], 16, lora=True)])
        tracker.apply([store([h(1)], TOKENS[16:32], 16, parent=h(0))])
        assert tracker.snapshot() == []
        assert tracker.statistics().skipped == {"lora": 1, "tainted": 1}

    def test_extra_keys_stop_the_mapping_at_the_first_keyed_block(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        event = store([h(0), h(1), h(2)], TOKENS[:48], 16, extra_keyed=(False, True, False))
        tracker.apply([event])
        assert tracker.snapshot() == keys(16, 16)
        assert tracker.statistics().skipped == {"extra_keys": 1, "tainted": 1}

    def test_other_media_and_groups_are_not_mapped(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([store([h(0)], TOKENS[:16], 16, medium="CPU")])
        tracker.apply([store([h(0)], TOKENS[:16], 16, group_idx=1)])
        assert tracker.snapshot() == []
        assert tracker.statistics().skipped == {"medium": 1, "group": 1}

    def test_an_event_whose_tokens_do_not_fill_its_blocks_is_skipped(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([store([h(0), h(1)], TOKENS[:20], 16)])
        assert tracker.statistics().skipped == {"inconsistent": 2}

    def test_a_medium_none_event_from_older_vllm_counts_as_gpu(self) -> None:
        tracker = GpuPrefixTracker(NS, 16)
        tracker.apply([store([h(0)], TOKENS[:16], 16, medium=None, group_idx=None)])
        assert tracker.snapshot() == keys(16, 16)


@settings(max_examples=200, deadline=None)
@given(
    blocks_per_chunk=st.sampled_from([1, 2, 4]),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 15)), max_size=40),
)
def test_a_resident_key_always_has_every_block_of_its_chunk_stored(
    blocks_per_chunk: int, ops: list[tuple[bool, int]]
) -> None:
    """Soundness under any order of stores and removals, completeness after a re-announce,
    and the event stream always replays to the resident set."""
    block_size = 4
    chunk = block_size * blocks_per_chunk
    tracker = GpuPrefixTracker(NS, chunk)
    want = keys(chunk, 16 * block_size)
    stored: set[int] = set()  # the engine's truth: stored and not removed since
    seen: set[bytes] = set()

    def check() -> None:
        for op, key in tracker.take_events():
            if op == OP_CLEARED:
                seen.clear()
            elif op == OP_ON_GPU:
                seen.add(key)
            else:
                seen.discard(key)
        assert seen == set(tracker.snapshot())
        for index, key in enumerate(want):
            if tracker.resident(key):
                needed = range(index * blocks_per_chunk, (index + 1) * blocks_per_chunk)
                assert set(needed) <= stored, f"chunk {index} resident without all its blocks"

    for storing, index in ops:
        if storing:
            parent = h(index - 1) if index else None
            tokens = TOKENS[index * block_size : (index + 1) * block_size]
            tracker.apply([store([h(index)], tokens, block_size, parent=parent)])
            stored.add(index)  # on the GPU, whether or not the tracker could place it
        else:
            tracker.apply([remove(h(index))])
            stored.discard(index)
        check()
    tracker.apply([chain(16, block_size)])
    stored = set(range(16))
    check()
    # A snapshot is a set of keys: a chunk re-announced after its removal comes last.
    assert sorted(tracker.snapshot()) == sorted(want)
    assert len(tracker.snapshot()) == len(want)
