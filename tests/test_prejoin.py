"""The process backend's spares join their cgroups while they wait: what a user may rely on.

A spare's cgroup is made ahead and joined before any request; the host
writes the execution's limits into it with the request. Nothing the spare
(or anything else) did in that cgroup before counts against the execution,
no execution runs without its limits, and no spare's cgroup outlives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import _corral_cgroups, cgroup_pids

import corral
from corral import Limits, NodeSandbox
from corral.sandbox._cgroups import CgroupUnavailable, ExecutionCgroup, default_roots

TRIVIAL = "def run(params, context):\n    return params\n"
HOG = "def run(params, context):\n    data = 'x' * (100 << 20)\n    return len(data)\n"


def _roots() -> tuple[int, dict[str, Path]]:
    try:
        return default_roots(None)
    except CgroupUnavailable as exc:
        pytest.skip(f"no cgroups: {exc}")


pytestmark = [
    pytest.mark.limits,
    pytest.mark.skipif(os.geteuid() != 0, reason="per-execution cgroups need root"),
]


def _waiting_spares(count: int, timeout: float = 10.0) -> dict[str, int]:
    """cgroup name -> pid of `count` spares of this host that joined their cgroup while
    waiting (no execution runs, so every occupied cgroup is a spare's)."""
    deadline = time.monotonic() + timeout
    while True:
        found = {c.name: procs[0] for c in _corral_cgroups() if (procs := cgroup_pids(c))}
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"only {len(found)} spares joined a cgroup ahead"
        time.sleep(0.02)


def _cgroup(name: str) -> ExecutionCgroup:
    version, roots = _roots()
    return ExecutionCgroup(version, {c: root / name for c, root in roots.items()})


def _gone(names: list[str], timeout: float = 5.0) -> bool:
    """Whether every cgroup named is removed (in every hierarchy) within `timeout`."""
    _, roots = _roots()
    deadline = time.monotonic() + timeout
    while any((root / name).exists() for root in roots.values() for name in names):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@contextlib.contextmanager
def _intruder(name: str, work: str) -> Iterator[subprocess.Popen[str]]:
    """A process moved into the cgroup `name`, which then runs `work` (Python) and prints
    "ready"; killed on the way out."""
    script = f"import sys\nsys.stdin.readline()\n{work}\nprint('ready', flush=True)\n"
    script += "sys.stdin.readline()\n"
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        for path in dict.fromkeys(_cgroup(name).dirs.values()):
            (path / "cgroup.procs").write_text(str(process.pid))
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "ready"
        yield process
    finally:
        process.kill()
        process.wait()


def test_cpu_spent_in_a_spares_cgroup_before_its_request_does_not_count():
    """CPU charged to a spare's cgroup before its request counts neither in usage.cpu_ms nor
    against SANDBOX_MAX_CPU_MS."""
    limits = Limits(max_memory_mb=64, max_cpu_ms=200)
    with NodeSandbox(executor="process", limits=limits) as sandbox:
        sandbox.start()
        for name in _waiting_spares(2):
            with _intruder(name, "import time\nend = time.process_time() + 0.3\n"
                           "while time.process_time() < end:\n    pass"):  # fmt: skip
                pass
            assert _cgroup(name).cpu_ns() >= 300_000_000  # charged to the spare's cgroup
        result = sandbox.execute_sync(TRIVIAL, params={"n": 7})
        assert result.output == {"n": 7}
        assert result.usage.cpu_ms < 100


def test_a_spare_holding_more_than_the_limit_never_runs_an_execution_unlimited():
    """A spare whose cgroup already holds more memory than the execution's limit is passed
    over: the execution runs elsewhere, under its limit."""
    with NodeSandbox(executor="process", limits=Limits(max_memory_mb=64)) as sandbox:
        sandbox.start()
        with contextlib.ExitStack() as stack:
            for name in _waiting_spares(2):
                stack.enter_context(_intruder(name, "held = b'x' * (80 << 20)"))
                assert _cgroup(name).memory_bytes() >= 80 << 20
            with pytest.raises(corral.MemoryLimitExceeded):
                sandbox.execute_sync(HOG)
        assert sandbox.execute_sync(TRIVIAL, params={"n": 1}).output == {"n": 1}


def test_a_spare_killed_while_waiting_leaves_no_cgroup():
    """Spares killed while they wait are passed over, and their cgroups are removed while the
    sandbox stays open."""
    with NodeSandbox(executor="process", limits=Limits(max_memory_mb=64)) as sandbox:
        sandbox.start()
        spares = _waiting_spares(2)
        for pid in spares.values():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while any(cgroup_pids(_cgroup(name).dirs["pids" if "pids" in _roots()[1] else "unified"])
                  for name in spares):  # fmt: skip
            assert time.monotonic() < deadline, "a killed spare did not exit"
            time.sleep(0.01)
        assert sandbox.execute_sync(TRIVIAL, params={"n": 2}).output == {"n": 2}
        assert _gone(list(spares)), "a dead spare's cgroup was left"


def test_a_zygote_restart_leaves_no_spare_cgroup():
    """When the zygote dies, its spares' cgroups are removed once the next execution starts a
    new one, while the sandbox stays open."""
    with NodeSandbox(executor="process", limits=Limits(max_memory_mb=64)) as sandbox:
        sandbox.start()
        spares = _waiting_spares(2)
        zygote = psutil.Process(sandbox._backend.zygote.pid)
        zygote.kill()  # no janitor: nothing sweeps the cgroups for the host
        zygote.wait(5)
        assert sandbox.execute_sync(TRIVIAL, params={"n": 3}).output == {"n": 3}
        assert _gone(list(spares)), "a spare's cgroup outlived its zygote"


def test_close_removes_the_cgroups_of_waiting_spares():
    """After close(), no cgroup a spare joined while waiting is left."""
    with NodeSandbox(executor="process", limits=Limits(max_memory_mb=64)) as sandbox:
        assert sandbox.execute_sync(TRIVIAL, params={"n": 4}).output == {"n": 4}
        spares = _waiting_spares(2)
    assert _gone(list(spares), timeout=0.0)
