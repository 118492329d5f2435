"""The autoscaling benchmark: every policy side by side on the same traces, in the simulator.

::

    python bench/autoscale.py [--quick] [--json] [--traces a,b] [--policies a,b]
                              [--seed N] [--seeds K] [--traces-dir DIR]
                              [--plots DIR | --no-plots] [--live]

Each trace is replayed by ``control.autoscale.simulate`` (``shoal autoscale simulate``)
once per policy: kpa, apa, hpa, aibrix-kpa, shoal, each behind its own control pipeline
(direct scrapes every 2 s; the HPA through Prometheus every 15 s, ``rate[1m]`` and a 15 s
sync), the same replicas (the 7B/A100 step profile of ``sim.profile``), the same pod start
(``vllm serve`` start + a 7B load at the loader's measured rate: 38 s), the same metric
targets (the controller's default ``kv_cache_usage:0.7,requests_waiting:4``), 1 to 16
replicas, SLO TTFT 1 s / TPOT 100 ms (Mooncake: TTFT 5 s, its prompts average 12k tokens).
The shoal policy is also told the SLO and the pod start time (what its operator sets);
its capacity model and the simulated replicas both use the default step profile, as a
deployment calibrated with ``shoal sim calibrate`` would.

Traces (``--traces-dir``, default ``../shared/traces`` beside the checkout, or
``SHOAL_TRACES``; a missing file skips its trace with a note)::

    azure_conv    Azure 2023 conversation trace, 4 copies of each request (its hour kept)
    azure_code    Azure 2023 code trace, 4 copies (bursts of 100+ req/s between idle minutes)
    mooncake      Mooncake conversation trace x1 (long prompts: the prefill-bound case)
    step          synthetic: 2 -> 20 req/s at 300 s for 15 min, then back
    ramp          synthetic: 2 -> 20 req/s over 5 min, 10 min hold, 5 min down
    spike         synthetic: 4 req/s with 45 s spikes to 24 req/s every 5 min
    step_failing  step with 5% of scrapes failing (seeded): unknown must not read as idle
    (full run only) diurnal: 2 -> 16 -> 2 req/s over 30 min

Each cell is run with ``--seeds`` seeds (3; ``--quick`` 1) and the table and JSON show
the median of each figure: a seed sets the phases of the pipelines' clocks against the
load step (the HPA's first response moves by up to a sync interval with them) and which
scrapes fail; the trace itself is the same. Figures per policy (``run.py`` defines
them): first_response_s (load step to the first scale-up decision), full_scaleup_s (to
the replicas the load needs), oscillations_per_hour,
replica_seconds, slo_attainment, ttft_p99_ms. The table adds each policy's ratio to the HPA
in the same run against the issue's targets (first response <= 0.2x, full scale-up <=
0.4x, >= 33% fewer oscillations, p99 TTFT >= 11.5% lower, replica-seconds <= 1x) and, for
shoal, SLO attainment per replica-hour above kpa's and aibrix-kpa's; pass/MISS marks.
Full scale-up also shows its floor, the physical limit: no policy has the replicas before
one pod start after the load step, so ``pod start / HPA's full scale-up`` is the best
ratio any policy can reach (0.4x is out of reach whenever the HPA needs less than 2.5 pod
starts).

``--json`` prints ``{"traces": {NAME: {POLICY: {"first_response_s", "full_scaleup_s",
"oscillations_per_hour", "replica_seconds", "slo_attainment", "ttft_p99_ms"}}}}`` (a policy
not built yet is there with nulls; ``--live`` adds ``"live"``). ``--quick``: the seven
traces above, no plots, well under three minutes on two cores. PNG plots (replicas and
load over time, one file per trace) need matplotlib; without it the bench says so and
goes on. ``--live`` calls ``bench/autoscale_live.py``'s ``run_live(quick=...)`` (simulated
engines scaled by ``shoal autoscale run`` on the wall clock) when that file exists.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "bench"))

from control.autoscale.config import parse_metrics  # noqa: E402
from control.autoscale.errors import AutoscaleError  # noqa: E402
from control.autoscale.policies import POLICIES, make_policy  # noqa: E402
from control.autoscale.simulate.command import (  # noqa: E402
    DEFAULT_METRICS,
    deployment_options,
)
from control.autoscale.simulate.pipeline import pipeline_for  # noqa: E402
from control.autoscale.simulate.run import (  # noqa: E402
    SimulationResult,
    SimulationSpec,
    Slo,
    simulate,
    start_delay_s,
)
from control.autoscale.simulate.traces import Trace, load_trace  # noqa: E402
from control.autoscale.types import PolicySpec  # noqa: E402

POLICY_NAMES = ("kpa", "apa", "hpa", "aibrix-kpa", "shoal")
KEYS = (
    "first_response_s",
    "full_scaleup_s",
    "oscillations_per_hour",
    "replica_seconds",
    "slo_attainment",
    "ttft_p99_ms",
)
ABSENT = dict.fromkeys(KEYS)
MIN_REPLICAS, MAX_REPLICAS = 1, 16


@dataclass(frozen=True, slots=True)
class Case:
    source: str  # a file name under --traces-dir, or synthetic:...
    copies: float = 1.0
    ttft_slo_s: float = 1.0
    failure_rate: float = 0.0


CASES = {
    "azure_conv": Case("azure2023_conv.csv", 4.0),
    "azure_code": Case("azure2023_code.csv", 4.0),
    "mooncake": Case("mooncake_conversation.jsonl", 1.0, ttft_slo_s=5.0),
    "step": Case("synthetic:step"),
    "ramp": Case("synthetic:ramp"),
    "spike": Case("synthetic:spike"),
    "step_failing": Case("synthetic:step", failure_rate=0.05),
}
FULL_CASES = {
    "diurnal": Case("synthetic:diurnal"),
}
# (figure, the policy's ratio to the HPA must be at most this); None: lower is not better
TARGETS = (
    ("first_response_s", 0.2),
    ("full_scaleup_s", 0.4),
    ("oscillations_per_hour", 0.67),
    ("ttft_p99_ms", 0.885),
    ("replica_seconds", 1.0),
)


@dataclass(frozen=True, slots=True)
class Cell:
    """One policy on one trace: its runs (one per seed) and their median figures."""

    runs: tuple[SimulationResult, ...]

    @property
    def first(self) -> SimulationResult:
        return self.runs[0]

    def figures(self) -> dict[str, float | None]:
        """Per figure, the median over seeds; ``None`` when most runs have none."""
        out: dict[str, float | None] = {}
        for key in KEYS:
            values = sorted(v for r in self.runs if (v := r.figures()[key]) is not None)
            out[key] = values[len(values) // 2] if 2 * len(values) > len(self.runs) else None
        return out

    def efficiency(self) -> float:
        """SLO attainment per replica-hour (of the median figures)."""
        f = self.figures()
        slo, cost = f["slo_attainment"] or 0.0, f["replica_seconds"] or 0.0
        return slo / max(cost / 3600.0, 1e-9)


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_case(case: Case, traces_dir: Path, seed: int = 0) -> Trace | None:
    if case.source.startswith("synthetic:"):
        return load_trace(case.source, copies=case.copies, seed=seed)
    path = traces_dir / case.source
    if not path.exists():
        progress(f"trace {path} not found: skipped (--traces-dir or SHOAL_TRACES)")
        return None
    return load_trace(str(path), copies=case.copies, seed=seed)


def run_case(trace: Trace, case: Case, policy: str, seed: int = 0) -> SimulationResult:
    slo = Slo(ttft_s=case.ttft_slo_s)
    delay = start_delay_s("7b")
    spec = SimulationSpec(
        policy=policy,
        policy_spec=PolicySpec(
            parse_metrics(DEFAULT_METRICS),
            min_replicas=MIN_REPLICAS,
            max_replicas=MAX_REPLICAS,
            options=deployment_options(policy, slo, delay),
        ),
        pipeline=pipeline_for(policy, failure_rate=case.failure_rate, seed=seed),
        slo=slo,
        start_delay_s=delay,
        seed=seed,
    )
    return simulate(trace, spec, make_policy(policy, spec.policy_spec))


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None:
        return None
    if base == 0:
        return None
    return value / base


def marks(results: dict[str, Cell], policy: str) -> list[str]:
    """``figure ratio pass|MISS`` for each target, against the HPA of the same run."""
    hpa = results.get("hpa")
    out = []
    for key, limit in TARGETS:
        mine = results[policy].figures()[key]
        base = hpa.figures()[key] if hpa else None
        r = ratio(mine, base)
        name = key.split("_")[0]
        if base == 0 and mine == 0:
            out.append(f"{name} 0=0 n/a")  # e.g. both already held the target at the step
        elif r is None:
            verdict = "n/a" if base is None else "MISS"  # the policy never got there
            out.append(f"{name} - {verdict}")
        else:
            text = f"{name} {r:.2f}x {'pass' if r <= limit else 'MISS'}"
            if key == "full_scaleup_s" and base:
                # the physical limit: no policy reaches the replicas before one pod start
                text += f" (floor {start_delay_s('7b') / base:.2f}x)"
            out.append(text)
    if policy == "shoal":
        mine_eff = results["shoal"].efficiency()
        for other in ("kpa", "aibrix-kpa"):
            if other in results:
                better = mine_eff > results[other].efficiency()
                out.append(f"SLO/replica-h > {other} {'pass' if better else 'MISS'}")
    return out


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(all_results: dict[str, dict[str, Cell]], traces: dict[str, Trace]) -> str:
    lines = []
    for name, results in all_results.items():
        trace = traces[name]
        any_cell = next(iter(results.values()), None)
        any_result = any_cell.first if any_cell else None
        context = (
            f"load step {cell(any_result.load_step_s, 0)} s, {any_result.initial_replicas} -> "
            f"{any_result.target_replicas} replicas; a pod starts in {start_delay_s('7b'):.1f} s"
            if any_result
            else "no policy ran"
        )
        lines.append(
            f"\n== {name}: {trace.name}, {len(trace.requests):,} requests over "
            f"{trace.duration_s:,.0f} s; {context}"
        )
        header = (
            f"{'policy':<11} {'first s':>8} {'full s':>8} {'osc/h':>7} {'replica-s':>10} "
            f"{'SLO':>6} {'SLO/rep-h':>9} {'p99 TTFT ms':>12}  vs HPA"
        )
        lines.append(header)
        for policy, cell_ in results.items():
            f = cell_.figures()
            row = (
                f"{policy:<11} {cell(f['first_response_s']):>8} {cell(f['full_scaleup_s']):>8} "
                f"{cell(f['oscillations_per_hour']):>7} {cell(f['replica_seconds'], 0):>10} "
                f"{cell(f['slo_attainment'], 3):>6} {cell_.efficiency():>9.3f} "
                f"{cell(f['ttft_p99_ms'], 0):>12}"
            )
            if policy != "hpa":
                row += "  " + "; ".join(marks(results, policy))
            lines.append(row)
    return "\n".join(lines)


def plot(all_results: dict[str, dict[str, Cell]], out_dir: Path) -> list[Path]:
    """One PNG per trace: load and needed replicas, and each policy's serving replicas
    (the first seed's run)."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ModuleNotFoundError:
        progress("plots skipped: matplotlib is not installed (pip install 'shoal[bench]')")
        return []
    matplotlib.use("Agg")
    plt = importlib.import_module("matplotlib.pyplot")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, results in all_results.items():
        if not results:
            continue
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
        first = next(iter(results.values())).first
        xs = [p.t_s for p in first.timeline]
        top.plot(xs, [p.arrivals_per_s for p in first.timeline], color="grey")
        top.set_ylabel("arrivals / s")
        bottom.step(xs, [p.needed for p in first.timeline], where="post", color="black",
                    linestyle="--", label="needed")  # fmt: skip
        for policy, cell_ in results.items():
            timeline = cell_.first.timeline
            bottom.step([p.t_s for p in timeline], [p.serving for p in timeline],
                        where="post", label=policy)  # fmt: skip
        bottom.set_ylabel("serving replicas")
        bottom.set_xlabel("seconds")
        bottom.legend(loc="upper right", fontsize="small")
        top.set_title(name)
        path = out_dir / f"autoscale_{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def run_live(quick: bool) -> dict[str, Any] | None:
    if not (REPO / "bench" / "autoscale_live.py").exists():
        progress("--live: bench/autoscale_live.py is not there yet: skipped")
        return None
    live = importlib.import_module("autoscale_live")
    result: dict[str, Any] = live.run_live(quick=quick)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--traces", help="comma list of trace names (default: all)")
    parser.add_argument("--policies", default=",".join(POLICY_NAMES))
    parser.add_argument(
        "--traces-dir",
        default=os.environ.get("SHOAL_TRACES", str(REPO.parent / "shared" / "traces")),
    )
    parser.add_argument("--plots", default="/tmp/shoal-bench-autoscale", help="PNG directory")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--live", action="store_true", help="also the live run (autoscale_live)")
    parser.add_argument(
        "--seed", type=int, default=0, help="pipeline clock phases, failed scrapes, copies"
    )
    parser.add_argument(
        "--seeds", type=int, help="runs per cell, seeds --seed.. (quick 1, else 3): medians"
    )
    args = parser.parse_args()
    cases = dict(CASES) if args.quick else {**CASES, **FULL_CASES}
    if args.traces:
        wanted = args.traces.split(",")
        unknown = [n for n in wanted if n not in {**CASES, **FULL_CASES}]
        if unknown:
            parser.error(f"unknown trace(s) {unknown}; known: {sorted({**CASES, **FULL_CASES})}")
        cases = {n: {**CASES, **FULL_CASES}[n] for n in wanted}
    policies = args.policies.split(",")
    available = [p for p in policies if p in POLICIES]
    for policy in policies:
        if policy not in POLICIES:
            progress(f"policy {policy} is not built yet: its rows are null")
    started = time.perf_counter()
    load_before = os.getloadavg()
    traces: dict[str, Trace] = {}
    all_results: dict[str, dict[str, Cell]] = {}
    num_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    seeds = range(args.seed, args.seed + num_seeds)
    for name, case in cases.items():
        try:
            trace = load_case(case, Path(args.traces_dir), args.seed)
        except AutoscaleError as exc:
            progress(f"trace {name} skipped: {exc}")
            continue
        if trace is None:
            continue
        traces[name] = trace
        all_results[name] = {}
        for policy in available:
            t0 = time.perf_counter()
            all_results[name][policy] = Cell(
                tuple(run_case(trace, case, policy, seed) for seed in seeds)
            )
            progress(f"{name} {policy}: {time.perf_counter() - t0:.1f} s")
    live = run_live(args.quick) if args.live else None
    if args.json:
        out: dict[str, Any] = {
            "traces": {
                name: {p: results[p].figures() if p in results else dict(ABSENT) for p in policies}
                for name, results in all_results.items()
            }
        }
        if live is not None:
            out["live"] = live
        print(json.dumps(out))
    else:
        load = os.getloadavg()
        print(
            f"load average before {load_before[0]:.2f}, after {load[0]:.2f} "
            f"(1-min; {os.cpu_count()} CPUs), {time.perf_counter() - started:.0f} s"
        )
        print(table(all_results, traces))
        if live is not None:
            print("\n== live run\n" + json.dumps(live, indent=2))
    if not args.quick and not args.no_plots:
        for path in plot(all_results, Path(args.plots)):
            progress(f"plot: {path}")
    progress(f"took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
