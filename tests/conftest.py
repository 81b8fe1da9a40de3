"""Fixtures shared by the suite: the sandbox per backend, and the leak check after every test."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.sandbox._cgroups import CgroupUnavailable, default_roots

#: The backends the conformance suite runs on (the worker backend joins with its issue).
BACKENDS = ["process"]
LEAK_PATIENCE_S = 5.0  # killed children and their cgroups are gone well within this


def _sandbox_processes() -> set[int]:
    """Zygotes and sandbox children anywhere on the machine (orphans included)."""
    found = set()
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if any("corral.sandbox._zygote" in part for part in cmdline):
            found.add(process.pid)
    return found


def _corral_cgroups() -> set[Path]:
    """The auto cgroup roots of corral on this host and everything below them."""
    try:
        _, roots = default_roots(None)
    except CgroupUnavailable:
        return set()
    found = set()
    for root in roots.values():
        if root.exists():
            found.add(root)
            found.update(path for path in root.iterdir() if path.is_dir())
    return found


def leftovers(before_processes: set[int], before_cgroups: set[Path]) -> tuple[set[int], set[Path]]:
    """Sandbox processes and cgroups that appeared since the snapshot and are still there."""
    deadline = time.monotonic() + LEAK_PATIENCE_S
    while True:
        processes = _sandbox_processes() - before_processes
        cgroups = _corral_cgroups() - before_cgroups
        if not (processes or cgroups) or time.monotonic() > deadline:
            return processes, cgroups
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every test leaves no sandbox process and no cgroup behind."""
    before_processes, before_cgroups = _sandbox_processes(), _corral_cgroups()
    yield
    processes, cgroups = leftovers(before_processes, before_cgroups)
    assert not processes, f"sandbox processes left behind: {sorted(processes)}"
    assert not cgroups, f"cgroups left behind: {sorted(map(str, cgroups))}"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend under test."""
    return str(request.param)


@pytest.fixture
def sandbox(backend: str) -> Iterator[NodeSandbox]:
    """A NodeSandbox on the backend under test, 64 MB by default, closed after the test."""
    with NodeSandbox(
        executor=backend, limits=Limits(max_memory_mb=64), settings=load_settings()
    ) as box:
        yield box


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No corral env var from the caller's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("SANDBOX_", "CORRAL_", "WORKER_SANDBOX", "GENERIC_EXECUTOR")):
            monkeypatch.delenv(name)
    return monkeypatch


def running_execution_pid(timeout: float = 10.0) -> int:
    """The pid of a sandbox child inside its execution cgroup, once one is running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for cgroup in _corral_cgroups():
            procs = cgroup / "cgroup.procs"
            if cgroup.parent.name == "corral" and procs.exists():
                pids = procs.read_text().split()
                if pids:
                    return int(pids[0])
        time.sleep(0.02)
    raise AssertionError(f"no sandbox execution started within {timeout} s")
