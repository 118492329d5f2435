"""What every ``shoal`` command shares on its way out: exit codes and plain-text tables.

Exit codes, the same for every component (``shoal cache``, ``shoal load``, ``shoal loader``)::

    0  success
    1  EXIT_FAILED         the command failed (request refused, bad checkpoint, demo mismatch)
    2  EXIT_USAGE          bad usage or configuration (argparse uses 2 as well)
    3  EXIT_UNREACHABLE    a daemon, sidecar or source could not be reached
    4  EXIT_MISSING_EXTRA  the component's optional dependencies are not installed
                           (the message names the extra: pip install 'shoal[loader]')
    130                    interrupted (Ctrl-C)

Pure: no component imports, so ``shoal --help`` and every component can use it.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_MISSING_EXTRA",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "table",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_MISSING_EXTRA = 4
EXIT_INTERRUPTED = 130


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], aligns: str) -> list[str]:
    """Lines of a plain-text table; ``aligns`` holds '<' or '>' per column."""
    assert len(aligns) == len(headers), "one alignment per column"
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, align, width in zip(cells, aligns, widths, strict=True)
        ).rstrip()

    return [line(headers), *(line(row) for row in rows)]
