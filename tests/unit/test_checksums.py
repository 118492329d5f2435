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
@pytest.mark.parametrize("misalign", [0, 1, 7, 31])
def test_native_copies_match_xxhash_at_every_length_and_alignment(length: int, misalign: int) -> None:
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
