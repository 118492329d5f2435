"""How the streamer cuts a load into reads."""

from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from loader.plan import TensorPlan
from loader.stream import StreamOptions, _reads, _Tensor

MiB = 1 << 20


def tensors(*layout: tuple[str, int, int]) -> list[_Tensor]:
    """``(path, file offset, length)`` per tensor, one range each."""
    plans = [
        TensorPlan(f"t{i}", path, torch.uint8, (length,), ((offset, length),))
        for i, (path, offset, length) in enumerate(layout)
    ]
    return [_Tensor(plan, plan.nbytes) for plan in plans]


def test_adjacent_tensors_share_reads_of_at_most_the_chunk() -> None:
    layout = [("a", i * 102_400, 102_400) for i in range(40)]  # 40 x 100 KiB, back to back
    reads = _reads(tensors(*layout), StreamOptions(chunk_bytes=1 * MiB, concurrency=4))
    assert len(reads) == -(-40 * 102_400 // MiB)
    assert [r.length for r in reads[:-1]] == [MiB] * (len(reads) - 1)
    assert len(reads[0].pieces) == 11  # ten whole tensors and the front of the eleventh
    assert reads[1].pieces[0].tensor is reads[0].pieces[-1].tensor  # its back, then on


def test_a_large_tensor_is_cut_at_the_chunk_and_its_tail_shares_a_read() -> None:
    layout = [("a", 0, 40 * MiB), ("a", 40 * MiB, 12 * MiB)]
    reads = _reads(tensors(*layout), StreamOptions(chunk_bytes=16 * MiB))
    assert [(r.offset, r.length, len(r.pieces)) for r in reads] == [
        (0, 16 * MiB, 1), (16 * MiB, 16 * MiB, 1), (32 * MiB, 16 * MiB, 2), (48 * MiB, 4 * MiB, 1),
    ]  # fmt: skip


def test_holes_are_read_through_up_to_the_gap_and_files_never_mix() -> None:
    layout = [("a", 0, 100), ("a", 100, 100), ("a", 300, 100), ("a", 100_400, 100), ("b", 0, 9)]
    options = StreamOptions(chunk_bytes=MiB, merge_gap_bytes=1000)
    reads = _reads(tensors(*layout), options)
    assert [(r.path, r.offset, r.length) for r in reads] == [
        ("a", 0, 400),  # t0, t1, a 100-byte hole, t2
        ("a", 100_400, 100),  # too far
        ("b", 0, 9),
    ]
    never = _reads(tensors(*layout), StreamOptions(chunk_bytes=MiB, merge_gap_bytes=-1))
    assert len(never) == len(layout)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 5000), min_size=1, max_size=30),
    holes=st.lists(st.integers(0, 300), min_size=30, max_size=30),
    chunk=st.integers(1, 6000),
    gap=st.integers(-1, 200),
    concurrency=st.integers(1, 8),
)
def test_every_byte_is_read_once_into_its_place(
    sizes: list[int], holes: list[int], chunk: int, gap: int, concurrency: int
) -> None:
    layout, offset = [], 0
    for size, hole in zip(sizes, holes, strict=False):
        offset += hole
        layout.append(("a", offset, size))
        offset += size
    options = StreamOptions(chunk_bytes=chunk, merge_gap_bytes=gap, concurrency=concurrency)
    planned = tensors(*layout)
    reads = _reads(planned, options)
    filled: dict[str, list[tuple[int, int]]] = {t.plan.name: [] for t in planned}
    for read in reads:
        assert read.length <= max(chunk, 1)
        at = read.offset
        for piece in read.pieces:
            assert piece.length > 0
            assert 0 <= piece.file_offset - at <= max(gap, 0)  # holes within the gap
            at = piece.file_offset + piece.length
            filled[piece.tensor.plan.name].append((piece.dest_offset, piece.length))
            ((start, _),) = piece.tensor.plan.ranges
            assert piece.file_offset - start == piece.dest_offset  # lands where it belongs
        assert at == read.offset + read.length
    for tensor in planned:
        covered = sorted(filled[tensor.plan.name])
        expected, end = 0, 0
        for dest, length in covered:
            assert dest == end  # no overlap, no hole
            end = dest + length
        expected = tensor.plan.nbytes
        assert end == expected


def test_direct_tensors_are_read_in_aligned_blocks_into_their_own_memory() -> None:
    planned = tensors(("a", 0, 100), ("a", 100, 3 * MiB + 5000), ("a", 3 * MiB + 5100, 7))
    direct = planned[1]
    direct.align, direct.lead = 4096, 100  # its offset modulo the alignment
    direct.remaining += direct.lead
    reads = _reads(planned, StreamOptions(chunk_bytes=MiB))
    mine = [(r.offset, r.length, r.pieces[0].dest_offset, r.pieces[0].slack)
            for r in reads if r.pieces[0].tensor is direct and len(r.pieces) == 1]  # fmt: skip
    end = (100 + 3 * MiB + 5000) // 4096 * 4096
    assert mine[:3] == [(0, MiB, 0, 100), (MiB, MiB, MiB, 0), (2 * MiB, MiB, 2 * MiB, 0)]
    assert mine[3] == (3 * MiB, end - 3 * MiB, 3 * MiB, 0)
    tail = next(r for r in reads if r.offset == end)
    assert tail.pieces[0].tensor is direct and tail.pieces[0].dest_offset == end
    assert tail.pieces[1].tensor is planned[2]  # the tail is an ordinary, joinable piece
    landed = sum(p.length for r in reads for p in r.pieces if p.tensor is direct)
    assert landed == direct.remaining  # lead + bytes: every piece counted once
