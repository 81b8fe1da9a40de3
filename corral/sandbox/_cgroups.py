"""Per-execution cgroups on cgroup v1 (memory, cpu, cpuacct, pids) or v2 (unified).

Host side. Each execution gets a fresh cgroup (one directory per v1
controller, one directory on v2) that the sandbox child joins before it runs
anything (a process-backend spare joins a blank one while it waits, and the
host writes the limits into it with the request); the host reads CPU time,
peak memory and OOM kills from it and removes it when the execution ends,
killing whatever is still inside.

cgroupspy is not used: it knows neither the pids controller nor cgroup v2,
and it walks the whole tree to open one node, which costs more than the
execution it would account for.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import itertools
import logging
import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from corral.sandbox import _delegation as delegation
from corral.sandbox._cgroupfs import (
    CgroupUnavailable,
    Mount,
    keyed,
    keyed_in,
    mounts,
    own_cgroups,
    read,
    under,
    write,
)
from corral.sandbox._delegation import own_base

logger = logging.getLogger("corral.sandbox")

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000  # the 100 ms period SANDBOX_CPU_QUOTA_MS is expressed in
PIDS_MAX = 2  # the execution thread and the heartbeat thread: no new processes or threads
_MEMORY_SLACK = 1 << 20  # a reused cgroup's memory limit is rewritten when it moves more
READY_CGROUPS = 4  # made ahead of need: mkdir in four hierarchies is slow on some kernels
_REMOVE_PATIENCE_S = 2.0  # how long a killed task may take to leave its cgroup


def default_roots(root: str | None) -> tuple[int, dict[str, Path]]:
    """The cgroup version to use and where its per-execution cgroups go (nothing is created).

    `root` is SANDBOX_CGROUP_ROOT: a path inside the hierarchy. Unset, it is
    `corral` below this process's own cgroup, so the parent's limits still hold.
    """
    found, own = mounts(), own_cgroups()
    v1 = {}
    for controller in V1_CONTROLLERS:
        mount = next((m for m in found if m.fstype == "cgroup" and controller in m.options), None)
        if mount is not None:
            base = root if root is not None else f"{own.get(controller, '/')}/corral"
            v1[controller] = under(mount, base)
    if len(v1) == len(V1_CONTROLLERS):
        return 1, v1
    unified = _unified(found)
    if unified is None:
        missing = ", ".join(c for c in V1_CONTROLLERS if c not in v1)
        raise CgroupUnavailable(
            f"no cgroup v1 mount for {missing} and no cgroup v2 hierarchy: "
            "mount cgroup v2 (mount -t cgroup2 none /sys/fs/cgroup)"
        )
    base = root if root is not None else f"{own_base(own.get('', '/')).rstrip('/')}/corral"
    return 2, {"unified": under(unified, base)}


def _unified(found: list[Mount]) -> Mount | None:
    unified = next((m for m in found if m.fstype == "cgroup2"), None)
    if unified is None or not (unified.mountpoint / "cgroup.controllers").exists():
        return None
    return unified


def _set_v1_memory(memory: Path, value: str) -> None:
    """Set the v1 memory limit, and the memory+swap limit to the same (swap must not extend
    it); memsw may never be below the plain limit, so the order depends on the direction."""
    limit, swap = memory / "memory.limit_in_bytes", memory / "memory.memsw.limit_in_bytes"
    if not swap.exists():  # no swap accounting on this kernel
        write(limit, value)
        return
    try:
        write(limit, value)
    except OSError:  # raising the limit past the current memsw: memsw first
        write(swap, value)
        write(limit, value)
    else:
        write(swap, value)


@dataclass(frozen=True)
class CgroupLimits:
    """What a cgroup enforces: None means no limit."""

    memory_bytes: int | None
    cpu_quota_us: int | None


class Hierarchy:
    """Where this host's per-execution cgroups live, and how to make them."""

    def __init__(self, version: int, roots: dict[str, Path]) -> None:
        self.version = version
        self.roots = roots  # controller -> root directory (v2: {"unified": dir})
        self._names = itertools.count()
        # <host pid>-<this hierarchy>-<n>: unique across the NodeSandboxes of one host,
        # and the pid tells a later host whether the owner is gone.
        self.prefix = f"{os.getpid()}-{secrets.token_hex(3)}-"
        self._ready: collections.deque[ExecutionCgroup] = collections.deque()
        self.changes: list[str] = []  # what setting the hierarchy up changed on the host

    @property
    def label(self) -> str:
        """`cgroup-v1` or `cgroup-v2`."""
        return f"cgroup-v{self.version}"

    @classmethod
    def detect(cls, root: str | None) -> Hierarchy:
        """Find a usable hierarchy and set it up; raise CgroupUnavailable saying why there
        is none and what to do."""
        version, roots = default_roots(root)
        if version == 1 and os.geteuid() != 0:
            raise CgroupUnavailable(
                "not running as root: cgroup v1 needs root for per-execution cgroups"
            )
        hierarchy = cls(version, roots)
        hierarchy._prepare_roots()
        return hierarchy

    def _prepare_roots(self) -> None:
        if self.version == 1:
            for path in self.roots.values():
                try:
                    path.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise CgroupUnavailable(
                        f"cannot create the cgroup root {path}: {exc}"
                    ) from None
            return
        unified = _unified(mounts())
        assert unified is not None  # default_roots found it
        own = under(unified, own_base(own_cgroups().get("", "/")))  # the leaf's parent, if in it
        self.changes += delegation.prepare(
            unified.mountpoint, own, self.roots["unified"], V2_CONTROLLERS
        )

    def _blank(self) -> ExecutionCgroup:
        """A new cgroup with no limits but pids.max."""
        name = f"{self.prefix}{next(self._names)}"
        cgroup = ExecutionCgroup(self.version, {c: root / name for c, root in self.roots.items()})
        try:
            try:
                cgroup.make()
            except FileNotFoundError:  # another corral host removed the idle shared root
                cgroup.remove()
                self._prepare_roots()
                cgroup.make()
        except OSError as exc:
            cgroup.remove()
            raise CgroupUnavailable(f"cannot set up cgroup {name}: {exc}") from exc
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def create(self, limits: CgroupLimits) -> ExecutionCgroup:
        """A fresh cgroup with `limits` for one execution, made ahead if one is ready.

        Raises CgroupUnavailable (with the path and the OS's reason) when the
        cgroupfs refuses.
        """
        try:
            cgroup = self._ready.popleft()
        except IndexError:
            cgroup = self._blank()
        try:
            cgroup.apply(limits)
        except OSError as exc:
            cgroup.remove()
            raise CgroupUnavailable(f"cannot set limits on {cgroup!r}: {exc}") from exc
        return cgroup

    def take_ready(self) -> ExecutionCgroup | None:
        """A blank cgroup made ahead of need, or None when none is ready; never blocks (the
        process backend's spares join one while they wait)."""
        try:
            return self._ready.popleft()
        except IndexError:
            return None

    def replenish(self) -> None:
        """Make blank cgroups ahead of need, off the caller's path (the reaper calls this)."""
        while len(self._ready) < READY_CGROUPS:
            self._ready.append(self._blank())

    def discard_ready(self) -> None:
        """Remove the cgroups made ahead and not used."""
        while self._ready:
            self._ready.popleft().remove()

    def sweep(self, prefix: str | None = None) -> int:
        """Remove the cgroups named with `prefix`, or else those of corral hosts that are gone."""
        names: set[str] = set()
        for root in self.roots.values():
            with contextlib.suppress(FileNotFoundError):
                names.update(entry.name for entry in root.iterdir() if entry.is_dir())
        doomed = []
        for name in names:
            owner = name.partition("-")[0]
            if not owner.isdigit():
                continue
            if (not name.startswith(prefix)) if prefix is not None else _alive(int(owner)):
                continue
            doomed.append(
                ExecutionCgroup(self.version, {c: root / name for c, root in self.roots.items()})
            )
        for cgroup in doomed:  # every kill sent first: the processes exit side by side
            cgroup.signal_all()
        for cgroup in doomed:
            cgroup.remove()
        return len(doomed)

    def remove_roots(self) -> None:
        """Remove the root directories when nothing else uses them."""
        for path in self.roots.values():
            with contextlib.suppress(OSError):  # busy: another corral host still uses it
                path.rmdir()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ExecutionCgroup:
    """The cgroup of one execution: join files, accounting, kill and removal."""

    def __init__(self, version: int, dirs: dict[str, Path]) -> None:
        self.version = version
        self.dirs = dirs
        self._peak_seen = 0
        # v2 on kernels whose memory.peak cannot be reset (before Linux 6.12): the lifetime
        # peak when the execution began, and the process whose resident high-water mark
        # stands in for the peak of an execution that stays below an earlier one.
        self._peak_fd: int | None = None
        self._peak_resettable: bool | None = None  # unknown until the first reset
        self._lifetime_base = 0
        self._hiwater: tuple[int, int, int] | None = None  # pid, usage and RSS at the reset
        self._applied: tuple[int | None, int | None] = (-1, -1)  # memory, quota last written
        self._held: dict[str, int] = {}  # file name -> descriptor, once hold() was called

    def __repr__(self) -> str:
        return f"ExecutionCgroup(v{self.version}, {next(iter(self.dirs.values()))})"

    def open_procs(self) -> list[int]:
        """The cgroup.procs files, opened for writing: a process joins by writing "0" into
        each. The caller closes them (a write is checked against the opener: these let
        the holder move any process here, so only a spare about to join may hold them)."""
        fds: list[int] = []
        try:
            for path in dict.fromkeys(self.dirs.values()):
                fds.append(os.open(path / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def _dir(self, controller: str) -> Path:
        return self.dirs["unified"] if self.version == 2 else self.dirs[controller]

    def hold(self) -> None:
        """Keep open the files every execution reads and writes, for a cgroup that serves
        many (a worker's): opening a cgroup file costs several times reading it, and more
        after an idle spell. `close()` closes them; a file that cannot be held is opened
        on each access as before."""
        if self.version == 1:
            files = (("memory", "memory.usage_in_bytes", os.O_RDONLY),
                     ("memory", "memory.max_usage_in_bytes", os.O_RDWR),
                     ("cpuacct", "cpuacct.usage", os.O_RDONLY))  # fmt: skip
        else:
            files = (("memory", "memory.current", os.O_RDONLY),
                     ("cpu", "cpu.stat", os.O_RDONLY))  # fmt: skip
        for controller, name, flags in files:
            if name not in self._held:
                with contextlib.suppress(OSError):  # then it is opened on each access
                    self._held[name] = os.open(self._dir(controller) / name, flags | os.O_CLOEXEC)

    def _read(self, controller: str, name: str) -> str:
        fd = self._held.get(name)
        if fd is None:
            return read(self._dir(controller) / name)
        return os.pread(fd, 1 << 12, 0).decode()

    def make(self) -> None:
        """Create the directories, limited only in processes (pids.max)."""
        for path in dict.fromkeys(self.dirs.values()):
            path.mkdir()
        write(self._dir("pids") / "pids.max", str(PIDS_MAX))

    def apply(self, limits: CgroupLimits, *, reused: bool = False) -> None:
        """Write the memory limit and the CPU quota into the controllers.

        A fresh cgroup has neither; a `reused` one (a worker's) gets "no limit"
        written where `limits` has none, and its memory limit counts from what it
        holds now.
        """
        memory, cpu = self._dir("memory"), self._dir("cpu")
        memory_bytes = limits.memory_bytes
        if memory_bytes is not None and reused:
            memory_bytes += self.memory_bytes()
        if reused:  # what is written already need not be written again (within 1 MiB)
            last_memory, last_quota = self._applied
            self._applied = (memory_bytes, limits.cpu_quota_us)
            same_memory = memory_bytes == last_memory or (
                memory_bytes is not None
                and last_memory is not None
                and abs(memory_bytes - last_memory) <= _MEMORY_SLACK
            )
            if same_memory and limits.cpu_quota_us == last_quota:
                return
        if self.version == 1:
            if memory_bytes is not None or reused:
                _set_v1_memory(memory, "-1" if memory_bytes is None else str(memory_bytes))
            if limits.cpu_quota_us is not None or reused:
                write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                quota = "-1" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
                write(cpu / "cpu.cfs_quota_us", quota)
        else:
            if memory_bytes is not None or reused:
                write(memory / "memory.max", "max" if memory_bytes is None else str(memory_bytes))
                if (memory / "memory.swap.max").exists():
                    write(memory / "memory.swap.max", "0")
            if limits.cpu_quota_us is not None or reused:
                quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
                write(cpu / "cpu.max", f"{quota} {CFS_PERIOD_US}")

    def cpu_ns(self) -> int:
        """CPU time (user + sys) used by everything that ran in the cgroup."""
        if self.version == 1:
            return int(self._read("cpuacct", "cpuacct.usage"))
        return keyed_in(self._read("cpu", "cpu.stat"), "usage_usec") * 1000

    def memory_bytes(self) -> int:
        """Memory charged to the cgroup now."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        current = int(self._read("memory", name))
        self._peak_seen = max(self._peak_seen, current)
        return current

    def peak_memory_bytes(self) -> int:
        """The most memory the cgroup held at once since the last `reset_peak`."""
        if self.version == 1:
            return max(int(self._read("memory", "memory.max_usage_in_bytes")), self._peak_seen)
        if self._peak_fd is not None:
            return max(int(os.pread(self._peak_fd, 64, 0)), self._peak_seen)
        try:
            lifetime = int(read(self.dirs["unified"] / "memory.peak"))
        except FileNotFoundError:  # memory.peak needs Linux 5.19
            lifetime = 0
        if lifetime > self._lifetime_base:  # this execution set the cgroup's high: exact
            return max(lifetime, self._peak_seen)
        peak = self._peak_seen
        if self._hiwater is not None:
            pid, usage, rss = self._hiwater
            with contextlib.suppress(OSError, ValueError):
                peak = max(peak, usage + _status_kib(pid, "VmHWM") * 1024 - rss)
        return peak

    def oom_kills(self) -> int:
        """How many tasks of this cgroup the kernel's OOM killer has killed."""
        if self.version == 1:
            return keyed(self.dirs["memory"] / "memory.oom_control", "oom_kill")
        return keyed(self.dirs["unified"] / "memory.events", "oom_kill")

    def reset_peak(self, pid: int | None = None) -> None:
        """Start the peak over, for the next execution (in a reused cgroup, that of `pid`).

        v1 resets `memory.max_usage_in_bytes`; v2 resets `memory.peak` through a
        descriptor held open (Linux 6.12). Older v2 kernels keep the lifetime peak:
        an execution that passes it still gets an exact figure, and one that stays
        below gets its process's resident high-water mark, reset here, over the
        cgroup's usage now.
        """
        self._peak_seen = 0
        if self.version == 1:
            fd = self._held.get("memory.max_usage_in_bytes")
            if fd is None:
                write(self.dirs["memory"] / "memory.max_usage_in_bytes", "0")
            else:
                os.pwrite(fd, b"0", 0)
            return
        peak_file = self.dirs["unified"] / "memory.peak"
        if self._peak_resettable is not False:
            try:
                if self._peak_fd is None:
                    self._peak_fd = os.open(peak_file, os.O_RDWR | os.O_CLOEXEC)
                os.write(self._peak_fd, b"reset\n")
                self._peak_resettable = True
                return
            except OSError:  # read-only before Linux 6.12
                if self._peak_fd is not None:  # (the other held files stay open)
                    os.close(self._peak_fd)
                    self._peak_fd = None
                self._peak_resettable = False
        try:
            self._lifetime_base = int(read(peak_file))
        except FileNotFoundError:
            self._lifetime_base = 0
        self._hiwater = None
        if pid is not None:
            with contextlib.suppress(OSError, ValueError):
                write(Path(f"/proc/{pid}/clear_refs"), "5")  # 5: reset the RSS high-water mark
                self._hiwater = (pid, self.memory_bytes(), _status_kib(pid, "VmRSS") * 1024)

    def close(self) -> None:
        """Close the descriptors held open on the cgroup's files."""
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None
        held, self._held = self._held, {}
        for fd in held.values():
            os.close(fd)

    def pids(self) -> list[int]:
        """The processes in the cgroup now (every v1 controller holds the same ones)."""
        try:
            return [int(line) for line in read(self._dir("pids") / "cgroup.procs").split()]
        except OSError as exc:
            # Removed, or being removed by another hand (the reaper and the zygote's janitor
            # may both clean up a closing sandbox's spares): nothing left inside.
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return []
            raise

    def signal_all(self) -> list[int]:
        """SIGKILL everything in the cgroup, without waiting; the pids signalled."""
        if self.version == 2:
            with contextlib.suppress(OSError):  # cgroup.kill needs Linux 5.14
                write(self.dirs["unified"] / "cgroup.kill", "1")  # also what forks meanwhile
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids

    def kill_all(self) -> None:
        """SIGKILL everything in the cgroup and wait until it has left."""
        deadline = time.monotonic() + _REMOVE_PATIENCE_S
        while pids := self.signal_all():
            if time.monotonic() > deadline:
                logger.warning("corral: processes %s survived SIGKILL in %r", pids, self)
                return
            time.sleep(0.0005)

    def remove(self) -> None:
        """Kill what is left inside and remove the cgroup's directories."""
        self.close()
        self.kill_all()
        deadline = time.monotonic() + _REMOVE_PATIENCE_S
        for path in dict.fromkeys(self.dirs.values()):
            for delay in _backoff():
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        logger.warning("corral: could not remove cgroup %s: %s", path, exc)
                        break
                    time.sleep(delay)


def _status_kib(pid: int, key: str) -> int:
    """A `kB` figure of /proc/PID/status (VmRSS, VmHWM)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    raise ValueError(f"no {key} in /proc/{pid}/status")


def _backoff() -> Iterator[float]:
    delay = 0.0002
    while True:
        yield delay
        delay = min(delay * 2, 0.05)
