"""``shoal engines ...``: run the fleet daemon, or ask a running one.

::

    serve                          the daemon in the foreground (EnginesSettings flags);
                                   SIGTERM/SIGINT stop every group, then exit 0
    status                         the fleet: spec, ready/pending, one row per group
    scale N                        ask for N engine groups
    update [--engine-command C] [--env NAME=VALUE ...] [--tp N] [--pp N] [--model M]
                                   change the group template: a rolling update

Client verbs take ``--url`` (default http://127.0.0.1:8093), ``--token-file`` (the
daemon's ``--auth-token-file``) and ``--json`` (the server's JSON as is). Exit codes
(``shoal.cli_format``): 0 success; 1 the daemon refused (the message says why); 2 bad
flags or settings; 3 the daemon (or, for ``serve``, Ray) could not be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shoal.config import add_flags, load_config

__all__ = ["DEFAULT_URL", "register", "settings_from_args"]

DEFAULT_URL = "http://127.0.0.1:8093"
HELP = "multi-node engines on Ray: engine groups and the fleet that keeps them"


def register(subparsers: Any) -> None:
    from control.ray.config import EnginesSettings

    group = subparsers.add_parser(
        "engines",
        help=HELP,
        description="Run engines spanning tp x pp GPUs as Ray placement groups, keep a fleet "
        "of them (scale, rolling update, replacement), and ask a running fleet.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    serve = verbs.add_parser(
        "serve", help="run the fleet daemon", description="Run the engine fleet and its HTTP API."
    )
    add_flags(serve, EnginesSettings, "engines")
    serve.set_defaults(func=_serve)

    def client(name: str, help: str) -> argparse.ArgumentParser:
        verb: argparse.ArgumentParser = verbs.add_parser(
            name, help=help, description=help[0].upper() + help[1:] + "."
        )
        verb.add_argument("--url", default=DEFAULT_URL, help="the daemon (default %(default)s)")
        verb.add_argument(
            "--token-file", default="", help="the daemon's --auth-token-file, if it has one"
        )
        verb.add_argument("--json", action="store_true", help="print JSON for scripts")
        return verb

    client("status", "the fleet's spec and groups").set_defaults(func=_status)
    scale = client("scale", "ask for N engine groups")
    scale.add_argument("replicas", type=int, metavar="N")
    scale.set_defaults(func=_scale)
    update = client("update", "change the group template (a rolling update)")
    update.add_argument("--engine-command", help="the driver's command, with {port}")
    update.add_argument("--model", help="the served model")
    update.add_argument("--tp", type=int, help="tensor-parallel size")
    update.add_argument("--pp", type=int, help="pipeline-parallel size")
    update.add_argument(
        "--env", action="append", metavar="NAME=VALUE",
        help="the engine's environment (replaces it whole); repeat the flag",
    )  # fmt: skip
    update.set_defaults(func=_update)


def settings_from_args(args: argparse.Namespace) -> Any:
    from control.ray.config import EnginesSettings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "verb", "component")}
    return load_config(EnginesSettings, "engines", flags=flags)


def _serve(args: argparse.Namespace) -> int:
    from control.ray.errors import RayUnavailable
    from control.ray.server import serve
    from shoal.cli_format import EXIT_UNREACHABLE
    from shoal.logs import setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    try:
        return int(serve(settings))
    except RayUnavailable as exc:
        print(f"shoal engines serve: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


class _Exit(int):
    """An exit code standing in for an answer."""


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The daemon's JSON answer, or an ``_Exit`` after printing why."""
    from control.lora.cli import Refused, request
    from shoal.cli_format import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
    from shoal.config import read_secret
    from shoal.errors import ConfigError

    where = f"shoal engines {args.verb}"
    try:
        token = read_secret(args.token_file, "--token-file") if args.token_file else None
    except ConfigError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return _Exit(EXIT_USAGE)
    try:
        return request(args.url, method, path, body, token, timeout_s=30.0)
    except Refused as exc:
        print(f"{where}: {exc} (HTTP {exc.status})", file=sys.stderr)
        return _Exit(EXIT_FAILED)
    except OSError as exc:
        print(f"{where}: cannot reach {args.url}: {exc}", file=sys.stderr)
        return _Exit(EXIT_UNREACHABLE)


def fleet_lines(answer: dict[str, Any]) -> list[str]:
    """``GET /v1/fleet``'s answer as text: one summary line, then a table of groups."""
    from shoal.cli_format import table

    spec = answer.get("spec", {})
    head = (
        f"{spec.get('model', '?')}: {answer.get('ready', 0)} ready, "
        f"{answer.get('pending', 0)} pending of {spec.get('replicas', '?')} "
        f"(tp {spec.get('tp', '?')} x pp {spec.get('pp', '?')}, {spec.get('strategy', '?')}, "
        f"revision {spec.get('revision', '?')})"
    )
    rows = [
        [
            g.get("id", ""),
            g.get("phase", ""),
            g.get("revision", ""),
            f"{g.get('age_s', 0):.0f}",
            g.get("url", "") or "-",
            ",".join(g.get("gpus", [])) or "-",
            g.get("reason") or g.get("waiting_for") or g.get("detail") or "",
        ]
        for g in answer.get("groups", [])
    ]
    headers = ["group", "phase", "revision", "age_s", "url", "gpus", "note"]
    return [head, "", *table(headers, rows, "<<<><<<")] if rows else [head, "no groups"]


def _status(args: argparse.Namespace) -> int:
    answer = _call(args, "GET", "/v1/fleet")
    if isinstance(answer, _Exit):
        return int(answer)
    print(json.dumps(answer, indent=2) if args.json else "\n".join(fleet_lines(answer)))
    return 0


def _scale(args: argparse.Namespace) -> int:
    from shoal.cli_format import EXIT_USAGE

    if args.replicas < 0:
        print("shoal engines scale: N must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    answer = _call(args, "POST", "/v1/scale", {"replicas": args.replicas})
    if isinstance(answer, _Exit):
        return int(answer)
    print(json.dumps(answer) if args.json else f"asked for {answer['replicas']} groups")
    return 0


def _update(args: argparse.Namespace) -> int:
    from shoal.cli_format import EXIT_USAGE

    body: dict[str, Any] = {}
    for key in ("engine_command", "model", "tp", "pp"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    if args.env is not None:
        env: dict[str, str] = {}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                print(f"shoal engines update: --env {item!r} needs NAME=VALUE", file=sys.stderr)
                return EXIT_USAGE
            env[name] = value
        body["env"] = env
    if not body:
        print("shoal engines update: nothing to change; give --engine-command, --model, "
              "--tp, --pp or --env", file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    answer = _call(args, "POST", "/v1/update", body)
    if isinstance(answer, _Exit):
        return int(answer)
    if args.json:
        print(json.dumps(answer))
    elif answer.get("changed") is False:
        print(f"unchanged: revision {answer['revision']}")
    else:
        print(f"rolling update: revision {answer['previous']} -> {answer['revision']}")
    return 0
