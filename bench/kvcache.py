"""KV-cache daemon benchmark: Shoal next to the memcpy limit and the in-process anchors.

One run measures, for blocks of 64 KiB, 256 KiB, 1 MiB and 4 MiB:

* memcpy limit: torch/numpy copies between preallocated, pre-touched buffers with the same
  thread count as Shoal's figure (bench/anchors.py);
* anchors: aibrix-kvcache's L1 cache and LMCache's LMCacheEngine (CPU backend), in-process,
  per block and per sequence (bench/anchors.py; install with bench/install_anchors.sh);
* Shoal: a real daemon process and 1 (or 2) real client processes. put = reserve +
  checksum + copy into the arena + commit; get = lease + copy out + checksum verify +
  release. Sources and destinations are pre-touched, so every contender pays the same
  copies and no first-touch faults. Throughput is bytes / time of the put (get) calls;
  latency is per batch of ``--batch-bytes``.

Lookups: p50/p99 latency of one ``lookup`` of a fully cached 1,000-key chain.

    python bench/kvcache.py [--quick] [--json] [--clients 1|2] [--no-anchors]

``--json`` prints one JSON object (interface kept for scripts, see the issue):
{"memcpy_gbps": {"64KiB": x, ...}, "put_gbps": {...}, "get_gbps": {...},
 "aibrix_put_gbps": {...}, "aibrix_get_gbps": {...}, "lmcache_put_gbps": {...},
 "lmcache_get_gbps": {...}, "lookup_p50_us": x, ...details}
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# This script is named like the package it measures: drop its own folder from the path so
# `import kvcache` finds the package, and load the anchors module by file path instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from kvcache.client import CacheClient  # noqa: E402
from kvcache.config import CacheConfig  # noqa: E402
from kvcache.errors import CacheUnavailable  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
SIZES = {"64KiB": 64 * KiB, "256KiB": 256 * KiB, "1MiB": MiB, "4MiB": 4 * MiB}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_daemon(workdir: Path, shm_bytes: int) -> tuple[subprocess.Popen[bytes], CacheConfig]:
    name = f"bench{os.getpid()}"
    config = CacheConfig(name=name, runtime_dir=str(workdir / "run"))
    args = [
        sys.executable, "-m", "shoal", "cache", "serve", "--name", name,
        "--runtime-dir", config.runtime_dir, "--shm-bytes", str(shm_bytes), "--dram-bytes", "0",
        "--slab-bytes", "64MiB", "--metrics-port", "0", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(args, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daemon exited with {process.returncode}")
        if config.socket_path.exists():
            try:
                CacheClient(config.endpoint, timeout_s=2, heartbeat=False, populate=False).close()
                return process, config
            except CacheUnavailable:
                pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("daemon did not start")


def _client_worker(
    endpoint: str,
    worker: int,
    block_bytes: int,
    blocks_per_batch: int,
    num_batches: int,
    barrier: Any,
    results: Any,
) -> None:
    """One engine process: put then get ``num_batches`` batches of fresh keys."""
    # populate=True: the arena mapped up front, as it is after the first minutes of a
    # long-running engine (clients map it lazily by default, review m4); the first touch
    # of each page otherwise costs this short run a minor fault per 4 KiB.
    client = CacheClient(endpoint, name=f"bench-{worker}", populate=True)
    rng = np.random.default_rng(worker)
    # Source and destination pools four times the L3 size (pre-touched), cycled batch by
    # batch, so no copy starts from bytes already in cache: the same rule as the limit.
    pool = max(blocks_per_batch, (128 * MiB) // block_bytes)
    source_pool = [rng.integers(0, 256, block_bytes, dtype=np.uint8) for _ in range(pool)]
    out_pool = [np.ones(block_bytes, dtype=np.uint8) for _ in range(pool)]
    num_slices = pool // blocks_per_batch

    def pool_slice(blocks: list[np.ndarray], index: int) -> list[np.ndarray]:
        start = (index % num_slices) * blocks_per_batch
        return blocks[start : start + blocks_per_batch]

    # Warm-up round: maps arena pages into this process, warms caches and code paths.
    warm = [os.urandom(16) for _ in range(blocks_per_batch)]
    client.put(warm, pool_slice(source_pool, 0))
    client.get_into(warm, pool_slice(out_pool, 0))
    client.delete(warm)
    # Put every batch, then read every batch back: the working set (--total-mib) is far
    # larger than the CPU caches, so gets read cold arena memory, as the memcpy limit and
    # the anchors do, instead of bytes the put just left in L3.
    batches = [[os.urandom(16) for _ in range(blocks_per_batch)] for _ in range(num_batches)]
    put_s: list[float] = []
    get_s: list[float] = []
    get_unverified_s: list[float] = []
    barrier.wait()
    for index, keys in enumerate(batches):
        sources = pool_slice(source_pool, index)
        started = time.perf_counter()
        result = client.put(keys, sources, wait=False)
        put_s.append(time.perf_counter() - started)
        assert result.stored == blocks_per_batch, result
    for verify, times in ((True, get_s), (False, get_unverified_s)):
        client.verify_reads = verify
        for index, keys in enumerate(batches):
            outs = pool_slice(out_pool, index)
            started = time.perf_counter()
            served = client.get_into(keys, outs)
            times.append(time.perf_counter() - started)
            assert served == blocks_per_batch, served
    client.verify_reads = True
    for keys in batches:
        client.delete(keys)
    last = len(batches) - 1  # the last batch read back must equal what was put
    pairs = zip(pool_slice(source_pool, last), pool_slice(out_pool, last), strict=True)
    assert all(np.array_equal(s, o) for s, o in pairs)
    results.put((put_s, get_s, get_unverified_s))
    client.close()


def measure_shoal(
    endpoint: str, block_bytes: int, batch_bytes: int, total_bytes: int, clients: int
) -> dict[str, float]:
    blocks_per_batch = max(1, batch_bytes // block_bytes)
    num_batches = max(2, total_bytes // (blocks_per_batch * block_bytes))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(clients)
    results = context.Queue()
    workers = [
        context.Process(
            target=_client_worker,
            args=(endpoint, w, block_bytes, blocks_per_batch, num_batches, barrier, results),
        )
        for w in range(clients)
    ]
    for process in workers:
        process.start()
    collected = [results.get(timeout=300) for _ in workers]
    for process in workers:
        process.join(30)
        if process.exitcode != 0:
            raise RuntimeError(f"bench client exited with {process.exitcode}")
    batch = blocks_per_batch * block_bytes
    put_all = [s for put_s, _, _ in collected for s in put_s]
    get_all = [s for _, get_s, _ in collected for s in get_s]
    # Aggregate throughput: all clients' bytes over the slowest client's busy time.
    moved = clients * num_batches * batch

    def gbps(column: int) -> float:
        return round(moved / max(sum(times[column]) for times in collected) / 1e9, 3)

    return {
        "put_gbps": gbps(0),
        "get_gbps": gbps(1),
        "get_unverified_gbps": gbps(2),
        "put_p50_ms": round(statistics.median(put_all) * 1e3, 3),
        "put_p99_ms": round(_percentile(put_all, 0.99) * 1e3, 3),
        "get_p50_ms": round(statistics.median(get_all) * 1e3, 3),
        "get_p99_ms": round(_percentile(get_all, 0.99) * 1e3, 3),
        "blocks_per_batch": blocks_per_batch,
        "batches": num_batches,
    }


def measure_lookup(endpoint: str, chain: int = 1000, rounds: int = 2000) -> dict[str, float]:
    from kvcache.keys import Namespace, chain_keys

    keys = chain_keys(Namespace(model="bench@1"), list(range(16 * chain)), 16)
    with CacheClient(endpoint, name="bench-lookup") as client:
        block = np.ones(4 * KiB, dtype=np.uint8)
        for start in range(0, chain, 250):
            parent = keys[start - 1] if start else None
            client.put(keys[start : start + 250], [block] * len(keys[start : start + 250]), parent)
        assert client.lookup(keys) == chain
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            client.lookup(keys)
            times.append(time.perf_counter() - started)
        client.delete(keys)
    return {
        "lookup_p50_us": round(statistics.median(times) * 1e6, 1),
        "lookup_p99_us": round(_percentile(times, 0.99) * 1e6, 1),
        "lookups_per_s": round(rounds / sum(times)),
    }


def measure_anchor(
    name: str, sizes: list[tuple[str, int, int]], threads: int
) -> dict[str, dict[str, Any]]:
    """Run one anchor for every (label, block_bytes, num_blocks) in a fresh interpreter.

    LMCache and aibrix leave background threads (telemetry, event loops) behind that would
    steal CPU from every later measurement, so they never run in this process.
    """
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import anchors; "
        f"print(json.dumps({{label: anchors.{name}_gbps(b, n, {threads}) "
        f"for label, b, n in {sizes!r}}}))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(BENCH)],
        env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        error = f"{name} exited with {done.returncode}: {done.stderr.strip()[-300:]}"
        return {label: {"error": error} for label, _, _ in sizes}
    result: dict[str, dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _load_anchors() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("shoal_bench_anchors", BENCH / "anchors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> dict[str, Any]:
    anchors = _load_anchors()

    total = args.total_mib * MiB
    threads = args.clients
    out: dict[str, Any] = {
        "clients": args.clients,
        "threads": threads,
        "batch_bytes": args.batch_mib * MiB,
        "total_bytes_per_size": total,
    }
    keys = ("memcpy_gbps", "put_gbps", "get_gbps", "get_unverified_gbps",
            "aibrix_put_gbps", "aibrix_get_gbps",
            "aibrix_put_seq_gbps", "aibrix_get_seq_gbps", "lmcache_put_gbps", "lmcache_get_gbps",
            "lmcache_put_seq_gbps", "lmcache_get_seq_gbps")  # fmt: skip
    for key in keys:
        out[key] = {}
    out["shoal_detail"] = {}
    out["memcpy_detail"] = {}
    workdir = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    shm_bytes = args.clients * total + 128 * MiB  # every batch stays resident until read
    process, config = start_daemon(workdir, shm_bytes)
    try:
        for label, block_bytes in SIZES.items():
            num_blocks = max(1, min(total, 256 * MiB) // block_bytes)
            memcpy = anchors.memcpy_gbps(block_bytes, num_blocks, threads)
            out["memcpy_detail"][label] = memcpy
            out["memcpy_gbps"][label] = memcpy.get("best", memcpy.get("error"))
            shoal = measure_shoal(
                config.endpoint, block_bytes, args.batch_mib * MiB, total, args.clients
            )
            out["shoal_detail"][label] = shoal
            out["put_gbps"][label] = shoal["put_gbps"]
            out["get_gbps"][label] = shoal["get_gbps"]
            out["get_unverified_gbps"][label] = shoal["get_unverified_gbps"]
        if args.anchors:
            sizes = [(label, b, max(1, min(total, 256 * MiB) // b)) for label, b in SIZES.items()]
            for name in ("aibrix", "lmcache"):
                for label, result in measure_anchor(name, sizes, threads).items():
                    if "error" in result:
                        out[f"{name}_put_gbps"][label] = result["error"]
                        continue
                    out[f"{name}_put_gbps"][label] = result.get("put_block")
                    out[f"{name}_get_gbps"][label] = result.get("get_block")
                    out[f"{name}_put_seq_gbps"][label] = result.get("put_seq")
                    out[f"{name}_get_seq_gbps"][label] = result.get("get_seq")
        out.update(measure_lookup(config.endpoint, rounds=500 if args.quick else 2000))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"Shoal KV-cache daemon, {result['clients']} client process(es), "
        f"{result['threads']} memcpy thread(s), batches of {result['batch_bytes'] >> 20} MiB "
        "(GB/s; ratio = Shoal / memcpy)",
        f"{'block':>8} {'memcpy':>8} {'put':>8} {'get':>8} {'put%':>6} {'get%':>6} {'get*':>6} "
        f"{'aibrix put/get (seq)':>24} {'lmcache put/get (seq)':>24} {'put p50/p99 ms':>16}",
    ]

    def fmt(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, int | float) else "n/a"

    for label in SIZES:
        memcpy = result["memcpy_gbps"].get(label)
        put, get = result["put_gbps"].get(label), result["get_gbps"].get(label)
        ok = isinstance(memcpy, int | float) and memcpy > 0
        put_pct = f"{put / memcpy:.0%}" if ok else "n/a"
        get_pct = f"{get / memcpy:.0%}" if ok else "n/a"
        anchors_cols = []
        for name in ("aibrix", "lmcache"):
            anchors_cols.append(
                f"{fmt(result[f'{name}_put_gbps'].get(label))}/"
                f"{fmt(result[f'{name}_get_gbps'].get(label))} "
                f"({fmt(result[f'{name}_put_seq_gbps'].get(label))}/"
                f"{fmt(result[f'{name}_get_seq_gbps'].get(label))})"
            )
        detail = result["shoal_detail"][label]
        lines.append(
            f"{label:>8} {fmt(memcpy):>8} {fmt(put):>8} {fmt(get):>8} {put_pct:>6} {get_pct:>6} "
            f"{fmt(result['get_unverified_gbps'].get(label)):>6} "
            f"{anchors_cols[0]:>24} {anchors_cols[1]:>24} "
            f"{detail['put_p50_ms']:>7.2f}/{detail['put_p99_ms']:<7.2f}"
        )
    lines.append("get* = get without checksum verification (client option verify_reads=False)")
    lines.append(
        f"lookup of a 1,000-key chain: p50 {result['lookup_p50_us']} us, "
        f"p99 {result['lookup_p99_us']} us ({result['lookups_per_s']} lookups/s)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer bytes: finishes in < 1 min")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--clients", type=int, default=1, choices=[1, 2])
    parser.add_argument("--batch-mib", type=int, default=64, help="MiB per put/get call")
    parser.add_argument("--total-mib", type=int, default=0, help="bytes per size and client")
    parser.add_argument("--no-anchors", dest="anchors", action="store_false")
    args = parser.parse_args(argv)
    if not args.total_mib:
        args.total_mib = 64 if args.quick else 512
    result = run(args)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
