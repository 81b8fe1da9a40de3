"""corral.testing: the pytest plugin users write resource-limit suites with."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLE_SUITE = Path(__file__).resolve().parents[1] / "examples" / "limit_suite" / "test_limits.py"


def test_example_suite_passes_on_both_backends(pytester, monkeypatch):
    """The shipped example suite runs every test on both backends with the env's limits."""
    monkeypatch.setenv("SANDBOX_MAX_MEMORY_MB", "64")
    monkeypatch.setenv("SANDBOX_MAX_CPU_MS", "500")
    pytester.makepyfile(test_limits=EXAMPLE_SUITE.read_text())
    result = pytester.runpytest_subprocess("-v", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=12)
    result.stdout.fnmatch_lines(
        ["*test_a_trivial_connector_runs?process? PASSED*", "*runs?worker? PASSED*"]
    )


def test_env_limits_absent_are_skipped_with_a_reason(pytester, monkeypatch):
    """Without the env limits, the suite's deployment tests skip and say why."""
    monkeypatch.delenv("SANDBOX_MAX_MEMORY_MB", raising=False)
    monkeypatch.delenv("SANDBOX_MAX_CPU_MS", raising=False)
    pytester.makepyfile(test_limits=EXAMPLE_SUITE.read_text())
    result = pytester.runpytest_subprocess("-rs", "-p", "no:cacheprovider", "-W", "ignore")
    result.assert_outcomes(passed=8, skipped=4)
    result.stdout.fnmatch_lines(["*SANDBOX_MAX_MEMORY_MB is not set*"])


def test_expect_error_fails_the_test_on_the_wrong_type(pytester):
    """expect_error fails a test whose execution ends with another error, or succeeds."""
    pytester.makepyfile(
        """
        import pytest
        from corral.testing import expect_error

        @pytest.mark.corral_limits(max_memory_mb=64)
        def test_wrong(corral_sandbox):
            expect_error(corral_sandbox, "cpu_limit", "def run(p, c):\\n    return 1 / 0\\n")

        @pytest.mark.corral_limits(max_memory_mb=64)
        def test_success(corral_sandbox):
            expect_error(corral_sandbox, "timeout", "def run(p, c):\\n    return 1\\n")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        ["*expected cpu_limit, got code_error*", "*expected timeout, but*succeeded with 1*"]
    )


def test_bad_marker_is_a_usage_error(pytester):
    """A corral_limits marker with an unknown or bad field stops with a clear message."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.corral_limits(max_memory_mb=-1)
        def test_bad(corral_sandbox):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*corral_limits*max_memory_mb=-1 is invalid*"])


@pytest.mark.corral_limits(max_memory_mb=64)
def test_plugin_fixture_is_available_here(corral_sandbox):
    """The plugin is installed through its entry point: this suite gets the fixture too."""
    assert corral_sandbox.limits.max_memory_mb == 64
    assert corral_sandbox.executor in ("process", "worker")
