"""The CI skip policy in conftest.py: with `CI` set no test can skip, whatever way it tries."""

from __future__ import annotations

import conftest
import pytest

pytest_plugins = ["pytester"]

SKIPPING_TESTS = """
import pytest

@pytest.fixture
def service():
    pytest.skip("service in fixture missing")

def test_skip_call():
    pytest.skip("skip called in test")

@pytest.mark.skip(reason="skip mark")
def test_skip_mark():
    pass

@pytest.mark.skipif(True, reason="skipif mark")
def test_skipif_mark():
    pass

def test_importorskip():
    pytest.importorskip("willi_no_such_module")

def test_fixture_skip(service):
    pass

@pytest.mark.xfail(reason="an expected failure is no skip")
def test_xfail():
    assert False

def test_pass():
    pass
"""

REASONS = (
    "service in fixture missing",
    "skip called in test",
    "skip mark",
    "skipif mark",
    "could not import 'willi_no_such_module'",
)


def run_inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str | None) -> pytest.RunResult:
    """Run the inner tests in-process with only conftest.py's hooks and `CI` as given."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # only the hooks under test, and faster
    return pytester.runpytest("-p", "no:cacheprovider", "-rA", plugins=[conftest])


def test_without_ci_skips_stay_skips(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_inner=SKIPPING_TESTS)
    result = run_inner(pytester, monkeypatch, None)
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)
    assert result.ret == pytest.ExitCode.OK
    assert "skipped in CI" not in result.stdout.str()


@pytest.mark.parametrize("ci", ["true", "1", "yes"])
def test_with_ci_every_skip_fails_with_its_reason(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str
) -> None:
    pytester.makepyfile(test_inner=SKIPPING_TESTS)
    result = run_inner(pytester, monkeypatch, ci)
    # Skips in setup (marks, fixtures) become setup errors, skips in the test failures.
    result.assert_outcomes(passed=1, failed=2, errors=3, xfailed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    output = result.stdout.str()
    for reason in REASONS:
        assert f"skipped in CI: {reason}" in output, reason


def test_empty_ci_is_not_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(test_inner=SKIPPING_TESTS)
    run_inner(pytester, monkeypatch, "").assert_outcomes(passed=1, skipped=5, xfailed=1)


def test_allow_list_exempts_only_its_entries(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "CI_SKIP_ALLOWED", {"*::test_skip_mark": "cannot run anywhere"})
    pytester.makepyfile(test_inner=SKIPPING_TESTS)
    result = run_inner(pytester, monkeypatch, "true")
    result.assert_outcomes(passed=1, skipped=1, failed=2, errors=2, xfailed=1)


def test_collection_skip_fails_in_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(
        test_module_skip='import pytest\npytest.importorskip("willi_no_such_module")\n\ndef test_x():\n    pass\n'
    )
    result = run_inner(pytester, monkeypatch, None)
    result.assert_outcomes(skipped=1)
    result = run_inner(pytester, monkeypatch, "true")
    result.assert_outcomes(errors=1)
    assert result.ret != pytest.ExitCode.OK
    assert "skipped in CI: could not import 'willi_no_such_module'" in result.stdout.str()


def test_the_real_allow_list_is_empty() -> None:
    """Every entry is a test CI silently loses; adding one must be a visible decision."""
    assert conftest.CI_SKIP_ALLOWED == {}


@pytest.mark.parametrize(
    ("longrepr", "expected"),
    [
        (("t.py", 3, "Skipped: no server"), "no server"),
        (("t.py", 3, "Skipped: Skipped: twice"), "Skipped: twice"),
        (("t.py", 3, "odd"), "odd"),
        ("Skipped: as text", "as text"),
    ],
)
def test_skip_reason(longrepr: object, expected: str) -> None:
    report = pytest.TestReport("t.py::t", ("t.py", 3, "t"), {}, "skipped", longrepr, "call")  # type: ignore[arg-type]
    assert conftest.skip_reason(report) == expected
