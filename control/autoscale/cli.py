"""``shoal autoscale ...``: scale engines on LLM signals, or replay a trace to compare policies.

::

    run        the control loop in the foreground (``--target``, ``--policy``, ``--metrics``;
               ``--dry-run`` prints decisions and scales nothing)
    simulate   replay a request trace against simulated replicas under a policy (``--json``)
    status     a running controller's state: replicas, metrics, the last decisions (``--json``)

Exit codes (``shoal.cli_format``): 0 success (and a clean stop on SIGTERM/SIGINT);
2 bad flags, settings or trace; 3 the controller could not be reached (``status``).
"""

from __future__ import annotations

import argparse
from typing import Any

from shoal.config import add_flags, load_config

__all__ = ["register", "settings_from_args"]


def register(subparsers: Any) -> None:
    from control.autoscale.config import AutoscaleSettings

    group = subparsers.add_parser(
        "autoscale",
        help="scale engines on LLM metrics; simulate policies on traces",
        description="Scale engines on KV-cache usage, queues and token rates scraped from them.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    run = verbs.add_parser(
        "run", help="run the control loop", description="Run the autoscaler's control loop."
    )
    add_flags(run, AutoscaleSettings, "autoscale")
    run.set_defaults(func=_run)

    from control.autoscale.simulate import command as simulate

    sim = verbs.add_parser(
        "simulate",
        help="replay a trace against simulated replicas",
        description="Replay a request trace against simulated replicas under a policy.",
    )
    simulate.add_arguments(sim)
    sim.set_defaults(func=simulate.main)

    status = verbs.add_parser(
        "status",
        help="a running controller's state",
        description="Show a running controller's replicas, metrics and last decisions.",
    )
    status.add_argument(
        "--url", default="http://127.0.0.1:8090", help="the controller (default %(default)s)"
    )
    status.add_argument(
        "--token-file", default="", help="the controller's --auth-token-file, if it has one"
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(func=_status)


def settings_from_args(args: argparse.Namespace) -> Any:
    from control.autoscale.config import AutoscaleSettings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "verb", "component", "json")}
    return load_config(AutoscaleSettings, "autoscale", flags=flags)


def _run(args: argparse.Namespace) -> int:
    from control.autoscale.controller import serve
    from shoal.logs import setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    return int(serve(settings))


def _status(args: argparse.Namespace) -> int:
    from control.autoscale.status import show

    return int(show(args.url, as_json=args.json, token_file=args.token_file))
