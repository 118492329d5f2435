"""``shoal placement ...``: the cheapest mix of GPU types for a request-size mix.

::

    solve    one Mélange ILP from profile files and a workload file (``--json``)

``solve`` reads AIBrix profile files (``--profile``, once per GPU type; a Mélange example
input brings its GPU types and, without ``--workload``, its workload), checks that the
profiles share their ticks, and moves the workload onto them with ``formats.rebin`` when
its own ticks differ (said on stderr: a request is priced at the smallest profiled length
at or above its bucket's). ``--json`` prints exactly ``{"gpus", "cost", "lp_bound",
"greedy_cost", "solve_s", "status"}``; otherwise a table of the replicas and each single
type's cost for the same workload. ``--plan-out FILE`` also writes the full plan
(``formats.plan_to_json``: with each type's share of every bucket).

Exit codes (``shoal.cli_format``): 0 a plan; 1 the solver failed and the greedy found
nothing; 2 bad flags or files (``ProfileFormatError`` is a ``ConfigError``); 3 infeasible
(the buckets no GPU type serves, or caps too tight). ``solve`` stays strict on purpose: it
answers whether the workload can be served, and a script asking that needs the failure.
The live planner (``run``) solves with ``best_effort`` instead: it leaves unservable
buckets out (``unserved`` in ``/v1/plan`` and ``/status``) and runs the caps when they
are short (status ``"capped"``), because a fleet must do its best, not freeze.

The planner's verbs (``run``, ``status``) come from ``control.placement.run_cli`` when
that module exists (``register`` calls its ``add_verbs``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

from shoal.cli_format import EXIT_FAILED, table
from shoal.errors import ConfigError

__all__ = ["EXIT_INFEASIBLE", "register"]

EXIT_INFEASIBLE = 3  # no mix of GPU types serves the workload


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "placement",
        help="the cheapest mix of GPU types for a request-size mix (Mélange's ILP)",
        description="Place a request-size mix on the cheapest mix of GPU types.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    solve = verbs.add_parser(
        "solve",
        help="one ILP from profile and workload files",
        description="Solve Mélange's ILP for profile files and a workload file.",
    )
    solve.add_argument(
        "--profile",
        action="append",
        required=True,
        metavar="FILE",
        help="an AIBrix GPU profile (once per GPU type) or Mélange's example input",
    )
    solve.add_argument(
        "--workload",
        metavar="FILE",
        help='{"rate", "histogram", "indexes", "slice_factor"} (or a router\'s '
        "/v1/request_sizes answer); optional with a Mélange input",
    )
    solve.add_argument(
        "--available",
        action="append",
        default=[],
        type=_type_count,
        metavar="TYPE=N",
        help="at most N replicas of TYPE (repeatable; default unlimited)",
    )
    solve.add_argument(
        "--min-replicas",
        action="append",
        default=[],
        type=_type_count,
        metavar="TYPE=N",
        help="at least N replicas of TYPE (repeatable; default 0)",
    )
    solve.add_argument(
        "--slice-factor", type=int, help="slices per bucket (default: the workload's, else 4)"
    )
    solve.add_argument(
        "--time-limit-s", type=float, default=10.0, help="solver time limit (%(default)s)"
    )
    solve.add_argument(
        "--backend",
        choices=("highs", "greedy"),
        default="highs",
        help="HiGHS's ILP, or the greedy alone (%(default)s)",
    )
    solve.add_argument("--plan-out", metavar="FILE", help="also write the full plan as JSON")
    solve.add_argument("--json", action="store_true", help="print JSON for scripts")
    solve.set_defaults(func=_solve)

    # The planner's verbs live in their own module, added by the planner's work.
    try:
        run_cli = importlib.import_module("control.placement.run_cli")
    except ModuleNotFoundError as exc:
        if exc.name != "control.placement.run_cli":
            raise
    else:
        run_cli.add_verbs(verbs)


def _type_count(text: str) -> tuple[str, int]:
    gpu, sep, count = text.partition("=")
    if not sep or not gpu or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected TYPE=N (N >= 0), got {text!r}")
    return gpu, int(count)


def _solve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from control.placement import formats
    from control.placement.errors import Infeasible, SolverError
    from control.placement.solver import single_type_costs, solve
    from control.placement.types import Limits

    profiles, workload = _inputs(args.profile, args.workload)
    if args.slice_factor is not None:
        workload = replace(workload, slice_factor=args.slice_factor)
    limits = Limits(available=_table(args.available), min_replicas=_table(args.min_replicas))
    try:
        plan = solve(
            profiles, workload, limits, time_limit_s=args.time_limit_s, backend=args.backend
        )
    except Infeasible as exc:
        print(f"shoal placement: infeasible: {exc}", file=sys.stderr)
        return EXIT_INFEASIBLE
    except SolverError as exc:
        print(f"shoal placement: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.plan_out:
        document = formats.plan_to_json(plan, workload.out_ticks, workload.in_ticks)
        Path(args.plan_out).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(plan.to_json()))
        return 0
    costs = {p.gpu: p.cost for p in profiles}
    rows = [
        [gpu, str(n), f"{costs[gpu]:.2f}", f"{n * costs[gpu]:.2f}"] for gpu, n in plan.gpus.items()
    ]
    print("\n".join(table(["GPU", "replicas", "cost each", "cost"], rows, "<>>>")))
    bound = "-" if plan.lp_bound is None else f"{plan.lp_bound:.2f}"
    greedy = "-" if plan.greedy_cost is None else f"{plan.greedy_cost:.2f}"
    print(
        f"total {plan.cost:.2f} per hour ({plan.status}, {plan.solve_s:.2f} s; "
        f"LP bound {bound}, greedy {greedy})"
    )
    singles = []
    for gpu, cost in single_type_costs(profiles, workload).items():
        if cost is None:
            singles.append(f"{gpu} cannot serve every bucket")
        else:
            extra = f" (+{cost / plan.cost - 1:.0%})" if plan.cost > 0 else ""
            singles.append(f"{gpu} {cost:.2f}{extra}")
    print("one type alone (unlimited): " + ", ".join(singles))
    return 0


def _inputs(profile_paths: list[str], workload_path: str | None) -> tuple[list[Any], Any]:
    """The profiles (sharing their ticks) and the workload on those ticks."""
    from control.placement import formats

    profiles = []
    melange_workloads = []
    for path in profile_paths:
        found = formats.load_profiles(path)
        for profile in found:
            profiles.append((path, profile))
        if _is_melange(path):
            melange_workloads.append(formats.load_melange(path).workload)
    if workload_path is not None:
        workload = formats.load_workload(workload_path)
    elif len(melange_workloads) == 1:
        workload = melange_workloads[0]
    else:
        raise ConfigError("say --workload FILE (only a single Mélange input brings its own)")
    first_path, first = profiles[0]
    for path, profile in profiles[1:]:
        if (profile.out_ticks, profile.in_ticks) != (first.out_ticks, first.in_ticks):
            raise ConfigError(
                f"{path} ({profile.gpu}) and {first_path} ({first.gpu}) are on different "
                "ticks; profile every GPU type on the same input and output lengths"
            )
    ticks = (first.out_ticks, first.in_ticks)
    if (workload.out_ticks, workload.in_ticks) != ticks:
        from dataclasses import replace

        histogram = formats.rebin(workload.histogram, workload.out_ticks, workload.in_ticks, *ticks)
        workload = replace(workload, histogram=histogram, out_ticks=ticks[0], in_ticks=ticks[1])
        print(
            "shoal placement: the workload's ticks differ from the profiles': its histogram "
            "was moved onto the profiles' ticks (each bucket to the smallest tick at or "
            "above its own)",
            file=sys.stderr,
        )
    return [profile for _, profile in profiles], workload


def _is_melange(path: str) -> bool:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # load_profiles already read it; not a single JSON object
    return isinstance(data, dict) and "gpu_info" in data


def _table(pairs: list[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for gpu, count in pairs:
        if gpu in out:
            raise ConfigError(f"{gpu} given twice")
        out[gpu] = count
    return out
