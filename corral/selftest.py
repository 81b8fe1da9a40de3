"""`corral selftest`: prove on this host, with real executions, that each limit holds.

Every check runs connector code that breaks one limit and expects the error
type that limit promises. A check is `enforced`, `degraded` (it holds, but
through a weaker mechanism, or a layer is missing; the row says why and what
to do) or `failed`. Only a failed check fails the run.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from corral._exceptions import SandboxError
from corral.config import Settings
from corral.sandbox import Limits, NodeSandbox
from corral.sandbox._confine import DENIED_SYSCALLS

ENFORCED, DEGRADED, FAILED = "enforced", "degraded", "failed"
CPU_LIMIT_MS = 200  # used when SANDBOX_MAX_CPU_MS is not set
MEMORY_LIMIT_MB = 64  # used when SANDBOX_MAX_MEMORY_MB is not set
#: The CPU limit of the rows that prove something else (memory, quota, heartbeat), so that
#: a small SANDBOX_MAX_CPU_MS does not stop them first: far more than each takes.
HOG_CPU_MS = 30_000
QUOTA_MS = 20  # per 100 ms period: a 500 ms spin should get about 100 ms of CPU
SPIN = "def run(params, context):\n    while True:\n        pass\n"  # burns CPU until stopped
HOG = "def run(params, context):\n    a = []\n    while True:\n        a.append('x' * 100_000)\n"


@dataclass(frozen=True)
class Check:
    """One row of the report."""

    check: str
    proves: str  # the error type the check expects, or "" for a layer
    status: str
    detail: str


def _error_of(sandbox: NodeSandbox, code: str, **execute: Any) -> SandboxError | None:
    try:
        sandbox.execute_sync(code, **execute)
    except SandboxError as error:
        return error
    return None


def _expect(sandbox: NodeSandbox, error_type: str, code: str, **execute: Any) -> tuple[bool, str]:
    error = _error_of(sandbox, code, **execute)
    if error is None:
        return False, "the execution succeeded"
    if error.type != error_type:
        return False, f"ended as {error.type}: {error.message}"
    return True, error.message


@contextlib.contextmanager
def loopback_listener() -> Iterator[tuple[int, list[bool]]]:
    """A TCP listener on 127.0.0.1 that records whether anything connected: (port, record)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    connected: list[bool] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            connected.append(True)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], connected
    finally:
        stop.set()
        thread.join()
        server.close()


class SelfTest:
    """The checks, run in order against one sandbox."""

    def __init__(self, sandbox: NodeSandbox, settings: Settings) -> None:
        self.sandbox = sandbox
        self.settings = settings
        self.degraded = sandbox.isolation.startswith("degraded")
        #: Why cgroups are not used, and what to do about it (when degraded).
        self.fix = sandbox.isolation.removeprefix("degraded: ")
        self._layers: dict[str, Any] | None = None

    def checks(self) -> list[tuple[str, Callable[[], Check]]]:
        return [
            ("cgroups", self.cgroups),
            ("cpu_limit", self.cpu_limit),
            ("cpu quota", self.cpu_quota),
            ("memory_limit", self.memory_limit),
            ("timeout", self.timeout),
            ("heartbeat_timeout", self.heartbeat),
            ("output_limit", self.output),
            ("egress", self.egress),
            ("namespaces", self.namespaces),
            ("filesystem", self.filesystem),
            ("privileges", self.privileges),
            ("seccomp", self.seccomp),
        ]

    def cgroups(self) -> Check:
        if self.degraded:
            detail = f"{self.fix}; limits fall back to rlimits and polling"
            return Check("cgroups", "", DEGRADED, detail)
        hierarchy = self.sandbox._backend.hierarchy
        assert hierarchy is not None  # not degraded
        unit = "worker" if self.sandbox.executor == "worker" else "execution"
        where = ", ".join(sorted({str(path) for path in hierarchy.roots.values()}))
        detail = f"{self.sandbox.isolation} under {where}, one per {unit}"
        if hierarchy.changes:
            detail += "; set up: " + "; ".join(hierarchy.changes)
        return Check("cgroups", "", ENFORCED, detail)

    def cpu_limit(self) -> Check:
        limit = self.settings.sandbox_max_cpu_ms or CPU_LIMIT_MS
        error = _error_of(self.sandbox, SPIN, limits=Limits(max_cpu_ms=limit))
        if error is None or error.type != "cpu_limit" or error.usage is None:
            return Check("cpu limit", "cpu_limit", FAILED, f"a spin was not stopped: {error!r}")
        ratio = error.usage.cpu_ms / limit
        status = ENFORCED if ratio <= 1.5 else FAILED
        detail = (
            f"a spin under {limit} ms was stopped after {error.usage.cpu_ms:.0f} ms ({ratio:.2f}x)"
        )
        return Check("cpu limit", "cpu_limit", status, detail)

    def cpu_quota(self) -> Check:
        if self.degraded:
            return Check("cpu quota", "", DEGRADED, f"needs cgroups: {self.fix}")
        code = (
            "import time\ndef run(params, context):\n    end = time.monotonic() + 0.5\n"
            "    while time.monotonic() < end:\n        pass\n    return 1\n"
        )
        limits = Limits(cpu_quota_ms=QUOTA_MS, max_cpu_ms=HOG_CPU_MS)  # throttled, not killed
        result = self.sandbox.execute_sync(code, limits=limits)
        # CPU against wall time, not against the 500 ms: on a slow host the start-up before
        # the spin is throttled too, and takes its share of the execution's wall time.
        share = result.usage.cpu_ms / result.usage.wall_ms
        status = ENFORCED if share <= 2 * QUOTA_MS / 100 else FAILED
        detail = (
            f"spinning under {QUOTA_MS} ms/100 ms used {result.usage.cpu_ms:.0f} ms of CPU in "
            f"{result.usage.wall_ms:.0f} ms ({share:.0%} of one CPU)"
        )
        return Check("cpu quota", "", status, detail)

    def memory_limit(self) -> Check:
        limit = self.settings.sandbox_max_memory_mb or MEMORY_LIMIT_MB
        # A CPU limit of the deployment's must not stop the hoard before it reaches the
        # memory limit (on a slow host it would): this row proves memory only.
        limits = Limits(max_memory_mb=limit, max_cpu_ms=HOG_CPU_MS)
        error = _error_of(self.sandbox, HOG, limits=limits)
        if error is None or error.type != "memory_limit" or error.usage is None:
            return Check(
                "memory limit", "memory_limit", FAILED, f"a hoard was not stopped: {error!r}"
            )
        peak = (error.usage.peak_memory_bytes or 0) / (1 << 20)
        accurate = 0.5 * limit <= peak <= 1.25 * limit
        status = DEGRADED if self.degraded else ENFORCED if accurate else FAILED
        detail = f"a hoard under {limit} MB was stopped at a peak of {peak:.0f} MB"
        if self.degraded:
            detail += f" (RLIMIT_AS and polling, not a cgroup: {self.fix})"
        return Check("memory limit", "memory_limit", status, detail)

    def timeout(self) -> Check:
        ok, detail = _expect(self.sandbox, "timeout",
                             "import time\ndef run(params, context):\n    time.sleep(30)\n",
                             timeout_ms=300)  # fmt: skip
        return Check("wall time-out", "timeout", ENFORCED if ok else FAILED, detail)

    def heartbeat(self) -> Check:
        code = (
            "import re\ndef run(params, context):\n    return re.match(r'(a+)+$', 'a' * 64 + 'b')\n"
        )
        limits = Limits(heartbeat_interval_ms=50, heartbeat_timeout_ms=300, max_cpu_ms=HOG_CPU_MS)
        ok, detail = _expect(self.sandbox, "heartbeat_timeout", code, limits=limits)
        return Check("heartbeat", "heartbeat_timeout", ENFORCED if ok else FAILED, detail)

    def output(self) -> Check:
        code = "def run(params, context):\n    return 'x' * 5000\n"
        ok, detail = _expect(
            self.sandbox, "output_limit", code, limits=Limits(max_output_bytes=1000)
        )
        return Check("output cap", "output_limit", ENFORCED if ok else FAILED, detail)

    def egress(self) -> Check:
        """The brokered `http` refuses the host's loopback, and nothing reaches it."""
        with loopback_listener() as (port, connected):
            code = f"def run(params, context):\n    http.get('http://127.0.0.1:{port}/')\n"
            ok, detail = _expect(self.sandbox, "policy_violation", code)
            time.sleep(0.05)
        if connected:
            allowed = ",".join(self.settings.egress_allow)
            detail = (
                f"a request reached a listener on 127.0.0.1: CORRAL_EGRESS_ALLOW={allowed} "
                "lets the host's loopback through"
            )
            return Check("egress", "policy_violation", DEGRADED if allowed else FAILED, detail)
        detail = f"nothing reached a listener on 127.0.0.1: {detail}"
        return Check("egress", "policy_violation", ENFORCED if ok else FAILED, detail)

    def _probe(self) -> dict[str, Any]:
        """What a running sandbox child looks like from the host: its namespaces, its
        filesystem view, its credentials and its system-call filter (cached)."""
        if self._layers is None:
            self._layers = _inspect_running_child(self.sandbox)
        return self._layers

    def namespaces(self) -> Check:
        probe = self._probe()
        own = [name for name in NAMESPACES if probe["namespaces"].get(name)]
        missing = [name for name in NAMESPACES if name not in own]
        if missing:
            fix = "run as root" if os.geteuid() != 0 else "allow user namespaces (sysctl "
            fix += "" if os.geteuid() != 0 else "user.max_user_namespaces)"
            detail = f"no {', '.join(missing)} namespace of their own: {fix}"
            return Check("namespaces", "", DEGRADED, detail)
        detail = f"{', '.join(own)} of their own: no network at all, no host process in sight"
        return Check("namespaces", "", ENFORCED, detail)

    def filesystem(self) -> Check:
        probe = self._probe()
        if probe["sees_host_files"]:
            detail = "the child sees the host's files (/etc/passwd): run as root"
            return Check("filesystem", "", DEGRADED, detail)
        detail = f"an empty read-only root holding only {', '.join(probe['root'])}"
        return Check("filesystem", "", ENFORCED, detail)

    def privileges(self) -> Check:
        status = self._probe()["status"]
        uids = set(status.get("Uid", "0").split())
        unprivileged = "0" not in uids and int(status.get("CapEff", "1"), 16) == 0
        if not unprivileged or status.get("NoNewPrivs") != "1":
            detail = f"the child runs as uid {status.get('Uid')}: run as root so corral can drop it"
            return Check("privileges", "", DEGRADED, detail)
        uid = uids.pop()
        detail = f"uid {uid}, no capabilities, no_new_privs, not dumpable"
        if uid == str(os.geteuid()):
            detail += (
                " (the host's own uid: an unprivileged host's user namespace maps only that "
                "one; run as root for a uid of the sandbox's own)"
            )
        return Check("privileges", "", ENFORCED, detail)

    def seccomp(self) -> Check:
        status = self._probe()["status"]
        if status.get("Seccomp") != "2":
            detail = "no system-call filter on the child (libseccomp missing?)"
            return Check("seccomp", "", FAILED, detail)
        detail = (
            f"filter on every thread: {len(DENIED_SYSCALLS)} system calls refused "
            "(sockets, exec, new processes, ptrace, mount, bpf, ...)"
        )
        return Check("seccomp", "", ENFORCED, detail)


#: The namespaces a sandbox child should not share with the host.
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts")
_PROBE_CODE = "import time\ndef run(params, context):\n    time.sleep(0.4)\n"


def _inspect_running_child(sandbox: NodeSandbox) -> dict[str, Any]:
    """Run an execution and look at its process from the host while it sleeps."""
    sandbox.start()
    zygote = sandbox._backend.zygote.pid
    worker = threading.Thread(target=sandbox.execute_sync, args=(_PROBE_CODE,), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for child in psutil.Process(zygote).children(recursive=True) if zygote else []:
                with contextlib.suppress(OSError, psutil.Error):
                    if _status(child.pid).get("NoNewPrivs") == "1":  # locking down
                        status = _locked_down(child.pid)
                        try:
                            return _layers_of(child.pid, status)
                        except PermissionError:
                            # An unprivileged host may not look into its non-dumpable
                            # children: their namespaces and root are their zygote's.
                            return _layers_of(child.ppid(), status)
            time.sleep(0.01)
        raise RuntimeError("no sandbox child could be seen running")
    finally:
        worker.join()


def _locked_down(pid: int) -> dict[str, str]:
    """The status of a child that set no_new_privs, once its filter is on (the last step
    of locking down), or as it is after a moment without one."""
    deadline = time.monotonic() + 0.5
    while (status := _status(pid)).get("Seccomp") != "2" and time.monotonic() < deadline:
        time.sleep(0.005)
    return status


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(
            (key, value.strip()) for key, _, value in (line.partition(":") for line in status)
        )


def _layers_of(pid: int, status: dict[str, str]) -> dict[str, Any]:
    namespaces = {
        name: os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}")
        for name in NAMESPACES
    }
    root = f"/proc/{pid}/root"
    return {
        "namespaces": namespaces,
        "status": status,
        "root": sorted(os.listdir(root)),
        "sees_host_files": os.path.exists(f"{root}/etc/passwd"),
    }


def run_selftest(
    sandbox: NodeSandbox, settings: Settings, progress: Callable[[int, int, str], None]
) -> dict[str, Any]:
    """Run every check; the report as JSON-ready data."""
    selftest = SelfTest(sandbox, settings)
    checks = selftest.checks()
    rows = []
    for index, (name, check) in enumerate(checks, 1):
        progress(index, len(checks), name)
        rows.append(check())
    return {
        "ok": all(row.status != FAILED for row in rows),
        "executor": sandbox.executor,
        "isolation": sandbox.isolation,
        "checks": [asdict(row) for row in rows],
    }
