"""Chunk keys fold in what vLLM's prefix cache folds into block hashes (review C3), checked
with vLLM's real ``Request`` objects through the scheduler's lookups."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pytest
import torch

pytest.importorskip("vllm", reason="these tests build vLLM's own Request objects")

from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange
from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys
from vllm.v1.request import Request

from kvcache.connector.extra_keys import _encode, chunk_extra
from kvcache.connector.plan import ChunkGeometry
from kvcache.connector.scheduler import ConnectorScheduler, _Lookup
from kvcache.connector.settings import ConnectorSettings
from kvcache.keys import Namespace, chain_keys

CHUNK = 32
TOKENS = [(5 * i + 1) % 3000 for i in range(4 * CHUNK + 3)]
NS = Namespace("m@0123456789abcdef0123456789abcdef01234567")


def request(
    req_id: str = "r",
    tokens: Sequence[int] | None = TOKENS,
    *,
    lora: LoRARequest | None = None,
    mm: list[tuple[str, int, int]] | None = None,
    salt: str | None = None,
    embeds: torch.Tensor | None = None,
) -> Request:
    features = None
    if mm:
        features = [
            MultiModalFeatureSpec(
                data=None,
                modality="image",
                identifier=identifier,
                mm_position=PlaceholderRange(offset=offset, length=length),
            )
            for identifier, offset, length in mm
        ]
    params = SamplingParams(max_tokens=4)
    return Request(
        request_id=req_id,
        prompt_token_ids=list(tokens) if tokens is not None else None,
        sampling_params=params,
        pooling_params=None,
        mm_features=features,
        lora_request=lora,
        cache_salt=salt,
        prompt_embeds=embeds,
    )


class _RecordingLookups:
    """Stands in for the lookup thread: records the chains asked, answers a miss."""

    def __init__(self) -> None:
        self.chains: list[list[list[bytes]]] = []
        self.counters = _NoCounters()

    def submit(self, chains: Sequence[Sequence[bytes]]) -> _Lookup:
        self.chains.append([list(c) for c in chains])
        lookup = _Lookup(num_chunks=min(len(c) for c in chains))
        lookup.done.set()
        return lookup

    @property
    def failures(self) -> int:
        return 0

    def close(self) -> None:
        pass


class _NoCounters:
    def take_deltas(self) -> dict[str, float]:
        return {}


def keys_of(req: Request, namespaces: Sequence[Namespace] = (NS,)) -> list[bytes]:
    """The keys the scheduler asks the daemon for (rank 0), via its public call."""
    lookups = _RecordingLookups()
    scheduler = ConnectorScheduler(
        ConnectorSettings(), ChunkGeometry(16, CHUNK), [ns.digest for ns in namespaces],
        lookups=lookups,  # type: ignore[arg-type]
    )  # fmt: skip
    count, _ = scheduler.matched_tokens(req, 0)
    if not lookups.chains:
        return []
    assert count == 0
    return lookups.chains[0][0]


def shared_chunks(a: list[bytes], b: list[bytes]) -> int:
    return sum(1 for x, y in zip(a, b, strict=False) if x == y)


PLAIN = 4  # full chunks of TOKENS


def test_plain_requests_keep_their_keys_and_share() -> None:
    assert keys_of(request("a")) == chain_keys(NS, TOKENS, CHUNK)
    assert keys_of(request("a")) == keys_of(request("b"))


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            {"lora": LoRARequest("x", 1, "/adapters/x")},
            {"lora": LoRARequest("y", 2, "/adapters/y")},
        ),
        ({"lora": LoRARequest("x", 1, "/adapters/x")}, {}),
        ({"lora": LoRARequest("x", 1, "/adapters/x")}, {"lora": LoRARequest("x", 1, "/other/x")}),
        ({"salt": "tenant-a"}, {"salt": "tenant-b"}),
        ({"salt": "tenant-a"}, {}),
        ({"mm": [("img-1", 10, 20)]}, {"mm": [("img-2", 10, 20)]}),
        ({"mm": [("img-1", 10, 20)]}, {}),
    ],
)
def test_requests_that_differ_only_in_extra_keys_share_no_chunk(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    a, b = keys_of(request("a", **first)), keys_of(request("b", **second))
    assert len(a) == len(b) == PLAIN
    assert shared_chunks(a, b) == 0
    assert keys_of(request("c", **first)) == a  # equal requests do share


def test_an_image_changes_the_chunks_from_the_one_it_overlaps() -> None:
    # An image at tokens 70..89 lies in chunk 2: chunks 0 and 1 stay plain and shared.
    a = keys_of(request("a", mm=[("img-1", 70, 20)]))
    b = keys_of(request("b", mm=[("img-2", 70, 20)]))
    plain = keys_of(request("p"))
    assert a[:2] == b[:2] == plain[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    # The same image at another offset inside the same chunk is another key.
    assert keys_of(request("c", mm=[("img-1", 72, 20)]))[2] != a[2]


def test_prompt_embeddings_key_the_chunks_their_rows_fill() -> None:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(len(TOKENS), 8, generator=generator, dtype=torch.bfloat16)
    other = embeds.clone()
    other[40] += 1  # one row in chunk 1 differs
    a = keys_of(request("a", tokens=None, embeds=embeds))
    b = keys_of(request("b", tokens=None, embeds=other))
    assert len(a) == PLAIN
    assert a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:], strict=True))
    assert keys_of(request("c", tokens=None, embeds=embeds.clone())) == a
    # Token ids of embedded prompts are placeholders: equal ids never make them plain.
    assert shared_chunks(a, keys_of(request("d", tokens=[0] * len(TOKENS)))) == 0


def test_pipeline_stages_and_tensor_ranks_get_different_keys() -> None:
    stages = [Namespace(NS.model, pp_rank=p, pp_size=2) for p in range(2)]
    lookups = _RecordingLookups()
    scheduler = ConnectorScheduler(
        ConnectorSettings(), ChunkGeometry(16, CHUNK), [ns.digest for ns in stages],
        lookups=lookups,  # type: ignore[arg-type]
    )  # fmt: skip
    scheduler.matched_tokens(request("a"), 0)
    stage0, stage1 = lookups.chains[0]
    assert shared_chunks(stage0, stage1) == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lora": LoRARequest("x", 1, "/adapters/x")},
        {"salt": "s"},
        {"mm": [("img-1", 3, 40), ("img-2", 50, 10), ("img-3", 60, 70)]},
    ],
)
def test_the_extra_keys_are_the_ones_vllm_folds_into_its_block_hashes(
    kwargs: dict[str, Any],
) -> None:
    req = request("a", **kwargs)
    for start, end in [(0, 32), (32, 64), (64, 96), (96, 128), (40, 56), (0, 16)]:
        theirs, _ = generate_block_hash_extra_keys(req, start, end, 0)
        assert chunk_extra(req, start, end) == (_encode(theirs) if theirs else b"")


def test_an_unkeyable_request_is_neither_looked_up_nor_saved() -> None:
    lookups = _RecordingLookups()
    scheduler = ConnectorScheduler(
        ConnectorSettings(), ChunkGeometry(16, CHUNK), [NS.digest],
        lookups=lookups,  # type: ignore[arg-type]
    )  # fmt: skip
    req = request("a", mm=[("img-1", 3, 40)])
    req.mm_features[0].identifier = None  # type: ignore[assignment]
    assert scheduler.matched_tokens(req, 0) == (0, False)
    assert lookups.chains == []
    assert scheduler.stats["unkeyable"] == 1
    # Nor is it saved once computed.
    req.num_computed_tokens = len(TOKENS)
    tracked = scheduler._requests["a"]
    tracked.block_ids = list(range(64))
    assert scheduler._save_job(tracked, 0) is None


def test_the_inline_wait_is_bounded_per_step_not_per_request() -> None:
    """m21: ten waiting requests whose lookups never answer cost one wait, not ten."""

    class Never(_RecordingLookups):
        def submit(self, chains: Sequence[Sequence[bytes]]) -> _Lookup:
            return _Lookup(num_chunks=1)  # never done

    scheduler = ConnectorScheduler(
        ConnectorSettings(lookup_wait_ms=100), ChunkGeometry(16, CHUNK), [NS.digest],
        lookups=Never(),  # type: ignore[arg-type]
    )  # fmt: skip
    start = time.monotonic()
    for i in range(10):
        assert scheduler.matched_tokens(request(f"r{i}"), 0) == (None, False)
    elapsed = time.monotonic() - start
    assert elapsed < 0.5, f"ten deferred lookups waited {elapsed:.2f}s in one step"
    assert elapsed >= 0.09  # the step's budget was used once
    assert scheduler.stats["deferred"] == 10
