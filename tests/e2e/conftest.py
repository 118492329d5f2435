"""End-to-end tests: real ``vllm serve`` processes (``tests/e2e/engines.py``) beside real
Shoal daemons. Every test here carries the ``e2e`` marker (``pytest -m e2e`` runs only
these; ``-m "not e2e"`` skips them). When a test fails, the tail of the log of every
engine running at that moment is added to its report. After the last one, no shared
memory an engine made (``/dev/shm/psm_*``, ``sem.mp-*``: 240 MB a segment) may be left:
a stopped engine that leaks them fills a node's ``/dev/shm`` run after run."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.e2e.engines import LIVE

# A test's timeout covers its fixtures' setup: starting engines takes 30-90 s (more when
# several start at once on two cores), beyond the suite's 120 s default.
E2E_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/e2e/" in item.nodeid:
            item.add_marker(pytest.mark.e2e)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(E2E_TIMEOUT_S))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.failed:
        for engine in list(LIVE):
            report.sections.append(
                (f"engine {engine.name} ({engine.log_path}), last lines", engine.log_tail())
            )


def _engine_shared_memory() -> set[str]:
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {name for name in names if name.startswith(("psm_", "sem.mp-"))}


@pytest.fixture(scope="package", autouse=True)
def engines_leave_no_shared_memory() -> Iterator[None]:
    before = _engine_shared_memory()
    yield
    leaked = _engine_shared_memory() - before
    assert not leaked, f"stopped engines left shared memory in /dev/shm: {sorted(leaked)}"
