"""``shoal placement run`` and ``shoal placement status``: the live planner and a look at it.

::

    run      the planning loop in the foreground: --profile (one per GPU type, repeated),
             --pool TYPE=memory|local|kubernetes:[NS/]DEPLOYMENT (repeated),
             --pool-engine-command TYPE='CMD ... --port {port}' for local pools,
             --router-url, --interval-s, --dry-run (plan and serve the plan, scale nothing)
    status   a running planner's plan, pools and last rounds (``--json`` as is)

``add_verbs(verbs)`` adds both to the ``shoal placement`` parser that ``cli.py`` builds
(its ``solve`` verb lives there). Exit codes (``shoal.cli_format``): 0 success (and a
clean stop on SIGTERM/SIGINT); 2 bad flags or settings; 3 the planner could not be reached.

The list settings (``profile``, ``pool``, ``pool_engine_command``) are one string each in
``PlacementSettings`` (entries separated by ``;``, as in the environment and the file);
on the command line their flags repeat, and the repeated values are joined with ``;``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shoal.config import add_flags, load_config

__all__ = ["add_verbs", "render_status", "settings_from_args"]

_REPEATED = {
    "profile": "a GPU profile JSON (AIBrix format); repeat once per GPU type",
    "pool": "TYPE=memory, TYPE=local or TYPE=kubernetes:[NAMESPACE/]DEPLOYMENT; repeat per type",
    "pool_engine_command": "TYPE='CMD ... --port {port}' for a local pool; repeat per type",
}


def add_verbs(verbs: Any) -> None:
    """Add ``run`` and ``status`` to the ``shoal placement`` sub-parsers ``verbs``."""
    from control.placement.config import PlacementSettings

    run = verbs.add_parser(
        "run",
        help="plan GPU types from live request sizes and scale one pool per type",
        description="Re-plan the GPU mix from the router's request sizes every interval, "
        "and scale one engine pool per GPU type to the plan.",
        conflict_handler="resolve",  # the repeated list flags below replace add_flags' own
    )
    add_flags(run, PlacementSettings, "placement")
    for name, help_text in _REPEATED.items():
        run.add_argument(
            "--" + name.replace("_", "-"), dest=name, action="append",
            default=argparse.SUPPRESS, help=help_text,
        )  # fmt: skip
    run.set_defaults(func=_run)

    status = verbs.add_parser(
        "status",
        help="a running planner's plan and pools",
        description="Show a running planner's plan, pools and last rounds.",
    )
    status.add_argument(
        "--url", default="http://127.0.0.1:8091", help="the planner (default %(default)s)"
    )
    status.add_argument(
        "--token-file", default="", help="the planner's --auth-token-file, if it has one"
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(func=_status)


def settings_from_args(args: argparse.Namespace) -> Any:
    from control.placement.config import PlacementSettings

    skip = ("func", "verb", "component", "json")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    for name in _REPEATED:
        if isinstance(flags.get(name), list):
            flags[name] = ";".join(flags[name])
    return load_config(PlacementSettings, "placement", flags=flags)


def _run(args: argparse.Namespace) -> int:
    from control.placement.planner import serve
    from shoal.logs import setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    return int(serve(settings))


def render_status(status: dict[str, Any]) -> list[str]:
    from shoal.cli_format import table

    plan = status.get("plan") or {}
    lines = [
        f"model {status.get('model') or '(all)'}  every {status.get('interval_s')} s"
        f"{'  (dry run)' if status.get('dry_run') else ''}",
        f"plan: {plan.get('status', 'none yet')}  cost {plan.get('cost', '-')}  "
        f"lp bound {plan.get('lp_bound', '-')}  greedy {plan.get('greedy_cost', '-')}  "
        f"({status.get('reason') or '-'})",
        f"workload: {json.dumps(status.get('workload') or {})}",
        "",
    ]

    def cell(value: Any) -> str:
        return "-" if value is None else str(value)

    rows = [
        [gpu, cell(p.get("target")), cell(p.get("spec")), cell(p.get("ready")),
         cell(p.get("pending"))]
        for gpu, p in sorted((status.get("pools") or {}).items())
    ]  # fmt: skip
    lines += table(["gpu_type", "target", "spec", "ready", "pending"], rows, "<>>>>")
    for error in (status.get("errors") or [])[-5:]:
        lines.append(f"error at {error.get('now_s')}: {error.get('stage')}: {error.get('error')}")
    return lines


def _status(args: argparse.Namespace) -> int:
    from control.autoscale.status import fetch_status
    from shoal.cli_format import EXIT_UNREACHABLE, EXIT_USAGE
    from shoal.config import read_secret
    from shoal.errors import ConfigError

    try:
        token = read_secret(args.token_file, "--token-file") if args.token_file else None
    except ConfigError as exc:
        print(f"shoal placement status: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        status = fetch_status(args.url, token=token)
    except OSError as exc:
        print(f"shoal placement status: cannot reach {args.url}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(render_status(status)))
    return 0
