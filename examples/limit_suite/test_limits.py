"""A resource-limit suite to copy: it proves, on both backends, that your deployment's limits
hold. Run it with the limits of the deployment in the environment, for example:

    SANDBOX_MAX_MEMORY_MB=64 SANDBOX_MAX_CPU_MS=500 python3 -m pytest examples/limit_suite

The `corral_sandbox` fixture and the `corral_limits` marker come with corral (a pytest
plugin); `expect_error` and `cpu_limit_precision` are in `corral.testing`.
"""

import pytest

from corral.config import get_settings
from corral.testing import SPIN, cpu_limit_precision, expect_error

HOG = "def run(params, context):\n    hoard = []\n    while True:\n        hoard.append('x' * 100_000)\n"
SLEEP = "import time\ndef run(params, context):\n    time.sleep(30)\n"


def test_a_trivial_connector_runs(corral_sandbox):
    """The sandbox answers at all, on this backend."""
    result = corral_sandbox.execute_sync(
        "def run(params, context):\n    return params['n'] * 2\n", params={"n": 21}
    )
    assert result.output == 42


def test_deployment_memory_limit_holds(corral_sandbox):
    """The memory limit set in SANDBOX_MAX_MEMORY_MB stops a connector that hoards memory."""
    limit_mb = get_settings().sandbox_max_memory_mb
    if limit_mb is None:
        pytest.skip("SANDBOX_MAX_MEMORY_MB is not set: this deployment has no memory limit")
    error = expect_error(corral_sandbox, "memory_limit", HOG)
    assert error.usage.peak_memory_bytes <= (limit_mb + 16) << 20


def test_deployment_cpu_limit_holds(corral_sandbox):
    """The CPU limit set in SANDBOX_MAX_CPU_MS stops a spin within a fifth of the limit."""
    limit_ms = get_settings().sandbox_max_cpu_ms
    if limit_ms is None:
        pytest.skip("SANDBOX_MAX_CPU_MS is not set: this deployment has no CPU limit")
    error = expect_error(corral_sandbox, "cpu_limit", SPIN)
    assert error.usage.cpu_ms <= limit_ms * 1.2 + 50


@pytest.mark.corral_limits(max_cpu_ms=200)
def test_cpu_limit_precision(corral_sandbox):
    """A 200 ms CPU limit stops a spin at between 200 and 300 ms, every time."""
    precision = cpu_limit_precision(corral_sandbox, 200)
    assert precision.worst_ratio <= 1.5, precision


@pytest.mark.corral_limits(max_memory_mb=64)
def test_marker_sets_the_memory_limit(corral_sandbox):
    """The corral_limits marker overrides the environment for one test."""
    expect_error(corral_sandbox, "memory_limit", HOG)


def test_wall_time_out(corral_sandbox):
    """A connector that sleeps past its time-out is stopped as `timeout`."""
    expect_error(corral_sandbox, "timeout", SLEEP, timeout_ms=300)
