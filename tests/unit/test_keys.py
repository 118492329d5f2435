"""Block keys are chained, namespaced and identical in every process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvcache.keys import KEY_BYTES, Namespace, chain_keys, join_keys, split_keys

NS = Namespace(model="llama-3-8b@abc123")
REPO = Path(__file__).resolve().parents[2]


def test_only_full_chunks_get_keys() -> None:
    assert len(chain_keys(NS, list(range(47)), 16)) == 2
    assert chain_keys(NS, list(range(15)), 16) == []


def test_keys_are_16_bytes_and_chained() -> None:
    keys = chain_keys(NS, list(range(64)), 16)
    assert all(len(k) == KEY_BYTES for k in keys)
    assert len(set(keys)) == 4
    # A key identifies its whole prefix: a different first chunk changes every later key.
    other = chain_keys(NS, [999, *range(1, 64)], 16)
    assert all(a != b for a, b in zip(keys, other, strict=True))


def test_equal_prefixes_share_keys_until_they_diverge() -> None:
    a = chain_keys(NS, [*range(48), *[1] * 16], 16)
    b = chain_keys(NS, [*range(48), *[2] * 16], 16)
    assert a[:3] == b[:3]
    assert a[3] != b[3]


def test_continuing_a_chain_equals_hashing_it_whole() -> None:
    whole = chain_keys(NS, list(range(64)), 16)
    first = chain_keys(NS, list(range(32)), 16)
    rest = chain_keys(NS, list(range(32, 64)), 16, parent=first[-1])
    assert first + rest == whole


@pytest.mark.parametrize(
    "other",
    [
        Namespace(model="llama-3-8b@def456"),
        Namespace(model="llama-3-8b@abc123", kv_dtype="float8_e4m3"),
        Namespace(model="llama-3-8b@abc123", layout="nhd"),
        Namespace(model="llama-3-8b@abc123", tp_rank=1, tp_size=2),
    ],
)
def test_every_namespace_field_separates_keys(other: Namespace) -> None:
    assert chain_keys(NS, list(range(16)), 16) != chain_keys(other, list(range(16)), 16)


def test_bad_input_is_rejected_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="chunk_tokens"):
        chain_keys(NS, [1, 2], 0)
    with pytest.raises(ValueError, match="token ids"):
        chain_keys(NS, [-1] * 16, 16)
    with pytest.raises(ValueError, match="tp_rank"):
        Namespace(model="m", tp_rank=2, tp_size=2)
    with pytest.raises(ValueError, match="multiple of 16"):
        split_keys(b"x" * 17)
    with pytest.raises(ValueError, match="16 bytes"):
        join_keys([b"short"])


def test_join_and_split_round_trip() -> None:
    keys = chain_keys(NS, list(range(160)), 16)
    assert split_keys(join_keys(keys)) == keys


def test_keys_are_identical_across_interpreters_with_different_hash_seeds() -> None:
    script = (
        "from kvcache.keys import Namespace, chain_keys;"
        "ns = Namespace(model='m@1', kv_dtype='bf16', tp_rank=1, tp_size=4);"
        "print(b''.join(chain_keys(ns, list(range(4096)), 16)).hex())"
    )
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        outputs.add(result.stdout.strip())
    assert len(outputs) == 1
    ns = Namespace(model="m@1", kv_dtype="bf16", tp_rank=1, tp_size=4)
    assert outputs.pop() == b"".join(chain_keys(ns, list(range(4096)), 16)).hex()


def test_namespace_fields_are_length_prefixed_so_no_two_tuples_serialise_equal() -> None:
    """m9: v1 joined fields with an unescaped \\x1f, so these two were one namespace."""
    a = Namespace(model="m\x1fbfloat16", kv_dtype="x")
    b = Namespace(model="m", kv_dtype="bfloat16\x1fx")
    assert a.digest != b.digest
    assert chain_keys(a, list(range(16)), 16) != chain_keys(b, list(range(16)), 16)


def test_pipeline_stages_are_separate_namespaces() -> None:
    stages = [Namespace(model="m@1", pp_rank=p, pp_size=2) for p in range(2)]
    assert stages[0].digest != stages[1].digest
    assert Namespace(model="m@1").digest not in {s.digest for s in stages}
    with pytest.raises(ValueError, match="pp_rank"):
        Namespace(model="m", pp_rank=2, pp_size=2)


def test_the_wire_form_gives_back_the_same_namespace() -> None:
    ns = Namespace("org/m@abc", "bf16", "vllm0.33/LBNHC/b16/x", 1, 2, "e/x", 1, 4)
    assert Namespace.from_wire(ns.to_wire()) == ns
    assert Namespace.from_wire(ns.label()) is None  # a plain label is not a namespace
    assert Namespace.from_wire("shoal-ns-v2:[1,2]") is None


def test_chunk_extras_change_their_chunk_and_every_later_key_only() -> None:
    tokens = list(range(64))
    plain = chain_keys(NS, tokens, 16)
    assert chain_keys(NS, tokens, 16, extras=[b""] * 4) == plain  # no extras: plain keys
    salted = chain_keys(NS, tokens, 16, extras=[b"", b"", b"lora", b""])
    assert salted[:2] == plain[:2]
    assert all(a != b for a, b in zip(salted[2:], plain[2:], strict=True))
    with pytest.raises(ValueError, match="extras"):
        chain_keys(NS, tokens, 16, extras=[b""])
