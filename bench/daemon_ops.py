"""The cache daemon's CPU cost per request and per block, measured in-process (issue 17).

What it drives: a real ``CacheDaemon`` (arena, tiers, store, handlers) whose socket is never
used: requests are encoded as a client would and handed to the daemon's request path
(``CacheDaemon._handle``: size check, decode, session checks, the handler, the reply's
encoding, the latency histogram) directly, so the figures are the daemon's Python only,
without ZeroMQ, the client or the copies. A second layer calls the store alone
(``BlockStore.reserve`` / ``commit`` / ``acquire`` / ``release``) with ready key lists.

Each round writes a fresh batch of ``N`` keys, for N in ``--blocks`` (16 and 256 by
default, a 4 MiB pipeline piece of 256 KiB and of 16 KiB blocks), and times, one call each:

    reserve   the put's first request (the client then copies into the arena)
    commit    its one-way commit (``wait=False``, as ``bench/kvcache.py`` puts)
    get       a lease of the whole batch
    release   the one-way release
    policy    the deferred eviction bookkeeping the daemon applies while idle
              (``flush_policies``): per-block work too, only moved off the request path

then deletes the batch (untimed). Per op it reports the median of the rounds for each N,
and fits ``time = fixed + per_block * N`` through the two smallest/largest N: ``per_block_us``
is what a block costs, ``fixed_us`` what a request costs whatever its size.

    python bench/daemon_ops.py [--json] [--rounds 300] [--blocks 16,256]
    python bench/daemon_ops.py --compare /work/main --repeats 3   # that tree vs this one

``--compare TREE`` runs this script on ``TREE``'s ``kvcache`` and on this tree's,
alternately (``--repeats`` times each, in fresh interpreters), and prints the median of
each side's medians and their ratio: the machine's noise hits both sides alike.
The clock is this thread's CPU time (``--clock cpu``, the default: a round preempted by
another process on a shared machine costs no CPU time) or wall time (``--clock wall``);
either way the median ignores the tail of disturbed rounds.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# CPU time of this thread by default: on a shared machine a round preempted by another
# process costs wall time but not CPU time (``--clock wall`` measures wall time instead).
CLOCKS = {"cpu": time.thread_time_ns, "wall": time.perf_counter_ns}
OPS = ("reserve", "commit", "get", "release", "policy")
LAYERS = ("daemon", "store")


def _import_tree(tree: Path) -> None:
    # This script sits in bench/ next to bench/kvcache.py, a file named like the package:
    # drop bench/ from the path and put the measured tree first.
    bench = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != bench]
    sys.path.insert(0, str(tree))


def measure(blocks: list[int], rounds: int, block_bytes: int, clock: str) -> dict[str, Any]:
    from kvcache import messages as m
    from kvcache.config import CacheConfig
    from kvcache.daemon import CacheDaemon

    workdir = Path(tempfile.mkdtemp(prefix="shoal-daemon-ops-"))
    largest = max(blocks)
    config = CacheConfig(
        name=f"ops{os.getpid()}",
        runtime_dir=str(workdir / "run"),
        shm_bytes=max(64 << 20, 4 * largest * block_bytes),
        dram_bytes=0,
        slab_bytes=64 << 20,
        metrics_port=0,
        populate=False,
    )
    daemon = CacheDaemon(config)
    try:
        return _measure(daemon, m, blocks, rounds, block_bytes, CLOCKS[clock])
    finally:
        daemon.close()
        daemon.arena.lock_path.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)


def _measure(
    daemon: Any, m: Any, blocks: list[int], rounds: int, block_bytes: int, clock: Any
) -> dict[str, Any]:
    identity = b"\x00bench"
    daemon._identity = identity
    hello = m.HelloRequest(id=1, session=0, epoch=0, pid=0, pid_ns=0, namespace="bench",
                           client="daemon_ops", role=m.ENGINE)  # fmt: skip
    reply = m.decode_reply(daemon._handle(identity, hello.encode()))
    session, epoch = reply["session"], reply["epoch"]
    store = daemon.store
    ids = iter(range(2, 1 << 62))

    def request(cls: type, **fields: Any) -> bytes:
        frame: bytes = cls(id=next(ids), session=session, epoch=epoch, **fields).encode()
        return frame

    def via_daemon(n: int) -> dict[str, int]:
        keys = [os.urandom(16) for _ in range(n)]
        joined = b"".join(keys)
        frames = {
            "reserve": request(m.ReserveRequest, keys=joined, sizes=[block_bytes] * n, parent=None),
            "commit": request(m.CommitRequest, keys=joined, checksums=[7] * n, reply=False),
            "get": request(m.GetRequest, keys=joined, prefix=True),
            "release": request(m.ReleaseRequest, keys=joined),
        }
        times = {}
        for op, frame in frames.items():
            started = clock()
            out = daemon._handle(identity, frame)
            times[op] = clock() - started
            if out is not None:
                answer = m.decode_reply(out)
                assert answer["ok"], answer
        started = clock()
        store.flush_policies()
        times["policy"] = clock() - started
        store.delete(keys)
        store.flush_policies()
        return times

    def via_store(n: int) -> dict[str, int]:
        keys = [os.urandom(16) for _ in range(n)]
        sizes, checksums = [block_bytes] * n, [7] * n
        times = {}
        started = clock()
        results = store.reserve(session, keys, sizes, None)
        times["reserve"] = clock() - started
        assert all(r.status == 0 for r in results), "the arena is sized to hold a batch"
        started = clock()
        store.commit(session, keys, checksums)
        times["commit"] = clock() - started
        started = clock()
        store.acquire(session, keys)
        times["get"] = clock() - started
        started = clock()
        store.release(session, keys)
        times["release"] = clock() - started
        started = clock()
        store.flush_policies()
        times["policy"] = clock() - started
        store.delete(keys)
        store.flush_policies()
        return times

    # Blocks already resident, as in a running cache: the policy and the table are not empty.
    resident = [os.urandom(16) for _ in range(256)]
    store.reserve(session, resident, [block_bytes] * len(resident), None)
    store.commit(session, resident, [7] * len(resident))
    store.flush_policies()
    gc.collect()
    gc.freeze()  # as the daemon does every housekeeping tick
    result: dict[str, Any] = {"blocks": blocks, "rounds": rounds, "block_bytes": block_bytes}
    for layer, run in (("daemon", via_daemon), ("store", via_store)):
        medians: dict[str, dict[int, float]] = {op: {} for op in OPS}
        for n in blocks:
            for _ in range(max(3, rounds // 10)):  # warm-up
                run(n)
            samples = [run(n) for _ in range(rounds)]
            for op in OPS:
                medians[op][n] = statistics.median(s[op] for s in samples) / 1e3
        result[layer] = _fit(medians, blocks)
    return result


def _fit(medians: dict[str, dict[int, float]], blocks: list[int]) -> dict[str, dict[str, float]]:
    small, large = min(blocks), max(blocks)
    out: dict[str, dict[str, float]] = {}
    for op, by_n in medians.items():
        per_block = (by_n[large] - by_n[small]) / (large - small) if large > small else 0.0
        out[op] = {
            "per_block_us": round(per_block, 3),
            "fixed_us": round(by_n[small] - per_block * small, 2),
            **{f"median_us_{n}": round(by_n[n], 2) for n in blocks},
        }
    return out


def compare(other: Path, repeats: int, argv: list[str]) -> dict[str, Any]:
    """Alternate runs of ``other``'s tree and this one's; medians of their medians."""
    this = Path(__file__).resolve().parents[1]
    trees = {"other": other.resolve(), "this": this}
    runs: dict[str, list[dict[str, Any]]] = {"other": [], "this": []}
    for _ in range(repeats):
        for side, tree in trees.items():
            done = subprocess.run(
                [sys.executable, __file__, "--json", "--tree", str(tree), *argv],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[side].append(json.loads(done.stdout))
    out: dict[str, Any] = {"trees": {k: str(v) for k, v in trees.items()}, "repeats": repeats}
    for layer in LAYERS:
        out[layer] = {}
        for op in OPS:
            row = {}
            for side in trees:
                for field in ("per_block_us", "fixed_us"):
                    values = [r[layer][op][field] for r in runs[side]]
                    row[f"{side}_{field}"] = round(statistics.median(values), 3)
                    row[f"{side}_{field}_range"] = [min(values), max(values)]
            if row["this_per_block_us"] > 0:
                row["per_block_speedup"] = round(
                    row["other_per_block_us"] / row["this_per_block_us"], 2
                )
            out[layer][op] = row
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = []
    if "trees" in result:
        lines.append(f"other = {result['trees']['other']}, this = {result['trees']['this']}; "
                     f"median of {result['repeats']} alternating runs each (min..max)")  # fmt: skip
        for layer in LAYERS:
            lines.append(f"{layer}: {'op':>8} {'per block us (other -> this)':>40} "
                         f"{'fixed us (other -> this)':>36}")  # fmt: skip
            for op, row in result[layer].items():

                def cell(field: str, row: dict[str, Any] = row) -> str:
                    lo, hi = row[f"other_{field}_range"]
                    lo2, hi2 = row[f"this_{field}_range"]
                    return (f"{row[f'other_{field}']:.2f} ({lo:.2f}..{hi:.2f}) -> "
                            f"{row[f'this_{field}']:.2f} ({lo2:.2f}..{hi2:.2f})")  # fmt: skip

                lines.append(f"{'':>8} {op:>8} {cell('per_block_us'):>40} {cell('fixed_us'):>36}")
        return "\n".join(lines)
    sizes = result["blocks"]
    for layer in LAYERS:
        header = " ".join(f"{f'N={n} us':>10}" for n in sizes)
        lines.append(f"{layer}: {'op':>8} {'per block us':>13} {'fixed us':>9} {header}")
        for op, row in result[layer].items():
            medians = " ".join(f"{row[f'median_us_{n}']:>10.1f}" for n in sizes)
            lines.append(f"{'':>8} {op:>8} {row['per_block_us']:>13.3f} "
                         f"{row['fixed_us']:>9.1f} {medians}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--rounds", type=int, default=300, help="timed rounds per batch size")
    parser.add_argument("--blocks", default="16,256", help="batch sizes, comma-separated")
    parser.add_argument("--block-bytes", type=int, default=256 << 10)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the repository whose kvcache is measured")  # fmt: skip
    parser.add_argument("--compare", type=Path, help="alternate runs of this tree and that one")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side with --compare")
    args = parser.parse_args(argv)
    blocks = sorted({int(b) for b in args.blocks.split(",")})
    if args.compare:
        passed = ["--rounds", str(args.rounds), "--blocks", args.blocks,
                  "--block-bytes", str(args.block_bytes), "--clock", args.clock]  # fmt: skip
        result = compare(args.compare, args.repeats, passed)
    else:
        _import_tree(args.tree)
        result = measure(blocks, args.rounds, args.block_bytes, args.clock)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
