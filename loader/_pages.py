"""Faulting in a destination's pages before a read copies into it (issue 17).

A warm load is a memory copy out of the page cache into fresh memory, and on the bench VM
most of its time is the first touch of that memory (``perf``: 40% ``clear_page_erms``, ~27%
fault entry and memcg accounting; bench/RESULTS.md, loader). Copying into untouched memory
takes one page fault per 4 KiB page, in the middle of ``copy_to_user``.
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14) allocates and maps the whole range in one
call instead, without an exception per page: the reader thread that is about to ``preadv``
into a range populates it first, so the faults stay spread over the readers. The page-cache
copy then runs into present pages.

Populating writes nothing the caller can see (a present page is left as it is), so it is
safe on any writable memory the process owns, and it is only an optimisation: a kernel
without it (``EINVAL``) or a range it cannot populate turns it off, and the read faults
the pages in as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap

__all__ = ["populate_write"]

MADV_POPULATE_WRITE = 23  # <linux/mman.h>; Python's mmap module names it from 3.13 on
_PAGE = mmap.PAGESIZE


def _madvise() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    function.restype = ctypes.c_int
    return function  # a CDLL call releases the GIL while the kernel populates


_MADVISE = _madvise()
_supported = _MADVISE is not None


def populate_write(address: int, nbytes: int) -> bool:
    """Fault in, writable, every page of ``[address, address + nbytes)`` (widened to whole
    pages). False, and off for good, where the kernel lacks ``MADV_POPULATE_WRITE``; False
    for this range alone when the kernel could not populate it (memory short: the read's
    own faults then report it as they would have)."""
    global _supported  # noqa: PLW0603 (one switch, set once, read by every reader)
    if not _supported or nbytes <= 0:
        return False
    assert _MADVISE is not None
    start = address - address % _PAGE
    end = -(-(address + nbytes) // _PAGE) * _PAGE
    if _MADVISE(start, end - start, MADV_POPULATE_WRITE) == 0:
        return True
    if ctypes.get_errno() == errno.EINVAL:  # before Linux 5.14
        _supported = False
    return False
