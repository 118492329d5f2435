"""The ``shoal`` command's component registry: names known up front, verbs on demand."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

import pytest

from shoal.cli import COMPONENTS, _chosen, build_parser, missing_modules


class Recorder:
    """Stands in for argparse's subparsers: records each group's help text."""

    def __init__(self) -> None:
        self.helps: dict[str, Any] = {}

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        self.helps[name] = kwargs.get("help")
        return argparse.ArgumentParser(prog=f"shoal {name}")


@pytest.mark.parametrize("component", COMPONENTS, ids=lambda c: c.name)
def test_the_registry_says_what_each_component_registers(component: Any) -> None:
    if missing_modules(component.requires):
        pytest.skip(f"needs the {component.extra} extra")
    recorder = Recorder()
    importlib.import_module(component.module).register(recorder)
    assert recorder.helps == {component.name: component.help}


def test_the_chosen_component_is_found_around_global_options() -> None:
    def name(argv: list[str]) -> str | None:
        chosen = _chosen(argv)
        return chosen.name if chosen else None

    assert name(["cache", "stats"]) == "cache"
    assert name(["--config", "x.toml", "load", "--help"]) == "load"
    assert name(["--config=x.toml", "loader", "list"]) == "loader"
    assert name(["--help"]) is None
    assert name(["nothing"]) is None


def test_config_given_before_and_after_the_verb_the_later_wins() -> None:
    parser = build_parser("cache")
    assert parser.parse_args(["cache", "stats", "--config", "b"]).config == "b"
    assert parser.parse_args(["--config", "a", "cache", "stats"]).config == "a"
    assert parser.parse_args(["--config", "a", "cache", "stats", "--config", "b"]).config == "b"
    assert parser.parse_args(["cache", "stats"]).config is None


def test_missing_modules_finds_absent_ones_without_importing() -> None:
    assert missing_modules(["json", "no_such_module_xyz", "no_such_pkg_xyz.sub"]) == [
        "no_such_module_xyz",
        "no_such_pkg_xyz.sub",
    ]
