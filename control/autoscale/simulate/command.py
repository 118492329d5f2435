"""``shoal autoscale simulate``: not built yet (issue 13, the trace simulator)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", required=True, help="trace file or synthetic:NAME")
    parser.add_argument("--policy", default="shoal", help="kpa, apa, hpa, aibrix-kpa or shoal")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    print("shoal autoscale simulate: not built yet", file=sys.stderr)
    return 1
