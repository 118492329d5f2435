"""The slab allocator never hands out overlapping slots and gives all space back."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvcache.allocator import SlabAllocator, size_class

KiB, MiB = 1 << 10, 1 << 20


@pytest.mark.parametrize(
    ("nbytes", "slot"),
    [(1, 4 * KiB), (4 * KiB, 4 * KiB), (4 * KiB + 1, 8 * KiB), (64 * KiB, 64 * KiB),
     (64 * KiB + 1, 80 * KiB), (2 * MiB, 2 * MiB), (2 * MiB + 1, 2560 * KiB)],
)  # fmt: skip
def test_size_classes_are_quarter_steps_page_aligned(nbytes: int, slot: int) -> None:
    assert size_class(nbytes) == slot


def test_internal_waste_is_under_a_quarter() -> None:
    for nbytes in range(4 * KiB, 8 * MiB, 12_345):
        slot = size_class(nbytes)
        assert slot >= nbytes and slot % 4096 == 0
        assert (slot - nbytes) / nbytes < 0.25


def test_fills_then_refuses_then_reuses() -> None:
    alloc = SlabAllocator(8 * MiB, slab_bytes=4 * MiB)
    offsets = [alloc.try_allocate(1 * MiB) for _ in range(8)]
    assert sorted(offsets) == [i * MiB for i in range(8)]  # type: ignore[type-var]
    assert alloc.try_allocate(1 * MiB) is None
    alloc.free(3 * MiB)
    assert alloc.try_allocate(1 * MiB) == 3 * MiB


def test_an_emptied_slab_serves_another_size_class() -> None:
    alloc = SlabAllocator(4 * MiB, slab_bytes=4 * MiB)
    small = [alloc.try_allocate(64 * KiB) for _ in range(4)]
    assert alloc.try_allocate(2 * MiB) is None  # the only slab belongs to 64 KiB
    for offset in small:
        assert offset is not None
        alloc.free(offset)
    assert alloc.try_allocate(2 * MiB) == 0


def test_oversized_blocks_are_a_clear_error() -> None:
    alloc = SlabAllocator(8 * MiB, slab_bytes=4 * MiB)
    with pytest.raises(ValueError, match="raise the slab size"):
        alloc.try_allocate(4 * MiB + 1)
    with pytest.raises(ValueError):
        alloc.try_allocate(0)


def test_statistics_report_fragmentation() -> None:
    alloc = SlabAllocator(8 * MiB, slab_bytes=4 * MiB)
    assert alloc.try_allocate(64 * KiB + 1) is not None  # 80 KiB slot in a 4 MiB slab
    stats = alloc.statistics()
    assert stats.num_allocations == 1
    assert stats.slot_bytes == 80 * KiB
    assert stats.class_owned_bytes == 4 * MiB
    assert stats.fragmentation == pytest.approx(1 - (64 * KiB + 1) / (4 * MiB))


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free sequences keep every slot disjoint and in bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = SlabAllocator(4 * MiB, slab_bytes=1 * MiB)
        self.live: dict[int, int] = {}

    @rule(nbytes=st.sampled_from([1, 4 * KiB, 5000, 64 * KiB, 100 * KiB, 256 * KiB, 1 * MiB]))
    def allocate(self, nbytes: int) -> None:
        fits = self.alloc.would_fit(nbytes)
        offset = self.alloc.try_allocate(nbytes)
        assert (offset is not None) == fits
        if offset is not None:
            assert offset not in self.live
            self.live[offset] = size_class(nbytes)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        offset = data.draw(st.sampled_from(sorted(self.live)))
        self.alloc.free(offset)
        del self.live[offset]

    @invariant()
    def slots_are_disjoint_and_in_bounds(self) -> None:
        spans = sorted((o, o + s) for o, s in self.live.items())
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        assert all(o >= 0 and e <= self.alloc.capacity_bytes for o, e in spans)
        # No slot straddles a slab boundary.
        assert all(o // self.alloc.slab_bytes == (e - 1) // self.alloc.slab_bytes for o, e in spans)

    @invariant()
    def accounting_matches(self) -> None:
        stats = self.alloc.statistics()
        assert stats.num_allocations == len(self.live)
        assert stats.slot_bytes == sum(self.live.values())
        if not self.live:
            assert stats.num_free_slabs == stats.num_slabs


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_a_slab_hands_out_its_slots_in_order_and_the_last_freed_first() -> None:
    alloc = SlabAllocator(8 * MiB, slab_bytes=4 * MiB)
    first = [alloc.try_allocate(1 * MiB) for _ in range(2)]
    assert first == [0, 1 * MiB]
    alloc.free(0)
    assert [alloc.try_allocate(1 * MiB) for _ in range(3)] == [0, 2 * MiB, 3 * MiB]
    for offset in (0, 1 * MiB, 2 * MiB, 3 * MiB):
        alloc.free(offset)  # the slab is empty again: back to the pool, class forgotten
    # Taken again for another class, it is cut afresh from its first byte.
    assert [alloc.try_allocate(2 * MiB) for _ in range(3)] == [0, 2 * MiB, 4 * MiB]
    assert alloc.try_allocate(1 * MiB) is None, "both slabs now belong to 2 MiB blocks"
