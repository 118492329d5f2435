"""The ``shoal`` console script: ``shoal <component> <verb> [flags]``.

Components are listed here by name (``COMPONENTS``) and imported only when chosen: ``shoal
--help`` imports no component, and ``shoal cache ...`` imports the cache's CLI and nothing
of the loader's. A component whose extra is not installed (``shoal load`` without
``pip install 'shoal[loader]'``) ends with one line naming the extra and exit code 4
(``EXIT_MISSING_EXTRA``), before its CLI is imported, so its ``--help`` says the same;
never with a traceback. The other exit codes are in ``shoal.cli_format``.

Invariant (import-linter, ``pyproject.toml``): this module imports no component and none of
grpc, torch or vllm, directly or indirectly; components are reached through
``importlib.import_module`` by name.

``--config FILE`` is accepted before the component (``shoal --config f cache stats``) and,
through ``shoal.config.add_flags``, after the verb (``shoal cache stats --config f``); the
later one wins.

Rejected: importing every component's CLI to build one full parser (what this module did:
``shoal --help`` then needed grpc and torch, audit M1); entry-point discovery of
components (three components in one distribution do not need a plugin system).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from shoal import __version__
from shoal.cli_format import EXIT_INTERRUPTED, EXIT_MISSING_EXTRA, EXIT_USAGE
from shoal.errors import ConfigError, ShoalError

__all__ = ["COMPONENTS", "Component", "build_parser", "main", "missing_modules"]

# What `pip install 'shoal[loader]'` provides (pyproject.toml), as import names.
_LOADER_MODULES = ("torch", "grpc", "google.protobuf", "boto3", "urllib3", "tqdm")


@dataclass(frozen=True, slots=True)
class Component:
    """One ``shoal`` subcommand group, known by name until it is chosen."""

    name: str
    help: str  # the same text its register() gives (a test checks they agree)
    module: str  # its CLI module: register(subparsers) adds the group with its verbs
    extra: str = ""  # the pip extra it needs beyond the core; "" = the core suffices
    requires: tuple[str, ...] = ()  # import names that extra provides


COMPONENTS: tuple[Component, ...] = (
    Component("cache", "node-local KV-cache daemon", "kvcache.cli"),
    Component(
        "load",
        "stream a safetensors checkpoint from disk, S3 or HTTP, tensor by tensor",
        "loader.cli",
        "loader",
        _LOADER_MODULES,
    ),
    Component(
        "loader",
        "the loader sidecar: stage checkpoints in shared memory for engines",
        "loader.sidecar.cli",
        "loader",
        _LOADER_MODULES,
    ),
    Component(
        "sim",
        "simulated vLLM engines for tests and fleet sizing",
        "sim.cli",
        "sim",
        ("aiohttp",),
    ),
    Component(
        "router",
        "OpenAI-compatible router in front of the engines",
        "router.cli",
        "router",
        ("aiohttp", "redis"),
    ),
    Component(
        "autoscale",
        "scale engines on LLM metrics; simulate policies on traces",
        "control.autoscale.cli",
        "control",
        ("aiohttp",),
    ),
    Component(
        "placement",
        "the cheapest mix of GPU types for a request-size mix (Mélange's ILP)",
        "control.placement.cli",
        "control",
        ("highspy",),
    ),
    Component(
        "profile",
        "measure an endpoint's highest request rate within an SLO per request size",
        "control.placement.profile_cli",
        "control",
        ("aiohttp",),
    ),
    Component(
        "lora",
        "LoRA adapters placed on engines by traffic",
        "control.lora.cli",
        "control",
        ("aiohttp",),
    ),
    Component(
        "health",
        "accelerator health: check GPUs, watch them, inject faults into the fake backend",
        "control.health.cli",
        "control",
        ("aiohttp", "tomli_w"),
    ),
    Component(
        "engines",
        "multi-node engines on Ray: engine groups and the fleet that keeps them",
        "control.ray.cli",
        "ray",
        ("ray", "aiohttp"),
    ),
    Component(
        "deploy",
        "Kubernetes manifests for the whole stack from one values file, validated",
        "deploy.cli",
        "deploy",
        ("yaml",),
    ),
    Component(
        "up",
        "the whole stack on one machine: cache daemon, loader sidecar, engines and the router",
        "router.up",
        "router",
        ("aiohttp",),
    ),
)


class _MissingExtra(ShoalError):
    """A chosen component's extra is not installed (main: one line, EXIT_MISSING_EXTRA)."""

    def __init__(self, component: Component, missing: Sequence[str]) -> None:
        super().__init__(
            f"shoal {component.name}: needs the '{component.extra}' extra "
            f"(missing: {', '.join(missing)}); install it with: "
            f"pip install 'shoal[{component.extra}]'"
        )


def missing_modules(names: Sequence[str]) -> list[str]:
    """The import names among ``names`` that cannot be found (found ones are not imported;
    for a dotted name its parent package is)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing (or blocked)
            found = False
        if not found:
            missing.append(name)
    return missing


def _chosen(argv: Sequence[str]) -> Component | None:
    """The component ``argv`` names, found the way the full parser will find it."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--config")
    probe.add_argument("component", nargs="?")
    args, _ = probe.parse_known_args(argv)
    return next((c for c in COMPONENTS if c.name == args.component), None)


def _register(component: Component, subparsers: Any) -> None:
    """Import ``component``'s CLI (after checking its extra) and let it add its verbs."""
    missing = missing_modules(component.requires)
    if missing:
        raise _MissingExtra(component, missing)
    try:
        module = importlib.import_module(component.module)
    except ModuleNotFoundError as exc:
        if _belongs_to(exc, component):
            raise _MissingExtra(component, [str(exc.name)]) from None
        raise
    register: Callable[[Any], None] = module.register
    register(subparsers)


def _belongs_to(exc: ModuleNotFoundError, component: Component) -> bool:
    top = (exc.name or "").partition(".")[0]
    return bool(top) and any(r.partition(".")[0] == top for r in component.requires)


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The ``shoal`` parser; only ``chosen``'s verbs are imported, the rest are names."""
    parser = argparse.ArgumentParser(prog="shoal", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument("--config", help="TOML configuration file (also SHOAL_CONFIG)")
    components = parser.add_subparsers(dest="component", required=True, metavar="COMPONENT")
    for component in COMPONENTS:
        if component.name == chosen:
            _register(component, components)
        else:
            components.add_parser(component.name, help=component.help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    component = _chosen(argv)
    try:
        parser = build_parser(component.name if component else None)
    except _MissingExtra as exc:
        print(exc, file=sys.stderr)
        return EXIT_MISSING_EXTRA
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:  # only a name was registered: the probe and argparse disagree
        parser.error(f"say a verb: shoal {args.component} --help")
    try:
        return int(func(args))
    except ConfigError as exc:
        print(f"shoal: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        if component is None or not _belongs_to(exc, component):
            raise
        print(_MissingExtra(component, [str(exc.name)]), file=sys.stderr)
        return EXIT_MISSING_EXTRA
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
