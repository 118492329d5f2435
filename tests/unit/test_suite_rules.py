"""The suite-wide rule of tests/conftest.py: CI fails on suites skipped for a missing import."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFTEST = (Path(__file__).resolve().parents[1] / "conftest.py").read_text()


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("SHOAL_TESTS_REQUIRE_ALL", raising=False)
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile(
        test_needs_extra='import pytest\npytest.importorskip("shoal_no_such_module")\n'
        "def test_a(): pass\n",
        test_plain='import pytest\ndef test_b(): pass\ndef test_c(): pytest.skip("not root")\n',
    )
    return pytester


def test_a_developer_without_an_extra_gets_skips(suite: pytest.Pytester) -> None:
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2)
    assert result.ret == 0


@pytest.mark.parametrize("variable", ["CI", "SHOAL_TESTS_REQUIRE_ALL"])
def test_ci_fails_on_a_module_skipped_for_a_missing_import(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "true")
    result = suite.runpytest("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped for a missing import*", "*shoal_no_such_module*"])


def test_ci_keeps_other_skips(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST.replace('pytest_plugins = ["pytester"]', ""))
    pytester.makepyfile('import pytest\ndef test_c(): pytest.skip("not root")\n')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(skipped=1)
    assert result.ret == 0
