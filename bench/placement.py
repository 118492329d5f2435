"""The placement benchmark: the Mélange ILP's solve time against CBC, and what a mix of
GPU types saves against the best single type.

::

    python bench/placement.py [--quick] [--json] [--seeds N] [--time-limit-s S]
                              [--traces-dir DIR] [--plots DIR | --no-plots]

**The GPU profiles are modelled, not measured.** Each type's ``tputs`` come from
``control.autoscale.capacity`` (one replica's highest Poisson rate within a mean TTFT
and TPOT for a token mix, from a ``sim.profile.StepProfile``), on the router's 12 x 12
request-size ticks (powers of two, 16 .. 32768 tokens, output x input). The StepProfiles
scale the default one (Llama-2-7B shapes on an A100-80GB, ``sim.profile``) by each type's
public peak dense bf16 FLOP/s (prefill, decode and attention compute) and HBM bandwidth
(the weight read in the fixed step cost, the KV read); KV blocks from memory less the
13.5 GB of weights; a cell whose single request does not fit the KV cache is 0::

    type        TFLOP/s  GB/s   GB  $/hour (on demand)
    L4            121     300   24  0.70   (NVIDIA datasheet; price as recalled from Mélange)
    A10G          125     600   24  1.01   (NVIDIA A10 datasheet; AWS g5.xlarge, Mélange's)
    A100-80GB     312    2039   80  3.67   (the default profile; Mélange's example price)
    H100          989    3350   80  7.52   (H100 SXM datasheet; price as recalled from Mélange)

The context window is not limited (a 7B model with long context is assumed).

(a) Solve time and cost, HiGHS against CBC (PuLP), on the same problems: 12 x 12 buckets,
the 4 types, slice factor 1, 4 and 8; each seed draws a request mix (half the mass from a
random trace's histogram, half spread by a Dirichlet draw over the cells where the A100
serves at least 0.5 req/s — up to 8k-token prompts and 2k-token outputs, 74 cells —
so many more cells carry traffic than in a trace) and a rate from 5 to 60 req/s. Both
solvers get the model ``control.placement.solver`` solves (slice counts per cell and type,
"counts") and Mélange's own (one binary per slice and type, "slices": what Mélange and
AIBrix hand CBC); each with ``--time-limit-s`` (60; ``--quick`` 20), without a start
solution. Reported: median, min and max solve seconds (model building included: PuLP
writes an MPS file for CBC, highspy takes arrays) per solver and form, the HiGHS/CBC
ratio per form and HiGHS on counts against CBC on slices (Shoal against Mélange), the
number of solves that did not prove optimality, whether the proven costs agree, and how
far the greedy (the fallback) lands above the optimum.

(b) Savings: for each trace (Azure 2023 conversation and code, Mooncake conversation:
their (input, output) lengths histogrammed onto the ticks) and rate (0.5 .. 64 req/s), the
ILP's cost against the best single type's (``solver.single_type_costs``), under a loose
(TPOT 120 ms, TTFT 10 s) and a tight (TPOT 40 ms, TTFT 2 s) mean SLO; slice factor 4.
The curve (savings % against rate, one line per trace and SLO) goes to
``bench/plots/placement_savings.png`` (``--plots``).

``--json`` prints ``{"solve": {"slice_factor_K": {FORM: {SOLVER: {"median_s", "min_s",
"max_s", "timeouts"}}, "ratio_median": {FORM: x}, "shoal_vs_melange_median": x,
"shoal_vs_melange_max": x, "costs_equal": bool, "greedy_gap_median": x, "greedy_gap_max":
x}}, "savings": {TRACE:
{SLO: [{"rate", "cost", "best_single", "best_single_gpu", "savings", "gpus"}]}}}``.
Full run: 10 seeds. ``--quick``: 2 seeds, slice factors 1 and 8, counts form only, 4 rates,
no plot
(well under 30 s on two cores).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from control.autoscale.capacity import EngineLimits, Slo, TokenMix, capacity  # noqa: E402
from control.placement.formats import count_requests  # noqa: E402
from control.placement.greedy import greedy_counts  # noqa: E402
from control.placement.problem import Problem  # noqa: E402
from control.placement.solver import build_milp, single_type_costs, solve, solve_milp  # noqa: E402
from control.placement.types import GpuProfile, Limits, Slos, Workload  # noqa: E402
from sim.profile import DEFAULT_PROFILE, StepProfile  # noqa: E402

TICKS = tuple(2**e for e in range(4, 16))  # 16 .. 32768: the router's request-size edges
WEIGHTS_BYTES = 13.5e9  # Llama-2-7B in bf16
KV_BYTES_PER_TOKEN = 32 * 2 * 4096 * 2  # layers x (K, V) x hidden x bf16
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    tflops: float  # peak dense bf16
    bandwidth_gbs: float
    memory_gb: float
    price: float  # $/hour


SPECS = (
    GpuSpec("L4", 121, 300, 24, 0.70),
    GpuSpec("A10G", 125, 600, 24, 1.01),
    GpuSpec("A100-80GB", 312, 2039, 80, 3.67),
    GpuSpec("H100", 989, 3350, 80, 7.52),
)
_A100 = SPECS[2]
SLOS = {"loose": Slo(ttft_s=10.0, tpot_s=0.120), "tight": Slo(ttft_s=2.0, tpot_s=0.040)}


def step_profile(spec: GpuSpec) -> StepProfile:
    """The default (A100) step profile scaled to ``spec``'s compute and bandwidth."""
    compute = _A100.tflops / spec.tflops
    memory = _A100.bandwidth_gbs / spec.bandwidth_gbs
    weights_read = WEIGHTS_BYTES / (_A100.bandwidth_gbs * 1e9)  # the part of c0 that scales
    return StepProfile(
        c0_s=weights_read * memory + (DEFAULT_PROFILE.c0_s - weights_read),
        c_prefill_s=DEFAULT_PROFILE.c_prefill_s * compute,
        c_decode_s=DEFAULT_PROFILE.c_decode_s * compute,
        c_kv_s=DEFAULT_PROFILE.c_kv_s * memory,
        c_request_s=DEFAULT_PROFILE.c_request_s,
        c_attn_s=DEFAULT_PROFILE.c_attn_s * compute,
    )


def gpu_profile(spec: GpuSpec, slo: Slo) -> GpuProfile:
    """``spec``'s modelled AIBrix-style profile on the 12 x 12 ticks."""
    blocks = int((0.9 * spec.memory_gb * 1e9 - WEIGHTS_BYTES) / (BLOCK_SIZE * KV_BYTES_PER_TOKEN))
    limits = EngineLimits(num_gpu_blocks=blocks)
    profile = step_profile(spec)
    rows = []
    for output_tokens in TICKS:
        row = []
        for prompt_tokens in TICKS:
            if (prompt_tokens + output_tokens) / BLOCK_SIZE + 1 > blocks:
                row.append(0.0)  # one request alone does not fit the KV cache
                continue
            mix = TokenMix(prompt_tokens, output_tokens)
            row.append(capacity(profile, mix, slo, limits).rps)
        rows.append(tuple(row))
    return GpuProfile(
        gpu=spec.name,
        cost=spec.price,
        tputs=tuple(rows),
        out_ticks=TICKS,
        in_ticks=TICKS,
        slos=Slos(ttft_s=slo.ttft_s, tpot_s=slo.tpot_s, percentile=0.0),
        model="llama-2-7b (modelled)",
    )


def trace_sizes(traces_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """(output, input) tokens of every request of each trace found in ``traces_dir``."""
    out: dict[str, list[tuple[int, int]]] = {}
    for name, file in (("azure_conv", "azure2023_conv.csv"), ("azure_code", "azure2023_code.csv")):
        path = traces_dir / file
        if path.exists():
            with path.open(newline="") as f:
                out[name] = [
                    (max(1, int(r["GeneratedTokens"])), max(1, int(r["ContextTokens"])))
                    for r in csv.DictReader(f)
                ]
    path = traces_dir / "mooncake_conversation.jsonl"
    if path.exists():
        with path.open() as f:
            out["mooncake"] = [
                (max(1, int(r["output_length"])), max(1, int(r["input_length"])))
                for r in map(json.loads, f)
            ]
    return out


def shares(sizes: Sequence[tuple[int, int]]) -> tuple[tuple[float, ...], ...]:
    counts = count_requests(sizes, TICKS, TICKS)
    total = sum(map(sum, counts))
    return tuple(tuple(v / total for v in row) for row in counts)


def random_workload(
    rng: random.Random, histograms: list[Any], slice_factor: int, servable: Any
) -> Workload:
    """Half a random trace's mix, half a Dirichlet draw over the cells some type serves
    (``servable[i][j]``); 5 .. 60 req/s."""
    base = rng.choice(histograms)
    noise = [
        [rng.gammavariate(0.3, 1.0) * servable[i][j] for j in range(len(TICKS))]
        for i in range(len(TICKS))
    ]
    noise_total = sum(map(sum, noise))
    mix = tuple(
        tuple(0.5 * base[i][j] + 0.5 * noise[i][j] / noise_total for j in range(len(TICKS)))
        for i in range(len(TICKS))
    )
    return Workload(rng.uniform(5, 60), mix, TICKS, TICKS, slice_factor)


def timed_solve(
    problem: Problem, form: str, backend: str, time_limit_s: float
) -> tuple[float, float | None, str]:
    """Seconds, cost (None: no plan) and status of one solve of ``problem``."""
    milp = build_milp(problem, per_slice=form == "slices")
    started = time.perf_counter()
    result = solve_milp(milp, backend, time_limit_s)
    seconds = time.perf_counter() - started
    if result.values is None:
        return seconds, None, result.status
    counts = milp.counts(result.values, problem)
    return seconds, problem.cost(problem.replicas(counts)), result.status


def bench_solve(
    profiles: Sequence[GpuProfile],
    histograms: list[Any],
    seeds: int,
    slice_factors: Sequence[int],
    forms: Sequence[str],
    time_limit_s: float,
    progress: Any,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in slice_factors:
        times: dict[str, dict[str, list[float]]] = {f: {"highs": [], "cbc": []} for f in forms}
        timeouts = {f: {"highs": 0, "cbc": 0} for f in forms}
        equal = True
        gaps: list[float] = []
        # cells where the A100 serves >= 0.5 req/s: up to 8k-token prompts and 2k-token
        # outputs, where the types compete (beyond, a few H100s decide each cell)
        servable = [
            [profiles[2].tputs[i][j] >= 0.5 for j in range(len(TICKS))] for i in range(len(TICKS))
        ]
        for seed in range(seeds):
            workload = random_workload(random.Random(seed), histograms, k, servable)
            problem = Problem.build(profiles, workload, Limits())
            costs: dict[tuple[str, str], tuple[float | None, str]] = {}
            for form in forms:
                for backend in ("highs", "cbc"):
                    seconds, cost, status = timed_solve(problem, form, backend, time_limit_s)
                    times[form][backend].append(seconds)
                    timeouts[form][backend] += status != "optimal"
                    costs[(form, backend)] = (cost, status)
                    progress(
                        f"  k={k} seed={seed} {form:7} {backend:5} {seconds:7.2f} s "
                        f"cost {cost if cost is None else round(cost, 2)} ({status})"
                    )
            proven = [c for c, s in costs.values() if s == "optimal" and c is not None]
            if proven and any(abs(c - proven[0]) > 1e-6 * max(1, proven[0]) for c in proven):
                equal = False
            greedy = greedy_counts(problem)
            if proven and greedy is not None:
                gaps.append(problem.cost(problem.replicas(greedy)) / min(proven) - 1)
        entry: dict[str, Any] = {}
        for form in forms:
            entry[form] = {
                backend: {
                    "median_s": statistics.median(values),
                    "min_s": min(values),
                    "max_s": max(values),
                    "timeouts": timeouts[form][backend],
                }
                for backend, values in times[form].items()
            }
        entry["ratio_median"] = {
            form: entry[form]["highs"]["median_s"] / entry[form]["cbc"]["median_s"]
            for form in forms
        }
        if "slices" in forms:  # what Shoal runs against what Mélange and AIBrix run
            entry["shoal_vs_melange_median"] = (
                entry["counts"]["highs"]["median_s"] / entry["slices"]["cbc"]["median_s"]
            )
            entry["shoal_vs_melange_max"] = (
                entry["counts"]["highs"]["max_s"] / entry["slices"]["cbc"]["max_s"]
            )
        entry["costs_equal"] = equal
        entry["greedy_gap_median"] = statistics.median(gaps) if gaps else None
        entry["greedy_gap_max"] = max(gaps) if gaps else None
        out[f"slice_factor_{k}"] = entry
    return out


def bench_savings(
    sizes: dict[str, list[tuple[int, int]]], rates: Sequence[float], progress: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for slo_name, slo in SLOS.items():
        profiles = [gpu_profile(spec, slo) for spec in SPECS]
        for trace, requests in sizes.items():
            mix = shares(requests)
            rows = []
            for rate in rates:
                workload = Workload(rate, mix, TICKS, TICKS, 4)
                plan = solve(profiles, workload, time_limit_s=30)
                singles = {
                    g: c for g, c in single_type_costs(profiles, workload).items() if c is not None
                }
                best = min(singles, key=lambda g: singles[g])
                rows.append(
                    {
                        "rate": rate,
                        "cost": round(plan.cost, 4),
                        "best_single": round(singles[best], 4),
                        "best_single_gpu": best,
                        "savings": round(1 - plan.cost / singles[best], 4),
                        "gpus": {g: n for g, n in plan.gpus.items() if n},
                        "status": plan.status,
                    }
                )
                progress(
                    f"  {slo_name:5} {trace:10} {rate:5} req/s: ${plan.cost:8.2f} vs "
                    f"{best} ${singles[best]:8.2f}  savings {rows[-1]['savings']:.1%}  "
                    f"{rows[-1]['gpus']}"
                )
            out.setdefault(trace, {})[slo_name] = rows
    return out


def plot(savings: dict[str, Any], path: Path, progress: Any) -> None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ModuleNotFoundError:
        progress("plot skipped: matplotlib is not installed (pip install 'shoal[bench]')")
        return
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    fig, axes = plt.subplots(1, len(SLOS), figsize=(11, 4), sharey=True)
    for ax, slo_name in zip(axes, SLOS, strict=True):
        for trace, by_slo in savings.items():
            rows = by_slo[slo_name]
            ax.plot(
                [r["rate"] for r in rows],
                [100 * r["savings"] for r in rows],
                marker="o",
                label=trace,
            )
        slo = SLOS[slo_name]
        ax.set_title(f"{slo_name}: TPOT {slo.tpot_s * 1000:.0f} ms, TTFT {slo.ttft_s:g} s")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cost saved vs best single GPU type (%)")
    axes[0].legend()
    fig.suptitle("Mélange ILP (HiGHS) over L4/A10G/A100/H100, modelled profiles", y=1.03)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    progress(f"plot: {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--seeds", type=int, default=0, help="problems per slice factor (10)")
    parser.add_argument("--time-limit-s", type=float, default=0.0, help="per solve (60)")
    parser.add_argument(
        "--traces-dir",
        default=os.environ.get("SHOAL_TRACES", str(ROOT.parent / "shared" / "traces")),
    )
    parser.add_argument("--plots", default=str(ROOT / "bench" / "plots"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()

    def progress(line: str) -> None:
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)

    sizes = trace_sizes(Path(args.traces_dir))
    if not sizes:
        progress(f"no traces in {args.traces_dir}: the mixes are Dirichlet draws only")
    seeds = args.seeds or (2 if args.quick else 10)
    time_limit_s = args.time_limit_s or (20.0 if args.quick else 60.0)
    slice_factors = (1, 8) if args.quick else (1, 4, 8)
    forms = ("counts",) if args.quick else ("counts", "slices")
    rates = (1, 4, 16, 64) if args.quick else (0.5, 1, 2, 4, 8, 16, 32, 64)

    profiles = [gpu_profile(spec, SLOS["loose"]) for spec in SPECS]
    uniform = tuple(tuple(1 / len(TICKS) ** 2 for _ in TICKS) for _ in TICKS)
    histograms = [shares(s) for s in sizes.values()] or [uniform]
    progress(f"== solve time, {seeds} seeds, 12x12 buckets, {len(profiles)} GPU types")
    solve_out = bench_solve(
        profiles, histograms, seeds, slice_factors, forms, time_limit_s, progress
    )
    progress("== savings against the best single GPU type")
    savings = bench_savings(sizes, rates, progress) if sizes else {}
    if not (args.quick or args.no_plots) and savings:
        plot(savings, Path(args.plots) / "placement_savings.png", progress)

    out = {"solve": solve_out, "savings": savings}
    if args.json:
        print(json.dumps(out))
    else:
        print(_table(solve_out))
    return 0


def _table(solve_out: dict[str, Any]) -> str:
    lines = ["slice  form     solver  median_s  min_s   max_s  timeouts"]
    for key, entry in solve_out.items():
        k = key.rsplit("_", 1)[1]
        for form in ("counts", "slices"):
            for solver, f in entry.get(form, {}).items():
                lines.append(
                    f"{k:>5}  {form:7}  {solver:6} {f['median_s']:8.2f} {f['min_s']:6.2f} "
                    f"{f['max_s']:7.2f}  {f['timeouts']}"
                )
        ratios = ", ".join(f"{form} {r:.2f}" for form, r in entry["ratio_median"].items())
        lines.append(
            f"       HiGHS/CBC median ratio: {ratios}; costs equal: {entry['costs_equal']}"
        )
        if entry["greedy_gap_median"] is not None:
            lines.append(
                f"       greedy above the optimum: median {entry['greedy_gap_median']:.1%}, "
                f"max {entry['greedy_gap_max']:.1%}"
            )
        if "shoal_vs_melange_median" in entry:
            lines.append(
                "       HiGHS counts / CBC slices (Shoal vs Mélange): median "
                f"{entry['shoal_vs_melange_median']:.2f}, max {entry['shoal_vs_melange_max']:.2f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
