"""The ``shoal`` console script: ``shoal <component> <verb> [flags]``.

Components register their own subcommand group; this module only assembles them, sets
the common ``--config`` flag and maps configuration errors to exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from shoal import __version__
from shoal.errors import ConfigError

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from kvcache.cli import register as register_cache
    from loader.cli import register as register_load
    from loader.sidecar.cli import register as register_loader

    parser = argparse.ArgumentParser(prog="shoal", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument("--config", help="TOML configuration file (also SHOAL_CONFIG)")
    components = parser.add_subparsers(dest="component", required=True, metavar="COMPONENT")
    register_cache(components)
    register_load(components)
    register_loader(components)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
