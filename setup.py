"""Build hook for the one compiled part of Shoal: kvcache._copyhash (copy + xxh3-64 in one pass).

Everything else is in pyproject.toml. The extension is optional: where no C compiler is
available the build goes on without it and kvcache.checksums falls back to the xxhash
package (same checksums, two passes instead of one); kvcache.checksums.IMPLEMENTATION says
which one runs, and the daemon logs it at start.
"""

from setuptools import Extension, setup

NATIVE = "kvcache/native/"

setup(
    ext_modules=[
        Extension(
            "kvcache._copyhash",
            sources=[
                NATIVE + "copyhash.c",
                NATIVE + "kernels_generic.c",
                NATIVE + "kernels_avx2.c",
            ],
            depends=[NATIVE + "kernels.h", NATIVE + "xxhash.h"],
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
            optional=True,
        )
    ]
)
