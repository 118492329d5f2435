"""``shoal health ...``: check this node's GPUs once, inject faults into the fake backend,
or watch (``watch_cli.py``).

::

    check [--nvml-mock FILE.toml] [--expect-gpus N] [--node NAME] [--xid-wait-s S] [--json]
    inject --nvml-mock FILE [--gpu I] (--xid N | --ecc-dbe N | --ecc-sbe N | --remap-pending
           | --remap-failure | --link-width N | --temperature C | --throttle REASON
           | --nvlink-down LINK | --fail-read | --nvml-init-error CODE | --card-count N
           | --clear)
    watch ...                       the watcher daemon (GET /v1/gpus, /metrics)

``check`` prints the NodeHealth (``--json``: exactly the wire JSON of ``GET /v1/gpus``;
otherwise a table, one row per problem). Exit codes: 0 every GPU healthy (warnings
allowed); 1 a GPU or the node is unhealthy (a critical problem); 2 bad usage or a
malformed mock file; 3 NVML unavailable (no driver or library, or the mock's
``nvml_init_error``) — the report is still printed. 3 is kept apart from 1 because "this
machine has no usable NVML" is usually a setup matter, not a failing GPU.

``inject`` only ever edits the TOML file named by ``--nvml-mock`` (it refuses to run
without one: it never touches real GPUs); a missing file is created with 8 healthy cards
(or ``--card-count`` of them). ``--clear`` resets card ``--gpu`` to healthy, or, without
``--gpu``, every card and the init error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["register"]

HELP = "accelerator health: check GPUs, watch them, inject faults into the fake backend"
EXIT_NVML_UNAVAILABLE = 3


def register(subparsers: Any) -> None:
    from control.health.checks import THROTTLE_REASONS

    group = subparsers.add_parser(
        "health",
        help=HELP,
        description="Check this node's GPUs (NVML, or a fake backend's TOML file), watch "
        "them, inject faults into the fake backend.",
    )
    verbs = group.add_subparsers(dest="verb", required=True, metavar="VERB")

    check = verbs.add_parser(
        "check",
        help="check every GPU once and print the findings",
        description="Check every GPU once. Exit 0 healthy, 1 unhealthy, 2 bad usage or "
        "mock file, 3 NVML unavailable.",
    )
    check.add_argument("--nvml-mock", type=Path, default=None, metavar="FILE.toml",
                       help="read the fake backend's TOML file instead of NVML")  # fmt: skip
    check.add_argument("--expect-gpus", type=_count, default=None, metavar="N",
                       help="the node should have N GPUs (fewer: critical)")  # fmt: skip
    check.add_argument(
        "--node",
        default="",
        help="this node's name (default: the hostname as it is, full, the Ray side's rule)",
    )
    check.add_argument("--xid-wait-s", type=_seconds, default=0.0, metavar="S",
                       help="also wait S seconds for XID events (default 0)")  # fmt: skip
    check.add_argument("--json", action="store_true", help="print the wire JSON")
    check.set_defaults(func=_check)

    inject = verbs.add_parser(
        "inject",
        help="inject a fault into a fake backend's TOML file",
        description="Edit the fake backend's TOML file (atomically). Never touches real GPUs.",
    )
    inject.add_argument("--nvml-mock", type=Path, default=None, metavar="FILE.toml",
                        help="the file to edit (required; created when missing)")  # fmt: skip
    inject.add_argument("--gpu", type=_count, default=None, metavar="I",
                        help="the card (default 0; --clear without it: every card)")  # fmt: skip
    fault = inject.add_mutually_exclusive_group(required=True)
    for flag, kind, meta, help in (
        ("--xid", "xid", "N", "deliver XID N once"),
        ("--ecc-dbe", "ecc_dbe", "N", "N volatile double-bit ECC errors"),
        ("--ecc-sbe", "ecc_sbe", "N", "N volatile single-bit ECC errors"),
        ("--link-width", "link_width", "N", "PCIe link width now xN"),
        ("--temperature", "temperature", "C", "temperature C degrees"),
        ("--nvlink-down", "nvlink_down", "LINK", "NVLink LINK down"),
        ("--nvml-init-error", "nvml_init_error", "CODE", "nvmlInit returns CODE (0: none)"),
        ("--card-count", "card_count", "N", "the node has N cards"),
    ):
        fault.add_argument(flag, dest=kind, type=_count, metavar=meta, help=help)
    fault.add_argument(
        "--throttle",
        metavar="REASON",
        choices=list(THROTTLE_REASONS),
        help="add a throttle reason: " + ", ".join(THROTTLE_REASONS),
    )
    for flag, kind, help in (
        ("--remap-pending", "remap_pending", "a row remap is pending"),
        ("--remap-failure", "remap_failure", "row remapping failed"),
        ("--fail-read", "fail_read", "the GPU fell off the bus: every read fails"),
        ("--clear", "clear", "back to healthy"),
    ):
        fault.add_argument(flag, dest=kind, action="store_true", help=help)
    inject.set_defaults(func=_inject)

    try:
        from control.health.watch_cli import add_watch_parser
    except ModuleNotFoundError as exc:  # the watcher is not merged yet: check and inject work
        if exc.name != "control.health.watch_cli":
            raise  # a broken watcher fails loudly
        return
    add_watch_parser(verbs)


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 3600] seconds")
    return value


def _check(args: argparse.Namespace) -> int:
    from control.health.errors import MockFormatError
    from control.health.report import check_once
    from control.health.types import default_node_name
    from shoal.cli_format import EXIT_FAILED, EXIT_USAGE

    node = args.node or default_node_name()
    if "/" in node:
        print(f"shoal health check: --node {node!r} must not contain '/'", file=sys.stderr)
        return EXIT_USAGE
    try:
        health = check_once(
            nvml_mock=args.nvml_mock,
            node=node,
            expect_gpus=args.expect_gpus,
            xid_wait_s=args.xid_wait_s,
            now=time.time(),
        )
    except MockFormatError as exc:
        print(f"shoal health check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(health.to_json(), indent=2))
    else:
        print("\n".join(_text(health)))
    if any(p.check == "nvml" for p in health.problems) and not health.gpus:
        return EXIT_NVML_UNAVAILABLE
    return 0 if health.healthy else EXIT_FAILED


def _text(health: Any) -> list[str]:
    from shoal.cli_format import table

    lines = [f"node {health.node}: {'healthy' if health.healthy else 'UNHEALTHY'}"]
    lines += [
        f"  {p.severity.value} {p.check}: {p.detail} -> {p.remedy.value}" for p in health.problems
    ]
    rows = []
    for gpu in health.gpus:
        state = "yes" if gpu.healthy else "NO"
        if not gpu.problems:
            rows.append([str(gpu.index), gpu.uuid, state, "", "", "", ""])
        for n, p in enumerate(gpu.problems):
            first = n == 0
            rows.append([str(gpu.index) if first else "", gpu.uuid if first else "",
                         state if first else "", p.severity.value, p.check,
                         p.remedy.value, p.detail])  # fmt: skip
    if rows:
        headers = ["GPU", "UUID", "HEALTHY", "SEVERITY", "CHECK", "REMEDY", "DETAIL"]
        lines += table(headers, rows, "><<<<<<")
    return lines


def _inject(args: argparse.Namespace) -> int:
    from control.health.errors import MockFormatError
    from control.health.mockfile import INJECTIONS, Injection, inject
    from shoal.cli_format import EXIT_USAGE

    where = "shoal health inject"
    if args.nvml_mock is None:
        print(f"{where}: say --nvml-mock FILE.toml (inject never touches real GPUs)",
              file=sys.stderr)  # fmt: skip
        return EXIT_USAGE
    kind = next(k for k in INJECTIONS if getattr(args, k, None) not in (None, False))
    value = getattr(args, kind)
    node_level = kind in ("nvml_init_error", "card_count")
    gpu = None if node_level or (kind == "clear" and args.gpu is None) else (args.gpu or 0)
    injection = Injection(kind, gpu, None if isinstance(value, bool) else value)
    new_cards = value if kind == "card_count" else 8
    try:
        config = inject(args.nvml_mock, injection, new_card_count=new_cards)
    except MockFormatError as exc:
        print(f"{where}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    target = "node" if gpu is None else f"gpu {gpu}"
    print(f"{args.nvml_mock}: {kind.replace('_', '-')} on {target} "
          f"({config.card_count} cards)")  # fmt: skip
    return 0
