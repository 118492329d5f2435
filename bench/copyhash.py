"""The copy + checksum kernel alone: what one block's copy costs with its checksum.

Every block that crosses a process or a tier is copied and hashed (xxh3-64). This bench
isolates that step from the daemon and the protocol: per block size, in rounds
(``bench/rounds.py``), one thread copies 512 MiB of blocks (256 MiB with ``--quick``)
from a pre-touched source pool to a pre-touched destination pool, both far larger than the
L3, each of:

* limit: the faster, per round, of ``np.copyto`` per block (glibc memcpy: ordinary stores at
  these sizes) and ``copy_stream`` per block (the same copy with non-temporal stores, no
  checksum: what memcpy does past its non-temporal threshold);
* ``source``: ``copy_checksum_source`` (the put / save kernel);
* ``exact``: ``copy_checksum_exact`` (the get / load / landing kernel);
* ``python``: the fallback without the extension: copy and ``xxhash`` in 256 KiB pieces.

Destination blocks are 64-byte aligned (as torch and the arena give them). Each figure is
the median of its rounds with min and max, and each ratio the per-round ratio to the
limit; ``busy`` is the share of the CPUs other processes took meanwhile.

    python bench/copyhash.py [--quick] [--json] [--sizes 256KiB,1MiB] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.rounds import ForeignCpu, Spread, fmt_spread, paired_ratios  # noqa: E402
from kvcache import checksums  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = {"64KiB": 64 * KiB, "256KiB": 256 * KiB, "1MiB": MiB, "4MiB": 4 * MiB}


def _aligned_blocks(total: int, block: int, fill: int) -> list[np.ndarray]:
    raw = np.full(total + 64, fill, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64
    pool = raw[start : start + total]
    return [pool[i : i + block] for i in range(0, total, block)]


def _native() -> Any:
    try:
        from kvcache import _copyhash  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _copyhash


def measure(block: int, total: int, rounds: int) -> dict[str, Any]:
    sources = _aligned_blocks(total, block, 1)
    targets = _aligned_blocks(total, block, 2)
    native = _native()

    def timed(copy: Callable[[Any, Any], Any]) -> float:
        started = time.perf_counter()
        for src, dst in zip(sources, targets, strict=True):
            copy(src, dst)
        return total / (time.perf_counter() - started) / 1e9

    ways: dict[str, Callable[[Any, Any], Any]] = {
        "copyto": lambda src, dst: np.copyto(dst, src),
        "python": checksums._python_copy_checksum,
    }
    if native is not None:
        ways |= {
            "stream": native.copy_stream,
            "source": native.copy_checksum_source,
            "exact": native.copy_checksum_exact,
        }
    for copy in ways.values():  # warm up code paths and both pools' pages
        timed(copy)
    figures: dict[str, list[float]] = {name: [] for name in (*ways, "limit")}
    watch = ForeignCpu()
    watch.start()
    for _ in range(rounds):
        for name, copy in ways.items():
            figures[name].append(timed(copy))
        figures["limit"].append(max(figures["copyto"][-1], figures.get("stream", [0.0])[-1]))
    busy = watch.stop()
    out: dict[str, Any] = {
        "gbps": {name: Spread.of(values).to_json() for name, values in figures.items()},
        "ratio": {
            name: Spread.of(paired_ratios(figures[name], figures["limit"])).to_json()
            for name in ("source", "exact", "python")
            if name in figures
        },
        "foreign_cpu": round(busy, 3),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB per round, 5 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--sizes", default=",".join(SIZES), help="block sizes, e.g. 256KiB,1MiB")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 5 quick, 11)")
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    rounds = args.rounds or (5 if args.quick else 11)
    total = (256 if args.quick else 512) * MiB
    result: dict[str, Any] = {
        "implementation": checksums.IMPLEMENTATION,
        "rounds": rounds,
        "bytes_per_round": total,
        "by_size": {size: measure(SIZES[size], total, rounds) for size in sizes},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"copy + xxh3-64 kernels ({result['implementation']}), {rounds} rounds of "
          f"{total // MiB} MiB, GB/s median [min-max]; ratio = per-round / limit")  # fmt: skip
    names = ("limit", "copyto", "stream", "source", "exact", "python")
    print(f"{'block':>7} " + " ".join(f"{n:>20}" for n in names) + "   busy")
    for size, row in result["by_size"].items():
        cells = [fmt_spread(row["gbps"].get(n)) for n in names]
        print(f"{size:>7} " + " ".join(f"{c:>20}" for c in cells) + f"   {row['foreign_cpu']:.0%}")
        ratios = [fmt_spread(row["ratio"].get(n), percent=True) if n in row["ratio"] else ""
                  for n in names]  # fmt: skip
        print(f"{'':>7} " + " ".join(f"{c:>20}" for c in ratios))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
