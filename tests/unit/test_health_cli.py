"""``shoal health``'s parser: the watcher's verb joins when watch_cli exists, not before."""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any

import pytest

from control.health import cli


def choices(parser: Any) -> dict[str, Any]:
    return dict(parser._subparsers._group_actions[0].choices)


def verbs_of(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(choices(choices(parser)["health"]))


def build() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal")
    cli.register(parser.add_subparsers(dest="component"))
    return parser


def test_without_watch_cli_check_and_inject_still_register(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "control.health.watch_cli", None)  # import fails
    assert verbs_of(build()) == ["check", "inject"]


def test_watch_cli_adds_its_verb(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    fake = types.ModuleType("control.health.watch_cli")

    def add_watch_parser(verbs: Any) -> None:
        seen.append(verbs)
        verbs.add_parser("watch")

    fake.add_watch_parser = add_watch_parser  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "control.health.watch_cli", fake)
    assert verbs_of(build()) == ["check", "inject", "watch"]
    assert len(seen) == 1


def test_inject_takes_exactly_one_fault() -> None:
    args = build().parse_args(
        ["health", "inject", "--nvml-mock", "f.toml", "--gpu", "2", "--ecc-dbe", "3"]
    )
    assert (args.ecc_dbe, args.gpu, args.xid, args.clear) == (3, 2, None, False)
    with pytest.raises(SystemExit):
        build().parse_args(["health", "inject", "--nvml-mock", "f.toml"])
