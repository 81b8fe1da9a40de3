"""The OS layers on their own: with the language layer switched off (a test-only switch),
plain Python in a sandbox child still cannot reach the network, exec a program, start
processes, read the host's files, see or signal the host's processes, or outgrow its
limits. With the system-call filter switched off too, the namespaces, the filesystem
view and the uid drop still hold by themselves."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conftest import BACKENDS

import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.sandbox._confine import interpreter_paths
from corral.selftest import loopback_listener

EPERM, ENOENT, EAGAIN, EROFS = 1, 2, 11, 30
LAYERS_OFF = {"plain": {"language"}, "bare": {"language", "seccomp"}}


def _sandbox(executor: str, layers_off: set[str]) -> NodeSandbox:
    return NodeSandbox(
        executor=executor,
        limits=Limits(max_memory_mb=64),
        settings=load_settings(),
        _unsafe_layers_off=layers_off,
    )


@pytest.fixture(params=[(b, layers) for b in BACKENDS for layers in LAYERS_OFF], ids=str)
def below(request: pytest.FixtureRequest) -> Iterator[NodeSandbox]:
    """Plain Python, with and without the system-call filter: each layer must hold alone."""
    executor, layers = request.param
    with _sandbox(executor, LAYERS_OFF[layers]) as sandbox:
        yield sandbox


def _errno_of(sandbox: NodeSandbox, body: str) -> int | str:
    """Run `body` (indented code, may use os and socket) and return the errno it failed
    with, or what it returned."""
    code = (
        "import os, socket, signal\ndef run(params, context):\n    try:\n"
        + "".join(f"        {line}\n" for line in body.splitlines())
        + "    except OSError as exc:\n        return exc.errno\n"
    )
    return sandbox.execute_sync(code).output


def test_the_switch_really_removes_the_language_layer(plain):
    """Plain Python may import os and reach dunders: what follows tests the OS alone."""
    code = (
        "import os\ndef run(params, context):\n"
        "    return [os.getpid() > 0, ().__class__.__name__]\n"
    )
    assert plain.execute_sync(code).output == [True, "tuple"]


def test_no_network_even_to_the_hosts_loopback(below):
    """Nothing reaches a listener on the host's 127.0.0.1: the filter refuses the socket,
    and without it the child's network namespace has no route to the host."""
    with loopback_listener() as (port, connected):
        outcome = _errno_of(
            below,
            f"socket.create_connection(('127.0.0.1', {port}), timeout=1)\nreturn 'connected'",
        )
    assert outcome != "connected" and not connected


def test_the_filter_refuses_any_new_socket(plain):
    """socket() itself fails with EPERM, whatever the family."""
    for family in ("AF_INET", "AF_UNIX", "AF_NETLINK", "AF_PACKET"):
        assert _errno_of(plain, f"socket.socket(socket.{family})\nreturn 'made'") == EPERM


def test_no_program_can_be_executed(below):
    """exec fails: the filter refuses it; without it no program is in the child's view, and
    the dropped uid's process limit refuses an exec anyway."""
    outcome = _errno_of(below, "os.execv('/bin/sh', ['sh', '-c', 'true'])")
    assert outcome in (EPERM, ENOENT, EAGAIN)
    assert _errno_of(below, "return os.path.exists('/bin/sh')") is False


@pytest.mark.limits
def test_no_new_processes(below):
    """fork() fails: EPERM from the filter; without it EAGAIN, the dropped uid may own
    no more processes (RLIMIT_NPROC) and the cgroup admits none (pids.max)."""
    outcome = _errno_of(below, "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nreturn 'forked'")
    assert outcome in (EPERM, EAGAIN)


def test_host_files_are_out_of_sight(below):
    """/etc/passwd and the host's other files are not in the child's filesystem view; the
    view is read-only."""
    assert _errno_of(below, "open('/etc/passwd').read()\nreturn 'read'") == ENOENT
    assert _errno_of(below, "open('/root/.bashrc').read()\nreturn 'read'") == ENOENT
    assert _errno_of(below, "open('/canary', 'w')\nreturn 'written'") == EROFS
    top = set(_errno_of(below, "return os.listdir('/')"))
    needed = {path.split("/")[1] for path in interpreter_paths()}  # the stdlib, corral
    assert top - needed == {"dev", "proc", "corral-cwd"}
    assert {"etc", "home", "bin", "usr", "var", "tmp"}.isdisjoint(top - needed)
    assert _errno_of(below, "return [os.getcwd(), os.listdir('.')]") == ["/corral-cwd", []]


def test_host_processes_are_out_of_sight_and_out_of_reach(below):
    """The child sees only its own PID namespace (no host process), and cannot signal the
    zygote (its namespace's init, under another uid)."""
    cmdlines = _errno_of(
        below,
        "found = []\nfor pid in os.listdir('/proc'):\n    if pid.isdigit():\n"
        "        with open(f'/proc/{pid}/cmdline', 'rb') as f:\n"
        "            found.append(f.read().decode(errors='replace'))\nreturn found",
    )
    assert cmdlines and not any("pytest" in line for line in cmdlines)
    assert str(os.getpid()) not in str(_errno_of(below, "return os.listdir('/proc')"))
    assert _errno_of(below, "os.kill(1, signal.SIGKILL)\nreturn 'signalled'") == EPERM


def test_the_child_runs_unprivileged(below):
    """Not root, no capability, no_new_privs."""
    status = _errno_of(
        below,
        "lines = open('/proc/self/status').read().splitlines()\n"
        "return dict(line.split(':\\t', 1) for line in lines)",
    )
    assert int(status["Uid"].split()[0]) != 0
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_no_environment_and_no_stray_descriptors(plain):
    """The child's environment is empty and it holds only stdio and its channel."""
    code = (
        "import os\ndef run(params, context):\n"
        "    return [dict(os.environ), sorted(int(fd) for fd in os.listdir('/proc/self/fd'))]\n"
    )
    environment, descriptors = plain.execute_sync(code).output
    assert environment == {}
    assert len(descriptors) <= 5  # 0-2 on /dev/null, the channel, and listdir's own


def test_memory_limit_holds_without_the_language_layer(plain):
    """A 64 MB limit stops plain Python hoarding memory, caught MemoryError or not."""
    code = (
        "def run(params, context):\n    hoard = []\n    try:\n        while True:\n"
        "            hoard.append(bytearray(1 << 20))\n    except MemoryError:\n"
        "        return 'survived'\n"
    )
    with pytest.raises(corral.MemoryLimitExceeded):
        plain.execute_sync(code)


def test_cpu_limit_holds_without_the_language_layer(plain):
    """A CPU limit stops plain Python that catches every exception in its loop."""
    code = (
        "def run(params, context):\n    while True:\n        try:\n            while True:\n"
        "                pass\n        except BaseException:\n            pass\n"
    )
    with pytest.raises(corral.SandboxError) as caught:
        plain.execute_sync(code, limits=Limits(max_cpu_ms=300))
    assert caught.value.type == "cpu_limit"
    assert caught.value.usage.cpu_ms <= 600


#: Reaching other sandbox processes or outliving the execution, each refused by the filter.
CROSS_EXECUTION = {
    "sysv-shared-memory": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.shmget(0x5EC, 1 << 20, 0o1600) < 0:\n    return ctypes.get_errno()\nreturn 'made'",
    "sysv-message-queue": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.msgget(0x5EC, 0o1600) < 0:\n    return ctypes.get_errno()\nreturn 'made'",
    "posix-message-queue": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.mq_open(b'/corral', 0o100 | 2, 0o600, None) < 0:\n"
    "    return ctypes.get_errno()\nreturn 'made'",
    "sigio-owner": "import fcntl\nr, w = os.pipe()\nfcntl.fcntl(r, fcntl.F_SETOWN, 1)\n"
    "return 'owned'",
    "signal-by-f-setsig": "import fcntl\nr, w = os.pipe()\nfcntl.fcntl(r, 10, 9)\nreturn 'set'",
    # The kernel reads these commands as 32 bits: bit 32 set must not slip past the filter.
    "sigio-owner-high-bits": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "r, w = os.pipe()\nif libc.syscall(72, r, ctypes.c_long((1 << 32) | 8), 1) < 0:\n"
    "    return ctypes.get_errno()\nreturn 'owned'",
    "dumpable-high-bits": "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.syscall(157, ctypes.c_long((1 << 32) | 4), 1, 0, 0, 0) < 0:\n"
    "    return ctypes.get_errno()\nreturn 'dumpable'",
    "prlimit-of-another": "import resource\n"
    "resource.prlimit(1, resource.RLIMIT_AS, (1 << 24, 1 << 24))\nreturn 'limited'",
    "renice": "os.setpriority(os.PRIO_USER, os.getuid(), 19)\nreturn 'reniced'",
    "affinity": "os.sched_setaffinity(0, {0})\nreturn 'pinned'",
}


@pytest.mark.parametrize("attack", CROSS_EXECUTION.values(), ids=CROSS_EXECUTION.keys())
def test_no_state_or_signal_crosses_to_other_executions(plain, attack):
    """IPC objects (which would outlive the execution and carry data to the next one),
    descriptor-owner signals, and another process's limits or priority: all EPERM."""
    assert _errno_of(plain, attack) == EPERM


@pytest.mark.limits
def test_no_cgroup_file_is_in_reach(below):
    """The child joined its cgroup through files the host opened and closed them: no cgroup
    file is in its view, so it cannot leave its cgroup or move another process."""
    assert _errno_of(below, "return os.path.exists('/sys/fs/cgroup')") is False
    mounts = _errno_of(below, "return open('/proc/self/mountinfo').read()")
    assert isinstance(mounts, int) or "cgroup" not in mounts  # (unreadable: not dumpable)
    kinds = _errno_of(
        below,
        "import stat\nkinds = []\nfor fd in range(64):\n    try:\n"
        "        mode = os.fstat(fd).st_mode\n    except OSError:\n        continue\n"
        "    kinds.append('socket' if stat.S_ISSOCK(mode) else 'device' if stat.S_ISCHR(mode)"
        " else 'other')\nreturn kinds",
    )
    assert set(kinds) <= {"socket", "device"}  # the channel and /dev/null: no cgroup file
