"""A whole staging presented as files: which file bytes come from the kept prefix, which
from the segment, and which are refused (``loader.sidecar.files``)."""

from __future__ import annotations

import pytest
import torch

from loader.errors import ObjectNotFound, SourceError
from loader.plan import TensorPlan
from loader.sidecar.files import Span, file_spans, staged_files
from loader.sources.base import ObjectInfo

PREFIX = b"H" * 100  # the 8 + N header bytes of model.safetensors


def tensor(name: str, begin: int, nbytes: int, path: str = "model.safetensors") -> TensorPlan:
    return TensorPlan(name, path, torch.uint8, (nbytes,), ((begin, nbytes),))


def files():  # type: ignore[no-untyped-def]
    # a: [100, 140), b: [140, 200), hole [200, 260), c: [260, 300); size 300.
    plans = [tensor("a", 100, 40), tensor("b", 140, 60), tensor("c", 260, 40),
             tensor("empty", 300, 0)]  # fmt: skip
    return staged_files(
        "0123456789abcdef", b"t" * 16,
        [ObjectInfo("index.json", 10, "i"), ObjectInfo("model.safetensors", 300, "etag")],
        {"index.json": b"0123456789", "model.safetensors": PREFIX},
        plans, [4096, 8192, 12288, 16384],
    )  # fmt: skip


def test_a_staged_file_keeps_its_origin_size_identity_prefix_and_extents() -> None:
    staged = files().file("model.safetensors")
    assert (staged.size, staged.identity, staged.prefix) == (300, "etag", PREFIX)
    assert staged.extents == ((100, 40, 4096), (140, 60, 8192), (260, 40, 12288))
    assert files().file("index.json").extents == ()
    with pytest.raises(ObjectNotFound, match="no file 'x'"):
        files().file("x")


def test_a_range_maps_to_prefix_and_segment_spans_in_file_order() -> None:
    staged = files().file("model.safetensors")
    assert file_spans(staged, 0, 300 - 100) == [
        Span(False, 0, 100), Span(True, 4096, 40), Span(True, 8192, 60)
    ]  # fmt: skip
    assert file_spans(staged, 90, 20) == [Span(False, 90, 10), Span(True, 4096, 10)]
    assert file_spans(staged, 150, 10) == [Span(True, 8202, 10)]
    assert file_spans(staged, 270, 30) == [Span(True, 12298, 30)]
    assert file_spans(staged, 300, 0) == []
    assert file_spans(files().file("index.json"), 2, 8) == [Span(False, 2, 8)]


@pytest.mark.parametrize(("offset", "length", "words"), [
    (190, 20, r"bytes \[200, 260\) lie outside the header and every staged tensor"),
    (200, 1, r"bytes \[200, 260\)"),
    (290, 20, r"\[290, 310\) are outside its 300 bytes"),
    (-1, 2, "outside"),
])  # fmt: skip
def test_bytes_not_held_are_refused(offset: int, length: int, words: str) -> None:
    with pytest.raises(SourceError, match=words):
        file_spans(files().file("model.safetensors"), offset, length)
