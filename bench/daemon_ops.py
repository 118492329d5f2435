"""The cache daemon's CPU cost per request and per block, measured in-process (issue 17).

What it drives: a real ``CacheDaemon`` (arena, tiers, store, handlers) whose socket is never
used: requests are encoded as a client would and handed to the daemon's request path
(``CacheDaemon._handle``: size check, decode, session checks, the handler, the reply's
encoding, the latency histogram) directly, so the figures are the daemon's Python only,
without ZeroMQ, the client or the copies. A second layer calls the store alone, as the
daemon does (``reserve_columns`` / ``commit`` / ``acquire_columns`` / ``release``, or on
an older tree ``reserve`` / ``acquire`` and the wire's lists built from their answers).

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
E2E_SIZES = [64 << 10, 256 << 10, 1 << 20]  # blocks of --e2e runs
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

    # The calls the daemon makes: the batch ("columns") forms where the tree has them,
    # else the per-block ones (and the wire's columns built from their answers, as the
    # daemon did then).
    def reserve_objects(*args: Any) -> tuple[bytes, list[int]]:
        results = store.reserve(*args)
        return bytes(r.status for r in results), [r.offset for r in results]

    def acquire_objects(session: int, keys: list[bytes]) -> tuple[list[int], ...]:
        leases = store.acquire(session, keys)
        return ([-1 if x is None else x.offset for x in leases],
                [0 if x is None else x.nbytes for x in leases],
                [0 if x is None else x.checksum for x in leases])  # fmt: skip

    reserve = getattr(store, "reserve_columns", reserve_objects)
    acquire = getattr(store, "acquire_columns", acquire_objects)

    def via_store(n: int) -> dict[str, int]:
        keys = [os.urandom(16) for _ in range(n)]
        sizes, checksums = [block_bytes] * n, [7] * n
        times = {}
        started = clock()
        statuses, _ = reserve(session, keys, sizes, None)
        times["reserve"] = clock() - started
        assert not any(statuses), "the arena is sized to hold a batch"
        started = clock()
        store.commit(session, keys, checksums)
        times["commit"] = clock() - started
        started = clock()
        acquire(session, keys)
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


def _daemon_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` so far, all its threads (ZeroMQ's I/O thread
    included), in nanoseconds from each thread's schedstat (/proc's utime and stime
    count 10 ms ticks: too coarse for a few thousand blocks)."""
    total_ns = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total_ns += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total_ns / 1e9


def _e2e_client(endpoint: str, worker: int, block_bytes: int, batches: int,
                batch_bytes: int, barrier: Any) -> None:  # fmt: skip
    """One engine process: put ``batches`` calls of fresh keys, then get them all back."""
    try:
        _e2e_calls(endpoint, worker, block_bytes, batches, batch_bytes, barrier)
    except BaseException:
        barrier.abort()  # the parent and the other clients stop waiting
        raise


def _e2e_calls(endpoint: str, worker: int, block_bytes: int, batches: int,
               batch_bytes: int, barrier: Any) -> None:  # fmt: skip
    import numpy as np

    from kvcache.client import CacheClient

    per_batch = max(1, batch_bytes // block_bytes)
    client = CacheClient(endpoint, name=f"ops-{worker}", populate=True)
    sources = [np.full(block_bytes, (worker + i) % 256, dtype=np.uint8) for i in range(per_batch)]
    outs = [np.empty(block_bytes, dtype=np.uint8) for _ in range(per_batch)]
    keys = [[os.urandom(16) for _ in range(per_batch)] for _ in range(batches)]
    warm = [os.urandom(16) for _ in range(per_batch)]
    client.put(warm, sources)
    client.get_into(warm, outs)
    client.delete(warm)
    barrier.wait()  # the parent reads the daemon's CPU time
    for batch in keys:
        assert client.put(batch, sources, wait=False).stored == per_batch
    barrier.wait()
    for batch in keys:
        assert client.get_into(batch, outs) == per_batch
    barrier.wait()
    for batch in keys:
        client.delete(batch)
    client.close()


def measure_e2e(tree: Path, block_sizes: list[int], clients: int, total_mib: int) -> dict:
    """The daemon's CPU time per block under real client processes (``bench/kvcache.py``'s
    put and get calls): CPU seconds of the daemon process over the put phase and the get
    phase, divided by the blocks moved. CPU time, not wall time, so the figure holds on a
    shared machine; it includes everything the daemon spends on a block (receiving,
    handling, replying, the deferred eviction bookkeeping, ZeroMQ's I/O thread)."""
    import multiprocessing

    from kvcache.client import CacheClient
    from kvcache.config import CacheConfig
    from kvcache.errors import CacheUnavailable

    batch_bytes = 64 << 20
    workdir = Path(tempfile.mkdtemp(prefix="shoal-daemon-ops-"))
    name = f"opse2e{os.getpid()}"
    config = CacheConfig(name=name, runtime_dir=str(workdir / "run"))
    shm_bytes = clients * total_mib * (1 << 20) + (256 << 20)
    args = [sys.executable, "-m", "shoal", "cache", "serve", "--name", name,
            "--runtime-dir", config.runtime_dir, "--shm-bytes", str(shm_bytes),
            "--dram-bytes", "0", "--metrics-port", "0", "--log-level", "warning"]  # fmt: skip
    # cwd too: ``python -m`` puts the working directory first on sys.path, ahead of
    # PYTHONPATH, so a daemon started from another checkout would run that one's code.
    daemon = subprocess.Popen(args, cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)})
    out: dict[str, Any] = {"clients": clients, "total_mib_per_client": total_mib}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                CacheClient(config.endpoint, timeout_s=2, heartbeat=False).close()
                break
            except CacheUnavailable:
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise RuntimeError("the daemon did not start") from None
                time.sleep(0.1)
        context = multiprocessing.get_context("spawn")
        for block_bytes in block_sizes:
            per_batch = max(1, batch_bytes // block_bytes)
            batches = max(1, total_mib * (1 << 20) // batch_bytes)
            barrier = context.Barrier(clients + 1)
            workers = [context.Process(target=_e2e_client, args=(config.endpoint, w, block_bytes,
                                                                 batches, batch_bytes, barrier))
                       for w in range(clients)]  # fmt: skip
            for process in workers:
                process.start()
            marks = []
            try:
                for _ in range(3):
                    barrier.wait(timeout=300)  # broken at once if a client fails
                    marks.append(_daemon_cpu_s(daemon.pid))
            finally:
                for process in workers:
                    process.join(60)
                    if process.exitcode is None:
                        process.terminate()
            if any(process.exitcode for process in workers):
                raise RuntimeError("a client failed (its traceback is above)")
            blocks = clients * batches * per_batch
            out[f"{block_bytes >> 10}KiB"] = {
                "blocks": blocks,
                "put_cpu_us_per_block": round((marks[1] - marks[0]) / blocks * 1e6, 2),
                "get_cpu_us_per_block": round((marks[2] - marks[1]) / blocks * 1e6, 2),
            }
    finally:
        daemon.terminate()
        daemon.wait(30)
        Path(config.shm_dir, f"shoal-{name}.arena.lock").unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    return out


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


def compare_runs(other: Path, repeats: int, argv: list[str]) -> dict[str, Any]:
    """Alternate runs of ``other``'s tree and this one's, each in a fresh interpreter."""
    this = Path(__file__).resolve().parents[1]
    trees = {"other": other.resolve(), "this": this}
    runs: dict[str, Any] = {"trees": {k: str(v) for k, v in trees.items()}, "repeats": repeats,
                            "other": [], "this": []}  # fmt: skip
    for _ in range(repeats):
        for side, tree in trees.items():
            done = subprocess.run(
                [sys.executable, __file__, "--json", "--tree", str(tree), *argv],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[side].append(json.loads(done.stdout))
    return runs


def summarise(runs: dict[str, Any]) -> dict[str, Any]:
    """Per layer and op: the median (and range) of each side's fitted costs."""
    out: dict[str, Any] = {"trees": runs["trees"], "repeats": runs["repeats"]}
    for layer in LAYERS:
        out[layer] = {}
        for op in OPS:
            row = {}
            for side in ("other", "this"):
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


def summarise_e2e(runs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"trees": runs["trees"], "repeats": runs["repeats"], "e2e": {}}
    for size in (f"{b >> 10}KiB" for b in E2E_SIZES):
        for phase in ("put", "get"):
            field = f"{phase}_cpu_us_per_block"
            row = {}
            for side in ("other", "this"):
                values = [r[size][field] for r in runs[side]]
                row[side] = round(statistics.median(values), 2)
                row[f"{side}_range"] = [min(values), max(values)]
            out["e2e"][f"{size} {phase}"] = row
    return out


def format_e2e(result: dict[str, Any]) -> str:
    if "e2e" not in result:
        return "\n".join(f"{size}: put {row['put_cpu_us_per_block']} us, get "
                         f"{row['get_cpu_us_per_block']} us of daemon CPU per block"
                         for size, row in result.items() if isinstance(row, dict))  # fmt: skip
    lines = [f"daemon CPU us per block; other = {result['trees']['other']}, this = "
             f"{result['trees']['this']}; median (min..max) of {result['repeats']} "
             "alternating runs each"]  # fmt: skip
    for name, row in result["e2e"].items():
        lo, hi = row["other_range"]
        lo2, hi2 = row["this_range"]
        lines.append(f"{name:>12}: {row['other']:7.2f} ({lo:.2f}..{hi:.2f}) -> "
                     f"{row['this']:7.2f} ({lo2:.2f}..{hi2:.2f})")  # fmt: skip
    return "\n".join(lines)


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
    parser.add_argument(
        "--e2e", action="store_true", help="the daemon's CPU per block under real client processes"
    )
    parser.add_argument("--clients", type=int, default=1, help="client processes with --e2e")
    parser.add_argument("--total-mib", type=int, default=256, help="per client with --e2e")
    args = parser.parse_args(argv)
    blocks = sorted({int(b) for b in args.blocks.split(",")})
    if args.compare:
        passed = (["--e2e", "--clients", str(args.clients), "--total-mib", str(args.total_mib)]
                  if args.e2e else
                  ["--rounds", str(args.rounds), "--blocks", args.blocks,
                   "--block-bytes", str(args.block_bytes), "--clock", args.clock])  # fmt: skip
        runs = compare_runs(args.compare, args.repeats, passed)
        result = summarise_e2e(runs) if args.e2e else summarise(runs)
    elif args.e2e:
        _import_tree(args.tree)
        result = measure_e2e(args.tree, E2E_SIZES, args.clients, args.total_mib)
    else:
        _import_tree(args.tree)
        result = measure(blocks, args.rounds, args.block_bytes, args.clock)
    if args.json:
        print(json.dumps(result))
    else:
        print(format_e2e(result) if args.e2e else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
