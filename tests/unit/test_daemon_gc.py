"""The daemon's garbage-collection scheme (m5): freeze survivors, but never fresh garbage."""

from __future__ import annotations

import gc
import weakref

from kvcache.daemon import freeze_survivors


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_a_cycle_dropped_within_its_tick_is_collected_not_frozen() -> None:
    gc.collect()
    first, second = _Node(), _Node()
    first.other, second.other = second, first  # a cycle, like a caught exception's frame
    alive = weakref.ref(first)
    del first, second
    try:
        freeze_survivors()
        assert alive() is None, "the cycle was frozen: it would never be collected"
    finally:
        gc.unfreeze()
