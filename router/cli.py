"""``shoal router ...``: the OpenAI-compatible gateway in front of the engines.

::

    serve      run the router in the foreground (``--engines URL,URL,...``)
    settings   print the effective settings (file < env SHOAL_ROUTER_* < flags), --json
    engines    a running router's engines: health, GPU health (with --gpu-health), breaker,
               in flight, metrics age, --json

Exit codes (``shoal.cli_format``): 0 success (and a clean stop on SIGTERM/SIGINT);
2 bad flags, settings or a missing optional module for a flag; 3 the router could not be
reached (``engines``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from shoal.config import add_flags, load_config
from shoal.logs import setup_logging

__all__ = ["register", "settings_from_args"]


def register(subparsers: Any) -> None:
    from router.config import RouterSettings

    router = subparsers.add_parser(
        "router",
        help="OpenAI-compatible router in front of the engines",
        description="Route OpenAI requests to engines by cache state and load.",
    )
    verbs = router.add_subparsers(dest="verb", required=True, metavar="VERB")
    serve = verbs.add_parser(
        "serve", help="run the router in the foreground", description="Run the router."
    )
    add_flags(serve, RouterSettings, "router")
    serve.set_defaults(func=_serve)
    settings = verbs.add_parser(
        "settings",
        help="print the effective settings",
        description="Print the settings the router would run with.",
    )
    settings.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_flags(settings, RouterSettings, "router")
    settings.set_defaults(func=_settings)
    engines = verbs.add_parser(
        "engines",
        help="a running router's engines",
        description="Show a running router's engines (GET /router/engines; with --admin-port, "
        "give --url http://HOST:ADMIN_PORT).",
    )
    engines.add_argument(
        "--url", default="http://127.0.0.1:8080", help="the router (default %(default)s)"
    )
    engines.add_argument(
        "--token-file",
        default="",
        help="file holding the bearer token of a router's admin listener (its --admin-token-file)",
    )
    engines.add_argument("--json", action="store_true", help="print JSON for scripts")
    engines.set_defaults(func=_engines)


def settings_from_args(args: argparse.Namespace) -> Any:
    from router.config import RouterSettings

    flags = {k: v for k, v in vars(args).items() if k not in ("func", "verb", "component", "json")}
    return load_config(RouterSettings, "router", flags=flags)


def _serve(args: argparse.Namespace) -> int:
    from router.server import serve

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    return serve(settings)


def _settings(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    values = dataclasses.asdict(settings)
    if args.json:
        print(json.dumps(values, indent=2))
    else:
        width = max(map(len, values))
        for name, value in values.items():
            print(f"{name:<{width}}  {value!r}")
    return 0


def _engines(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from shoal.cli_format import EXIT_UNREACHABLE, table

    request = urllib.request.Request(args.url.rstrip("/") + "/router/engines")
    try:
        if args.token_file:
            from router.wake import read_token

            token = read_token(args.token_file, "--token-file")
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=5) as reply:
            rows = json.loads(reply.read())["engines"]
    except (OSError, ValueError, KeyError) as exc:
        print(
            f"shoal router engines: cannot read {args.url}/router/engines: {exc}", file=sys.stderr
        )
        return EXIT_UNREACHABLE
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    headers = ("engine", "stream", "healthy", "gpus", "breaker", "in flight", "tokens",
               "metrics age")  # fmt: skip
    cells = [
        (
            row["url"],
            row["stream"] or "-",
            "yes" if row["healthy"] else "no",
            _gpus_cell(row),
            row["breaker"],
            str(row["in_flight"]),
            str(row["in_flight_tokens"]),
            "-"
            if row["metrics_age_s"] is None
            else f"{row['metrics_age_s']:.1f} s" + ("" if row["metrics_fresh"] else " (stale)"),
        )
        for row in rows
    ]
    print("\n".join(table(headers, cells, "<<<<<>>>")))
    return 0


def _gpus_cell(row: dict[str, Any]) -> str:
    """``ok``, ``unhealthy: node-a/gpu1`` or ``-`` (no GPUs known, or an older router)."""
    if not row.get("gpus"):
        return "-"
    if row.get("gpu_healthy", True):
        return "ok"
    return "unhealthy: " + ", ".join(row.get("unhealthy_gpus", []))
