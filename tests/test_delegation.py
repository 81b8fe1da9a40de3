"""Setting up corral's cgroup v2 subtree (corral.sandbox._delegation) on a real v2 hierarchy:
controllers enabled down to the root, the own cgroup's processes moved into a leaf, nothing
changed above it, a subtree delegated to an unprivileged user. Runs where the host has a v2
hierarchy with the controllers (tests/cgroup2 boots one in CI)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from corral.sandbox._cgroupfs import CgroupUnavailable, mounts
from corral.sandbox._cgroups import V2_CONTROLLERS
from corral.sandbox._delegation import LEAF, prepare

NOBODY = 65534


def _v2_mount() -> Path | None:
    unified = next((m for m in mounts() if m.fstype == "cgroup2"), None)
    if unified is None or os.geteuid() != 0:
        return None
    available = (unified.mountpoint / "cgroup.controllers").read_text().split()
    return unified.mountpoint if set(V2_CONTROLLERS) <= set(available) else None


MOUNT = _v2_mount()
pytestmark = [
    pytest.mark.limits,
    pytest.mark.skipif(
        MOUNT is None,
        reason="needs root (these tests chown cgroups and fork as another user)"
        if os.geteuid() != 0
        else "needs a cgroup v2 hierarchy holding the cpu, memory and pids controllers; this "
        "host gives them to v1 (tests/cgroup2/run boots a v2 kernel for them)",
    ),
]


def _listed(cgroup: Path, name: str) -> set[str]:
    return set((cgroup / name).read_text().split())


def _remove_tree(top: Path) -> None:
    """Kill whatever is left under `top` and remove its cgroups, deepest first."""
    for cgroup in [*sorted(top.rglob("*/"), key=lambda p: len(p.parts), reverse=True), top]:
        if not (cgroup / "cgroup.procs").exists():
            continue
        with contextlib.suppress(OSError):
            (cgroup / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + 5
        while (cgroup / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.01)
        cgroup.rmdir()


@pytest.fixture
def top() -> Iterator[Path]:
    """A fresh cgroup right under the root, removed with everything in it afterwards."""
    assert MOUNT is not None
    path = MOUNT / f"corral-test-{secrets.token_hex(3)}"
    path.mkdir()
    try:
        yield path
    finally:
        _remove_tree(path)


@contextlib.contextmanager
def process_in(cgroup: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping process placed in `cgroup`, killed afterwards."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        (cgroup / "cgroup.procs").write_text(str(process.pid))
        yield process
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().partition("::")[2]


def test_controllers_are_enabled_down_to_the_root(top):
    """With nothing enabled below the root, corral enables cpu, memory and pids on every
    cgroup down to its own root, and reports each change."""
    service = top / "corral.service"
    service.mkdir()
    root = service / "corral"
    changes = prepare(MOUNT, service, root, V2_CONTROLLERS)
    for cgroup in (top, service, root):
        assert set(V2_CONTROLLERS) <= _listed(cgroup, "cgroup.subtree_control"), cgroup
        assert any(str(cgroup) in change for change in changes), (cgroup, changes)
    assert prepare(MOUNT, service, root, V2_CONTROLLERS) == []  # a second run changes nothing


def test_own_cgroup_holding_processes_moves_them_into_a_leaf(top):
    """A service cgroup that holds processes (Delegate=yes) has them moved into its leaf,
    as runc and systemd do, before it passes controllers down."""
    service = top / "corral.service"
    service.mkdir()
    (top / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    with process_in(service) as shell:
        changes = prepare(MOUNT, service, service / "corral", V2_CONTROLLERS)
        assert _cgroup_of(shell.pid) == f"/{top.name}/corral.service/{LEAF}"
    assert _listed(service, "cgroup.procs") == set()
    assert set(V2_CONTROLLERS) <= _listed(service, "cgroup.subtree_control")
    assert any("moved 1 process " in change and LEAF in change for change in changes), changes


def test_a_parent_holding_processes_is_left_alone(top):
    """corral moves only its own cgroup's processes: a parent that holds some is reported,
    with the Delegate=yes fix, and nothing in it is moved."""
    service = top / "corral.service"
    service.mkdir()
    with process_in(top) as other:
        with pytest.raises(CgroupUnavailable) as refused:
            prepare(MOUNT, service, service / "corral", V2_CONTROLLERS)
        assert _cgroup_of(other.pid) == f"/{top.name}"
    message = str(refused.value)
    assert str(top) in message and "Delegate=yes" in message and "systemd-run" in message


def as_nobody(work: Callable[[], str], join: Path | None = None) -> tuple[int, str]:
    """Run `work` in a forked child (no exec: the interpreter may not be reachable for
    nobody) that first joins `join`, as a user's session would be, and drops to nobody.
    Its exit status (0 or 1) and what it returned or raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 1
        try:
            os.close(read_end)
            if join is not None:
                (join / "cgroup.procs").write_text("0")
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            text, status = work(), 0
        except BaseException as exc:
            text = f"{type(exc).__name__}: {exc}"
        finally:
            os.write(write_end, text.encode())
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as output:
        text = output.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wait_status), text


def test_a_delegated_subtree_works_without_root(top):
    """A subtree chowned to an unprivileged user (systemd's Delegate=yes) is set up by that
    user: its processes moved into the leaf, controllers enabled, no root needed."""
    (top / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    delegated = top / "user@65534.service"
    delegated.mkdir()
    for name in ("", "cgroup.procs", "cgroup.subtree_control", "cgroup.threads"):
        os.chown(delegated / name, NOBODY, NOBODY)
    status, changes = as_nobody(
        lambda: "\n".join(prepare(MOUNT, delegated, delegated / "corral", V2_CONTROLLERS)),
        join=delegated,
    )
    assert status == 0, changes
    assert f"moved 1 process of {delegated}" in changes
    assert set(V2_CONTROLLERS) <= _listed(delegated / "corral", "cgroup.subtree_control")
    assert (delegated / "corral").stat().st_uid == NOBODY


def test_an_undelegated_cgroup_says_how_to_delegate(top):
    """An unprivileged user in a cgroup it does not own gets the Delegate=yes and
    systemd-run fixes, and nothing is created."""
    (top / "cgroup.subtree_control").write_text("+cpu +memory +pids")
    status, message = as_nobody(lambda: str(prepare(MOUNT, top, top / "corral", V2_CONTROLLERS)))
    assert status == 1
    assert "CgroupUnavailable" in message, message
    assert "Delegate=yes" in message and "systemd-run" in message, message
    assert not (top / "corral").exists()
