"""Tools for resource-limit test suites: a pytest plugin and the helpers such a suite needs.

Registered through the `pytest11` entry point as `corral`, so a suite that
has corral installed gets, with no import:

- the fixture `corral_sandbox`: a NodeSandbox, run once per backend (ids
  `process` and `worker`), closed after the test; its limits come from the
  environment (SANDBOX_MAX_MEMORY_MB, ...) unless the test sets them with
- the marker `@pytest.mark.corral_limits(max_memory_mb=64, max_cpu_ms=200)`,
  which takes the fields of `corral.Limits`.

The helpers `expect_error()` and `cpu_limit_precision()` are plain
functions for use in such tests. See `examples/limit_suite/`.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from corral._exceptions import ConfigError, SandboxError
from corral.sandbox import Limits, NodeSandbox
from corral.selftest import SPIN

#: The backends `corral_sandbox` runs every test on.
BACKENDS = ("process", "worker")


__all__ = ["BACKENDS", "SPIN", "LimitPrecision", "cpu_limit_precision", "expect_error"]


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker, so `--strict-markers` suites accept it."""
    config.addinivalue_line(
        "markers",
        "corral_limits(**limits): the corral.Limits of this test's corral_sandbox "
        "(e.g. max_memory_mb=64, max_cpu_ms=200)",
    )


@pytest.fixture(params=BACKENDS)
def corral_sandbox(request: pytest.FixtureRequest) -> Iterator[NodeSandbox]:
    """A NodeSandbox on each backend in turn, with the test's `corral_limits`, closed after."""
    marker = request.node.get_closest_marker("corral_limits")
    try:
        limits = Limits(**marker.kwargs) if marker is not None else None
    except (TypeError, ConfigError) as exc:
        raise pytest.UsageError(f"@pytest.mark.corral_limits: {exc}") from None
    with NodeSandbox(executor=request.param, limits=limits) as sandbox:
        yield sandbox


def expect_error(sandbox: NodeSandbox, error_type: str, code: str, **execute: Any) -> SandboxError:
    """Run `code` in `sandbox` and return its SandboxError; fail the test unless the execution
    failed with `error_type` (e.g. "cpu_limit", "memory_limit", "timeout")."""
    try:
        result = sandbox.execute_sync(code, **execute)
    except SandboxError as error:
        if error.type != error_type:
            pytest.fail(f"expected {error_type}, got {error.type}: {error.message}")
        return error
    pytest.fail(f"expected {error_type}, but the execution succeeded with {result.output!r}")


@dataclass(frozen=True)
class LimitPrecision:
    """How far past a CPU limit executions got before they were stopped, over several runs."""

    limit_ms: int
    used_ms: tuple[float, ...]

    @property
    def median_overshoot_ms(self) -> float:
        """The median CPU time used past the limit."""
        return statistics.median(used - self.limit_ms for used in self.used_ms)

    @property
    def worst_ratio(self) -> float:
        """The most CPU used, as a multiple of the limit (1.0 is exact)."""
        return max(self.used_ms) / self.limit_ms


def cpu_limit_precision(sandbox: NodeSandbox, limit_ms: int, runs: int = 3) -> LimitPrecision:
    """Spin under a CPU limit of `limit_ms` `runs` times; how much CPU each run used."""
    used = []
    for _ in range(runs):
        error = expect_error(sandbox, "cpu_limit", SPIN, limits=Limits(max_cpu_ms=limit_ms))
        assert error.usage is not None
        used.append(error.usage.cpu_ms)
    return LimitPrecision(limit_ms, tuple(used))
