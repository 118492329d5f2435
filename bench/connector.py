"""vLLM connector benchmark: save/load between a paged KV cache and the daemon, next to the
plain gather/scatter of the same blocks in the same process (the limit).

Shape: a 7B-class model (32 layers, 8 KV heads, head dim 128, bf16; 128 KiB of KV per
token), vLLM's flash-attention layout ``(2, num_blocks, 16, 8, 128)`` per layer, 16-token
blocks and 256-token Shoal chunks (32 MiB each). Every round moves the same blocks, first
through the limit, then through Shoal (``bench/rounds.py``: a drift in background load hits
both; the first round only warms up):

* limit: per layer, ``index_select`` of the step's blocks into a preallocated, pre-touched
  buffer (save) and ``index_copy_`` back into other blocks (load): the copies any
  connector must do, with no daemon, no checksums and no protocol;
* Shoal: the connector's worker against a real daemon process. save = what the engine's
  step waits for: reserve in the daemon + per-layer gather into the shared-memory arena
  (the checksums and the commit run on the connector's save thread behind the step;
  ``save_committed_gbps`` times until they are done too). load = lease + per-layer
  scatter from the arena with the checksum verified as it goes + release. Keys are fresh
  each iteration, so every save really writes.

Step overhead: the scheduler side's cost per step (the new request's lookup with its
inline wait, allocation bookkeeping and the step plan for 16 running requests) with every
chunk a hit and with every chunk a miss, against the same daemon. As in vLLM, a lookup not
answered within the inline wait is "not yet": the request is asked again the next step,
and each of those steps is a sample too (``deferred_steps`` counts them). On a loaded
machine one round trip in a few hundred can take longer than the wait (a scheduling
hiccup of either process); counting that step as a failure is what made full runs fail
with "expected a full hit, got None".

On CUDA (``--device cuda``) the paged cache lives on the GPU and the arena is registered
as pinned memory; the limit is then device gather + DMA to/from a pinned buffer.

Every GB/s figure is the median of the rounds, shown with its min and max; every ratio is
taken round by round (Shoal in round i / the limit in round i) and summarised the same way,
and a target (>= 0.85 of the limit) is judged on the median ratio.

    python bench/connector.py [--quick] [--json] [--device cpu|cuda] [--rounds N]

``--json`` prints one JSON object: {"save_gbps", "load_gbps", "limit_gbps",
"limit_save_gbps", "limit_load_gbps", "save_vs_limit", "load_vs_limit",
"step_overhead_ms", "step_overhead_hit_ms", "step_overhead_miss_ms", ...}: GB/s are
medians of rounds, ``save_vs_limit``/``load_vs_limit`` the medians of the per-round ratios,
``limit_gbps`` the mean of the save and load limits and ``step_overhead_ms`` the larger of
the hit and miss figures. The spreads: "save_gbps_spread", "save_committed_gbps_spread",
"load_gbps_spread", "limit_save_gbps_spread", "limit_load_gbps_spread" and the ratios
"save_ratio", "save_committed_ratio", "load_ratio" (Shoal / limit), each {"median", "min",
"max", "rounds"}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.kvcache import start_daemon, stop_daemon  # noqa: E402
from bench.rounds import ForeignCpu, Spread, fmt_spread, paired_ratios  # noqa: E402
from kvcache.client import CacheClient  # noqa: E402
from kvcache.connector.plan import ChunkGeometry, LoadJob, SaveJob, StepPlan  # noqa: E402
from kvcache.connector.scheduler import ConnectorScheduler  # noqa: E402
from kvcache.connector.settings import ConnectorSettings  # noqa: E402
from kvcache.connector.worker import ConnectorWorker  # noqa: E402
from kvcache.keys import Namespace, chain_keys  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
TARGET_RATIO = 0.85
LAYERS, HEADS, HEAD_DIM, BLOCK, CHUNK = 32, 8, 128, 16, 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copies(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    device = torch.device(args.device)
    geometry = ChunkGeometry(BLOCK, CHUNK)
    k = geometry.blocks_per_chunk
    num_blocks = args.chunks * k * 2 + 8
    caches = {
        f"model.layers.{i}.self_attn.attn": torch.randn(
            2, num_blocks, BLOCK, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=device
        )
        for i in range(LAYERS)
    }
    chunk_bytes = LAYERS * 2 * BLOCK * HEADS * HEAD_DIM * 2 * k
    moved = chunk_bytes * args.chunks
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(num_blocks, generator=generator).tolist()
    src_blocks = order[: args.chunks * k]
    dst_blocks = order[args.chunks * k : 2 * args.chunks * k]

    # -- the limit: gather/scatter of the same blocks into/out of a pre-touched buffer --
    pinned = device.type == "cuda"
    staging = [
        torch.empty(
            2, args.chunks * k, BLOCK, HEADS, HEAD_DIM, dtype=torch.bfloat16, pin_memory=pinned
        )
        for _ in range(LAYERS)
    ]
    for buffer in staging:
        buffer.fill_(1)
    src_index = torch.tensor(src_blocks, device=device)
    dst_index = torch.tensor(dst_blocks, device=device)

    def limit_save() -> float:
        _sync(device)
        start = time.perf_counter()
        for buffer, cache in zip(staging, caches.values(), strict=True):
            if device.type == "cuda":
                buffer.copy_(cache.index_select(1, src_index), non_blocking=True)
            else:
                torch.index_select(cache, 1, src_index, out=buffer)
        _sync(device)
        return float(moved / (time.perf_counter() - start) / 1e9)

    def limit_load() -> float:
        _sync(device)
        start = time.perf_counter()
        for buffer, cache in zip(staging, caches.values(), strict=True):
            cache.index_copy_(1, dst_index, buffer.to(device, non_blocking=True))
        _sync(device)
        return float(moved / (time.perf_counter() - start) / 1e9)

    # -- Shoal: the connector's worker against the daemon --------------------------------
    settings = ConnectorSettings(endpoint=endpoint, io_timeout_s=30)
    worker = ConnectorWorker(settings, geometry, rank=0)
    worker.register(caches, num_blocks)
    assert worker.chunk_bytes == chunk_bytes
    src_ids = [tuple(src_blocks[c * k : (c + 1) * k]) for c in range(args.chunks)]
    dst_ids = [tuple(dst_blocks[c * k : (c + 1) * k]) for c in range(args.chunks)]

    def shoal_round() -> tuple[float, float, float, int]:
        """(save, save committed, load) GB/s of one round on fresh keys; saved chunks."""
        namespace = Namespace(f"bench-{uuid.uuid4().hex}")
        keys = tuple(chain_keys(namespace, list(range(args.chunks * CHUNK)), CHUNK))
        save = SaveJob("r", 0, (keys,), (None,), tuple(src_ids))
        worker.bind(StepPlan(saves=[save]))
        _sync(device)
        start = time.perf_counter()
        for layer in caches:
            worker.save_layer(layer)
        worker.finish()  # the engine's step ends here; checksums and commit run behind it
        elapsed = time.perf_counter() - start
        worker.flush()
        committed = time.perf_counter() - start
        worker.unbind()
        saved = int(worker.stats["saved_chunks"])
        load = LoadJob("r", 0, (keys,), tuple(dst_ids))
        worker.bind(StepPlan(loads=[load]))
        start = time.perf_counter()
        worker.start_loads()
        for layer in caches:
            worker.wait_layer(layer)
        worker.finish()
        _sync(device)
        load_elapsed = time.perf_counter() - start
        worker.unbind()
        errors = worker.take_load_errors()
        if errors:
            raise RuntimeError(f"load errors in the benchmark: {len(errors)} blocks")
        with CacheClient(endpoint, heartbeat=False, populate=False) as client:
            client.delete(keys)  # keep the arena for the next round
        return moved / elapsed / 1e9, moved / committed / 1e9, moved / load_elapsed / 1e9, saved

    # Rounds of (limit save, limit load, Shoal save, Shoal load), so that a drift in
    # background load hits the limit and Shoal alike (bench/rounds.py); the first round
    # warms the arena pages and code paths and is not counted.
    figures: dict[str, list[float]] = {
        k: [] for k in ("limit_save", "limit_load", "save", "save_committed", "load")
    }
    saved = 0
    watch = ForeignCpu(lambda: [args.daemon_pid])
    watch.start()
    for iteration in range(args.rounds + 1):
        round_limit_save, round_limit_load = limit_save(), limit_load()
        save_gbps, commit_gbps, load_gbps, saved = shoal_round()
        if iteration:
            figures["limit_save"].append(round_limit_save)
            figures["limit_load"].append(round_limit_load)
            figures["save"].append(save_gbps)
            figures["save_committed"].append(commit_gbps)
            figures["load"].append(load_gbps)
    foreign_cpu = watch.stop()
    for src, dst in zip(src_blocks, dst_blocks, strict=True):
        for cache in caches.values():
            if not torch.equal(cache[:, src], cache[:, dst]):
                raise RuntimeError("a loaded block differs from the saved one")
    worker.close()
    spreads = {k: Spread.of(v) for k, v in figures.items()}
    ratios = {
        "save": Spread.of(paired_ratios(figures["save"], figures["limit_save"])),
        "save_committed": Spread.of(
            paired_ratios(figures["save_committed"], figures["limit_save"])
        ),
        "load": Spread.of(paired_ratios(figures["load"], figures["limit_load"])),
    }
    return {
        "chunk_bytes": chunk_bytes,
        "bytes_per_iteration": moved,
        "rounds": args.rounds,
        "statistic": "median of rounds; *_spread and *_ratio hold median, min, max, rounds",
        "saved_chunks_total": saved,
        "foreign_cpu": foreign_cpu,
        "save_gbps": spreads["save"].median,
        "save_committed_gbps": spreads["save_committed"].median,
        "load_gbps": spreads["load"].median,
        "limit_save_gbps": spreads["limit_save"].median,
        "limit_load_gbps": spreads["limit_load"].median,
        "limit_gbps": (spreads["limit_save"].median + spreads["limit_load"].median) / 2,
        # the medians of the per-round ratios (what a target is judged on)
        "save_vs_limit": ratios["save"].median,
        "load_vs_limit": ratios["load"].median,
        **{f"{k}_gbps_spread": v.to_json() for k, v in spreads.items()},
        **{f"{k}_ratio": v.to_json() for k, v in ratios.items()},
    }


class _Request:
    def __init__(self, req_id: str, tokens: list[int]) -> None:
        self.request_id = req_id
        self.all_token_ids = tokens
        self.prompt_token_ids = tokens
        self.num_tokens = len(tokens)
        self.num_computed_tokens = 0
        self.kv_transfer_params = None


def measure_step_overhead(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    """The scheduler side's added time per step: one new 2,048-token request (lookup,
    bookkeeping) among 16 running decodes (plan), with all hits or all misses."""
    geometry = ChunkGeometry(BLOCK, CHUNK)
    settings = ConnectorSettings(endpoint=endpoint, lookup_wait_ms=50)
    scheduler = ConnectorScheduler(settings, geometry, [Namespace("bench-step").digest])
    prompt_tokens = 2048
    hit_tokens = list(range(prompt_tokens))
    with CacheClient(endpoint, heartbeat=False) as client:
        keys = chain_keys(Namespace("bench-step").digest, hit_tokens, CHUNK)
        client.put(keys, [bytes(4096)] * len(keys))
    running = []
    for i in range(16):
        request = _Request(f"run{i}", [i, *range(1000, 1300)])
        scheduler.matched_tokens(request, 0)
        request.num_computed_tokens = 300
        running.append(request)
    results: dict[str, float] = {}
    deferred = 0
    for label, base in (("hit", 0), ("miss", 1_000_000)):
        samples = []
        for step in range(args.steps):
            tokens = [base + t for t in hit_tokens] if base else list(hit_tokens)
            tokens.append(50_000 + step)  # a distinct tail: a new request every step
            request = _Request(f"{label}{step}", tokens)
            blocks = SimpleNamespace(get_block_ids=lambda: ([*range(prompt_tokens // BLOCK + 1)],))
            output = SimpleNamespace(
                scheduled_new_reqs=[],
                scheduled_cached_reqs=SimpleNamespace(
                    req_ids=[r.request_id for r in running],
                    resumed_req_ids=set(),
                    new_block_ids=[None] * len(running),
                ),
                num_scheduled_tokens={r.request_id: 1 for r in running},
            )
            count: int | None = None
            for _attempt in range(1000):  # one step each; vLLM asks again after "not yet"
                start = time.perf_counter()
                count, _ = scheduler.matched_tokens(request, 0)
                if count is not None:
                    scheduler.after_alloc(request, blocks, count)
                scheduler.build_plan(output)
                samples.append((time.perf_counter() - start) * 1000)
                if count is not None:
                    break
                deferred += 1
            scheduler.finished(request)
            if label == "hit" and count != prompt_tokens:
                raise RuntimeError(f"expected a full hit, got {count}")
        samples.sort()
        results[f"step_overhead_{label}_ms"] = statistics.median(samples)
        results[f"step_overhead_{label}_p99_ms"] = samples[
            min(len(samples) - 1, int(0.99 * len(samples)))
        ]
    scheduler.close()
    results["deferred_steps"] = deferred
    results["step_overhead_ms"] = max(
        results["step_overhead_hit_ms"], results["step_overhead_miss_ms"]
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and iterations")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--rounds", type=int, default=0, help="rounds (default 5, full 9)")
    args = parser.parse_args()
    if args.rounds < 0:
        parser.error("--rounds must be positive")
    args.chunks = 4 if args.quick else 16  # 128 MiB or 512 MiB per round
    args.rounds = args.rounds or (5 if args.quick else 9)
    args.steps = 100 if args.quick else 500
    shm = (args.chunks * 32 * MiB) * 2 + 256 * MiB
    with tempfile.TemporaryDirectory(prefix="shoal-bench-connector-") as workdir:
        process, config = start_daemon(Path(workdir), shm)
        args.daemon_pid = process.pid
        try:
            result = {
                "device": args.device,
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
                "shape": f"{LAYERS} layers x {HEADS} kv heads x {HEAD_DIM} bf16, "
                f"{BLOCK}-token blocks, {CHUNK}-token chunks",
                **measure_copies(args, config.endpoint),
                **measure_step_overhead(args, config.endpoint),
            }
        finally:
            stop_daemon(process, config)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"connector benchmark ({result['shape']}; {result['device']}, {result['machine']}; "
        f"{result['rounds']} rounds interleaved: limit, Shoal)"
    )
    print(
        "GB/s and ratio (Shoal / limit in the same round) as median [min-max] of rounds; "
        f"other processes took {result['foreign_cpu']:.0%} of the CPUs meanwhile"
    )
    print(f"{'':16}{'Shoal GB/s':>22}{'limit GB/s':>22}{'ratio':>17}")
    for op, limit in (("save", "save"), ("save, committed", "save"), ("load", "load")):
        key = op.replace(", ", "_")
        print(
            f"{op:16}{fmt_spread(result[f'{key}_gbps_spread']):>22}"
            f"{fmt_spread(result[f'limit_{limit}_gbps_spread']):>22}"
            f"{fmt_spread(result[f'{key}_ratio'], percent=True):>17}"
        )
    for op in ("save", "load"):
        met = "met" if result[f"{op}_ratio"]["median"] >= TARGET_RATIO else "NOT met"
        print(f"target {op} >= {TARGET_RATIO:.0%} of the limit (median): {met}")
    for label in ("hit", "miss"):
        print(
            f"step overhead ({label}) {result[f'step_overhead_{label}_ms']:.3f} ms median, "
            f"{result[f'step_overhead_{label}_p99_ms']:.3f} ms p99"
        )
    print(f"lookups answered 'not yet' (asked again the next step): {result['deferred_steps']}")


if __name__ == "__main__":
    main()
