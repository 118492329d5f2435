"""``shoal deploy render|check|secrets|values``: Kubernetes manifests from one values file.

Exit codes: 0 rendered (or every check passed), 1 a check failed, 2 bad usage or values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from shoal.cli_format import EXIT_FAILED
from shoal.errors import ConfigError

__all__ = ["HELP", "register"]

HELP = "Kubernetes manifests for the whole stack from one values file, validated"


def _values_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--values", "-f", type=Path, default=None, metavar="FILE",
                        help="YAML values file (`shoal deploy values` lists the keys)")  # fmt: skip
    parser.add_argument("--set", dest="assignments", action="append", default=[],
                        metavar="PATH=VALUE",
                        help="override one value, e.g. --set cache.settings.shm_bytes=16GiB "
                        "(repeatable; the value is YAML)")  # fmt: skip


def register(subparsers: Any) -> None:
    group = subparsers.add_parser(
        "deploy",
        help=HELP,
        description="Render the whole stack as Kubernetes manifests from one values file, "
        "with sizes derived consistently, and check them against the Kubernetes schemas and "
        "Shoal's own contracts. Exit 0 ok, 1 a check failed, 2 bad usage or values.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")
    render = verbs.add_parser(
        "render",
        help="print the manifests (or write a kustomize base with --out)",
        description="Render every enabled component. Without --out, one YAML stream on "
        "stdout; with --out DIR, one file per component and a kustomization.yaml.",
    )
    _values_flags(render)
    render.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="write a kustomize base here instead of printing")  # fmt: skip
    render.set_defaults(func=_render)

    check = verbs.add_parser(
        "check",
        help="render and check: Kubernetes schemas (strict), CRDs, contracts, RBAC",
        description="Render with the given values and check every object. Exit 0 when "
        "every check passes, 1 otherwise (each problem on one line).",
    )
    _values_flags(check)
    check.add_argument("--kubernetes-version", action="append", default=[], metavar="X.Y",
                       help="validate for this version (repeatable; default: the two newest "
                       "kubernetes-validate knows)")  # fmt: skip
    check.add_argument("--skip-crds", action="store_true",
                       help="do not validate the Prometheus Operator objects (needs node and "
                       "the npm models: scripts/setup-deploy-check)")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print the problems as JSON")
    check.set_defaults(func=_check)

    secrets = verbs.add_parser(
        "secrets",
        help="the Secrets to create before applying, with the commands that make them",
        description="List the Secrets the rendered manifests reference (never rendered "
        "themselves): name, keys, purpose, and the commands that create each.",
    )
    _values_flags(secrets)
    secrets.add_argument("--json", action="store_true", help="print them as JSON")
    secrets.set_defaults(func=_secrets)

    show = verbs.add_parser("values", help="print every value with its default and meaning")
    show.set_defaults(func=_show_values)


def _render(args: argparse.Namespace) -> int:
    from deploy.render import dump_yaml, render, write_base
    from deploy.values import load_values

    values = load_values(args.values, args.assignments)
    if args.out is None:
        sys.stdout.write(dump_yaml(render(values)))
        return 0
    try:
        written = write_base(values, args.out)
    except OSError as exc:  # a ConfigError: shoal.cli prints it and exits 2
        raise ConfigError(f"render --out {args.out}: cannot write {exc.filename or args.out}: "
                          f"{exc.strerror or exc}") from None  # fmt: skip
    for path in written:
        print(path)
    return 0


def _check(args: argparse.Namespace) -> int:
    from deploy.checks.run import check_all
    from deploy.checks.schema import check_versions
    from deploy.render import render
    from deploy.values import load_values

    check_versions(args.kubernetes_version)  # a ConfigError: exit 2, naming the known ones
    values = load_values(args.values, args.assignments)
    objects = render(values)
    problems = check_all(
        objects, values, kubernetes_versions=args.kubernetes_version or None,
        crds=not args.skip_crds,
    )  # fmt: skip
    if args.json:
        print(json.dumps({"objects": len(objects), "problems": [
            {"check": p.check, "where": p.where, "message": p.message} for p in problems
        ]}, indent=2))  # fmt: skip
    else:
        for problem in problems:
            print(problem)
        print(f"{len(objects)} objects, {len(problems)} problem(s)", file=sys.stderr)
    return EXIT_FAILED if problems else 0


def _secrets(args: argparse.Namespace) -> int:
    from deploy.secrets import required_secrets
    from deploy.values import load_values

    specs = required_secrets(load_values(args.values, args.assignments))
    if args.json:
        rows = [
            {"name": s.name, "keys": list(s.keys), "purpose": s.purpose,
             "create_command": s.create_command}
            for s in specs
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(s.name) for s in specs), default=4)
    print(f"{'NAME':<{width}}  KEYS / PURPOSE")
    for spec in specs:
        print(f"{spec.name:<{width}}  {', '.join(spec.keys)}\n{'':<{width}}  {spec.purpose}")
    for spec in specs:
        print(f"\n# {spec.name}\n{spec.create_command}")
    return 0


def _show_values(args: argparse.Namespace) -> int:
    from deploy.values import defaults_yaml

    sys.stdout.write(defaults_yaml())
    return 0
