"""How a put or get is cut into pipeline pieces (kvcache.client.flows._pieces)."""

from __future__ import annotations

from kvcache.client.flows import _pieces


def test_pieces_grow_from_the_first_size_to_the_largest() -> None:
    mib = 1 << 20
    sizes = [mib] * 40
    pieces = _pieces(sizes, 16 * mib, 2 * mib)
    assert [hi - lo for lo, hi in pieces] == [2, 4, 8, 16, 10]
    assert _pieces(sizes, 4 * mib) == [(i, i + 4) for i in range(0, 40, 4)]
    assert _pieces(sizes[:3], 16 * mib, 2 * mib) == [(0, 2), (2, 3)]
    assert _pieces([], 16 * mib, 2 * mib) == []
    # a first size above the largest is the largest
    assert _pieces(sizes[:8], 4 * mib, 8 * mib) == [(0, 4), (4, 8)]
