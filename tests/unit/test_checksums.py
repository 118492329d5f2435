"""kvcache.checksums: the compiled copy+checksum kernels against the xxhash package.

The native and the pure-Python implementations must give the same checksum for every
length and alignment (a block written by one is read by the other: a mixed fleet, or
SHOAL_NATIVE=0 on one side), and both copies must land exactly the source bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import xxhash

from kvcache import checksums

native = pytest.importorskip("kvcache._copyhash", reason="the C extension is not built here")

LENGTHS = [0, 1, 31, 32, 33, 63, 64, 65, 1000, 2047, 2048, 2049, 4095, 4096, 4097,
           65535, 65536, 65537, 262144 + 3, (1 << 20) + 17]  # fmt: skip


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("misalign", [0, 1, 7, 11, 16, 31])
def test_native_copies_match_xxhash_at_every_length_and_alignment(
    length: int, misalign: int
) -> None:
    rng = np.random.default_rng(length * 131 + misalign)
    source_buffer = rng.integers(0, 256, length + 64, dtype=np.uint8)
    source = memoryview(source_buffer)[misalign : misalign + length]
    expected = xxhash.xxh3_64_intdigest(source)
    assert native.checksum(source) == expected
    for copy in (native.copy_checksum_source, native.copy_checksum_exact):
        target_buffer = np.zeros(length + 64, dtype=np.uint8)
        target = memoryview(target_buffer)[(misalign * 3) % 32 : (misalign * 3) % 32 + length]
        assert copy(source, target) == expected
        assert bytes(target) == bytes(source)
        # nothing written outside the target
        outside = np.concatenate([target_buffer[: (misalign * 3) % 32],
                                  target_buffer[(misalign * 3) % 32 + length :]])  # fmt: skip
        assert not outside.any()
    streamed = bytearray(length)
    assert native.copy_stream(source, streamed) is None
    assert streamed == bytes(source)


def test_python_fallback_gives_the_same_values() -> None:
    data = os.urandom(3 << 20)
    target = bytearray(len(data))
    assert checksums._python_copy_checksum(memoryview(data), memoryview(target)) == (
        native.copy_checksum_exact(data, bytearray(len(data)))
    )
    assert bytes(target) == data
    assert checksums._python_checksum(data) == native.checksum(data)


@pytest.mark.parametrize("copy", ["copy_checksum_source", "copy_checksum_exact"])
def test_bad_arguments_are_clear_errors(copy: str) -> None:
    function = getattr(native, copy)
    with pytest.raises(ValueError, match="source is 4 bytes but target is 5"):
        function(b"abcd", bytearray(5))
    with pytest.raises(BufferError):  # a read-only target
        function(b"abcd", b"efgh")
    with pytest.raises(TypeError):
        function(b"abcd")
    with pytest.raises(ValueError, match="source is 4 bytes"):
        checksums._python_copy_checksum(memoryview(b"abcd"), memoryview(bytearray(5)))


def test_in_use_implementation_is_the_native_one_unless_turned_off() -> None:
    assert checksums.IMPLEMENTATION.startswith("native-")
    code = "from kvcache import checksums; print(checksums.IMPLEMENTATION)"
    env = {**os.environ, "SHOAL_NATIVE": "0"}
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, check=True).stdout.strip()  # fmt: skip
    assert shown == "python"


IMPLEMENTATIONS = {
    "native": (native.put_into, native.get_from),
    "python": (checksums._python_put_into, checksums._python_get_from),
}


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_batch_put_and_get_round_trip_with_the_same_checksums(name: str) -> None:
    put_into, get_from = IMPLEMENTATIONS[name]
    arena = bytearray(1 << 20)
    sources = [os.urandom(n) for n in (100, 65536, 70001, 4096)]
    offsets = [0, 4096, 4096 + 65536, 1 << 19]
    sums = put_into(arena, offsets, sources)
    assert sums == [xxhash.xxh3_64_intdigest(s) for s in sources]
    targets = [bytearray(len(s)) for s in sources]
    sizes = [len(s) for s in sources]
    assert get_from(arena, offsets, sizes, sums, targets, True) == (4, False)
    assert [bytes(t) for t in targets] == sources


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_batch_get_stops_at_a_miss_a_wrong_size_or_a_corrupt_block(name: str) -> None:
    put_into, get_from = IMPLEMENTATIONS[name]
    arena = bytearray(64 << 10)
    sources = [os.urandom(4096) for _ in range(4)]
    offsets = [0, 8192, 16384, 24576]
    sums = put_into(arena, offsets, sources)
    sizes = [4096] * 4

    def fresh() -> list[bytearray]:
        return [bytearray(4096) for _ in range(4)]

    targets = fresh()
    assert get_from(arena, [0, 8192, -1, 24576], sizes, sums, targets, True) == (2, False)
    assert bytes(targets[2]) == bytes(4096), "a block past the miss was copied"
    assert get_from(arena, offsets, [4096, 4000, 4096, 4096], sums, fresh(), True) == (1, False)
    arena[16384 + 7] ^= 0xFF  # block 2 corrupt at rest
    targets = fresh()
    assert get_from(arena, offsets, sizes, sums, targets, True) == (2, True)
    assert bytes(targets[3]) == bytes(4096)
    # without verification the bytes are copied as they are
    assert get_from(arena, offsets, sizes, sums, fresh(), False) == (4, False)
    # a reply shorter than the request serves what it names
    assert get_from(arena, offsets[:1], sizes[:1], sums[:1], fresh(), True) == (1, False)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_batch_slots_outside_the_arena_are_refused_before_any_copy(name: str) -> None:
    put_into, get_from = IMPLEMENTATIONS[name]
    arena = bytearray(8192)
    with pytest.raises(ValueError, match="outside the arena"):
        put_into(arena, [0, 8150], [b"a" * 100, b"b" * 100])
    assert arena == bytearray(8192), "a slot was written before the bad one was found"
    with pytest.raises(ValueError, match="outside the arena"):
        put_into(arena, [-4], [b"a"])
    with pytest.raises(ValueError, match="outside the arena"):
        get_from(arena, [0, 1 << 40], [10, 10], [0, 0], [bytearray(10), bytearray(10)], True)
    with pytest.raises(ValueError):
        put_into(arena, [0], [b"a", b"b"])
    with pytest.raises(ValueError):
        get_from(arena, [0], [1, 2], [0], [bytearray(1)], True)


@pytest.mark.parametrize("factory", [native.Hasher, xxhash.xxh3_64])
def test_streaming_hasher_equals_the_one_shot_checksum(factory: type) -> None:
    data = os.urandom((2 << 20) + 333)
    hasher = factory()
    for start in range(0, len(data), 100_003):
        hasher.update(memoryview(data)[start : start + 100_003])
    assert hasher.intdigest() == xxhash.xxh3_64_intdigest(data) == native.checksum(data)
    assert factory().intdigest() == xxhash.xxh3_64_intdigest(b"")


def test_the_baseline_kernels_agree_too() -> None:
    """The SSE2 kernels (what a CPU without AVX2 runs), forced in a fresh interpreter."""
    code = """
import os, xxhash
from kvcache import _copyhash as c
assert c.KERNEL == "generic", c.KERNEL
for n in (0, 1, 63, 64, 65, 4095, 4096, 4097, 100_003, (1 << 20) + 5):
    data = os.urandom(n + 3)[3:]
    for copy in (c.copy_checksum_source, c.copy_checksum_exact):
        out = bytearray(n + 1)
        assert copy(data, memoryview(out)[1:]) == xxhash.xxh3_64_intdigest(data), n
        assert out[1:] == data
    assert c.checksum(data) == xxhash.xxh3_64_intdigest(data)
print("ok")
"""
    env = {**os.environ, "SHOAL_NATIVE": "generic"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
