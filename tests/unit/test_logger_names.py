"""Every module logs under the one ``shoal`` logger tree: ``shoal.<module path>`` (m22)."""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("shoal", "kvcache", "loader", "router", "control", "sim")
CALL = re.compile(r"^log = logging\.getLogger\((.*)\)$", re.MULTILINE)


def test_every_module_logger_is_named_shoal_dot_its_module() -> None:
    calls = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "_proto" in path.parts:
                continue
            for argument in CALL.findall(path.read_text()):
                calls.append((str(path.relative_to(REPO)), argument))
    assert calls, "no loggers found: the scan is broken"
    wrong = [(path, argument) for path, argument in calls if argument != '"shoal." + __name__']
    assert wrong == [], 'use logging.getLogger("shoal." + __name__)'


@pytest.mark.parametrize("module", ["kvcache.daemon", "kvcache.arena", "kvcache.cluster.node"])
def test_loggers_hang_under_shoal(module: str) -> None:
    log = importlib.import_module(module).log
    assert log.name == f"shoal.{module}"
    tree = logging.getLogger("shoal")
    saved = tree.level
    try:
        tree.setLevel(logging.CRITICAL)  # configuring "shoal" reaches the module's logger
        assert log.getEffectiveLevel() == logging.CRITICAL
    finally:
        tree.setLevel(saved)
