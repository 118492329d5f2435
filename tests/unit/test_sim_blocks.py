"""The simulator's block pool: LRU eviction of free cached blocks, hits, events."""

from __future__ import annotations

from sim.blocks import AllCleared, BlockPool, Removed, Stored, block_hash, external_hash


def chain(tokens: list[int], size: int, lora: str | None = None) -> list[bytes]:
    hashes: list[bytes] = []
    for i in range(len(tokens) // size):
        hashes.append(
            block_hash(hashes[-1] if hashes else None, tokens[i * size : (i + 1) * size], lora)
        )
    return hashes


def test_hashes_chain_over_the_whole_prefix_and_the_adapter() -> None:
    a = chain(list(range(64)), 16)
    b = chain([*range(16), 99, *range(17, 64)], 16)
    assert a[0] == b[0] and a[1] != b[1] and a[3] != b[3], "a change taints every later block"
    assert chain(list(range(64)), 16, lora="x")[0] != a[0]
    assert 0 <= external_hash(a[0]) < 2**64


def test_free_cached_blocks_are_hits_until_reallocated_oldest_first() -> None:
    pool = BlockPool(5, 16)  # 4 usable and the null block
    hashes = chain(list(range(64)), 16)
    blocks = pool.allocate(4)
    assert blocks == [1, 2, 3, 4] and pool.num_free == 0 and pool.usage == 1.0
    pool.cache(blocks, hashes, None, list(range(64)), None)
    pool.free(blocks)  # last block first: it is evicted first
    assert pool.num_free == 4 and pool.usage == 0.0
    assert pool.longest_hit(hashes) == [1, 2, 3, 4]
    (stored,) = pool.take_events()
    assert isinstance(stored, Stored) and stored.block_hashes == tuple(hashes)
    assert stored.parent_block_hash is None and len(stored.token_ids) == 64

    assert pool.allocate(1) == [4]
    assert pool.take_events() == [Removed((hashes[3],))]
    assert pool.longest_hit(hashes) == [1, 2, 3]


def test_a_hit_takes_blocks_out_of_the_free_queue() -> None:
    pool = BlockPool(4, 16)
    hashes = chain(list(range(32)), 16)
    blocks = pool.allocate(2)
    assert blocks is not None
    pool.cache(blocks, hashes, None, list(range(32)), None)
    pool.free(blocks)
    pool.touch(pool.longest_hit(hashes))
    assert pool.num_free == 1
    assert pool.allocate(2) is None, "in-use hits cannot be evicted"
    assert pool.allocate(1) == [3]
    assert not [e for e in pool.take_events() if isinstance(e, Removed)]


def test_reset_is_refused_while_blocks_are_in_use() -> None:
    pool = BlockPool(2, 16)
    blocks = pool.allocate(1)
    assert blocks is not None
    assert not pool.reset_prefix_cache()
    pool.free(blocks)
    assert pool.reset_prefix_cache()
    assert pool.take_events() == [AllCleared()]


def test_without_caching_nothing_is_stored_or_hit() -> None:
    pool = BlockPool(2, 16, caching=False)
    hashes = chain(list(range(16)), 16)
    blocks = pool.allocate(1)
    assert blocks is not None
    pool.cache(blocks, hashes, None, list(range(16)), None)
    assert pool.take_events() == [] and pool.longest_hit(hashes) == []


def test_block_0_is_vllms_null_block_outside_the_usage() -> None:
    """vLLM's BlockPool takes block 0 as its null block: ``--num-gpu-blocks-override 3``
    leaves 2 for requests, and usage is over those 2."""
    pool = BlockPool(3, 16)
    assert (pool.num_usable, pool.num_free, pool.usage) == (2, 2, 0.0)
    assert pool.allocate(3) is None
    blocks = pool.allocate(2)
    assert blocks == [1, 2] and pool.usage == 1.0
    pool.free(blocks[1:])
    assert pool.usage == 0.5
