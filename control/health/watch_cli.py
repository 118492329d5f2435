"""``shoal health watch``: the verb, added to ``shoal health`` by control/health/cli.py.

Exit codes (``shoal.cli_format``): 0 on a clean stop (SIGTERM/SIGINT), 2 on bad flags or
settings (a ``ConfigError`` raised here reaches shoal/cli.py's handler).
"""

from __future__ import annotations

import argparse
from typing import Any

from shoal.config import add_flags, load_config

__all__ = ["add_watch_parser", "settings_from_args"]


def add_watch_parser(verbs: Any) -> argparse.ArgumentParser:
    """Add ``watch`` to the ``shoal health`` verbs; the parser, for callers' extras."""
    from control.health.config import HealthSettings

    watch = verbs.add_parser(
        "watch",
        help="watch this node's GPUs: serve /v1/gpus and shoal_gpu_* metrics",
        description=(
            "Check this node's GPUs every interval and at once on an XID event; serve the "
            "latest report on GET /v1/gpus, Prometheus metrics on /metrics; optionally "
            "cordon the Kubernetes node when a GPU needs draining (dry run unless "
            "--cordon-apply)."
        ),
    )
    add_flags(watch, HealthSettings, "health")
    watch.set_defaults(func=_watch)
    return watch  # type: ignore[no-any-return]


def settings_from_args(args: argparse.Namespace) -> Any:
    from control.health.config import HealthSettings

    skip = ("func", "verb", "component", "json")
    flags = {k: v for k, v in vars(args).items() if k not in skip}
    return load_config(HealthSettings, "health", flags=flags)


def _watch(args: argparse.Namespace) -> int:
    from control.health.watch import serve
    from shoal.logs import setup_logging

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_format)
    return int(serve(settings))
