"""Suite-wide rules.

A test module that needs an optional package says so with ``pytest.importorskip``, so a
developer without, say, vLLM installed still runs the rest. In CI that convenience hides
breakage: a missing or broken install would turn whole suites (connector, sidecar, peers)
into green skips (audit m15). So where ``CI`` is set (CI runs with ``CI=true``) or
``SHOAL_TESTS_REQUIRE_ALL=1``, a skip for a module that could not be imported fails the run.
Other skips (not root, no tmpfs mount) stay skips.
"""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["pytester"]  # tests/unit/test_suite_rules.py checks this file's rule

_import_skips: list[str] = []


def require_all() -> bool:
    flag = os.environ.get("SHOAL_TESTS_REQUIRE_ALL") or os.environ.get("CI") or ""
    return flag.strip().lower() in {"1", "true", "yes", "on"}


def _note(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and "could not import" in str(report.longrepr):
        _import_skips.append(f"{report.nodeid}: {report.longrepr}")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note(report)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _import_skips and require_all():
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(
                "tests skipped for a missing import, which CI does not allow "
                "(SHOAL_TESTS_REQUIRE_ALL / CI):",
                red=True,
            )
            for line in _import_skips:
                reporter.write_line(f"  {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
