"""The soak (bench/soak.py) with a small count: mixed outcomes, both backends, nothing leaks."""

from __future__ import annotations

import asyncio
import importlib
from pathlib import Path
from types import ModuleType

import pytest

from corral import CodeError, ExecutionResult, Usage

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def soak(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/soak.py, imported as the script would run it."""
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("soak")


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_soak_small_count_passes(soak):
    """60 executions of every kind on both backends, 4 in flight: each outcome right, none
    lost, no descriptor, child, cgroup or (10%) RSS growth, nothing left after close."""
    report = asyncio.run(soak.soak(60, 4))
    assert report.ok, report.failures + report.wrong_shown
    assert report.answered == 60 and report.lost == 0
    for backend in soak.BACKENDS:  # every kind ran, and ended right, on both backends
        assert set(report.outcomes[backend]) == set(soak.DECK), report.outcomes
    assert report.before is not None and report.after is not None


def test_soak_verdict_catches_wrong_outcomes(soak):
    """The soak's check rejects a wrong error type, another execution's answer, the wrong
    backend, a missing cancellation and a lost execution."""
    url = "http://127.0.0.1:1"

    def result(output: object, executor: str = "process") -> ExecutionResult:
        usage = Usage(wall_ms=1.0, cpu_ms=1.0, peak_memory_bytes=None)
        return ExecutionResult(output, [], executor, usage, "cgroup-v1")

    assert soak._verdict("code_error", 1, url, "process", CodeError("boom")) is None
    assert soak._verdict("cpu_limit", 1, url, "process", CodeError("boom")) is not None
    assert soak._verdict("http_ok", 1, url, "process", result({"n": 1})) is None
    assert soak._verdict("http_ok", 1, url, "process", result({"n": 2})) is not None
    assert soak._verdict("http_ok", 1, url, "worker", result({"n": 1})) is not None
    assert soak._verdict("cancelled", 1, url, "process", "cancelled") is None
    assert soak._verdict("cancelled", 1, url, "process", result({"n": 1})) is not None
    assert soak._verdict("ok", 1, url, "process", "lost") is not None
