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

logger = logging.getLogger("corral.sandbox")

V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")
V2_CONTROLLERS = ("memory", "cpu", "pids")
CFS_PERIOD_US = 100_000  # the 100 ms period SANDBOX_CPU_QUOTA_MS is expressed in
PIDS_MAX = 2  # the execution thread and the heartbeat thread: no new processes or threads
_MEMORY_SLACK = 1 << 20  # a reused cgroup's memory limit is rewritten when it moves more
READY_CGROUPS = 4  # made ahead of need: mkdir in four hierarchies is slow on some kernels
_REMOVE_PATIENCE_S = 2.0  # how long a killed task may take to leave its cgroup


class CgroupUnavailable(Exception):
    """cgroups cannot be used on this host; the message says why and what to do."""


@dataclass(frozen=True)
class _Mount:
    mountpoint: Path
    root: str  # the path inside the hierarchy the mount shows
    fstype: str
    options: frozenset[str]


def _mounts() -> list[_Mount]:
    mounts = []
    with open("/proc/self/mountinfo") as lines:
        for line in lines:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
                continue
            options = frozenset(tail[2].split(",")) | frozenset(fields[5].split(","))
            mounts.append(_Mount(Path(fields[4]), fields[3], tail[0], options))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Controller name (or "" for v2) -> this process's cgroup path."""
    own = {}
    with open("/proc/self/cgroup") as lines:
        for line in lines:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                own[name] = path
    return own


def _under(mount: _Mount, hierarchy_path: str) -> Path:
    relative = os.path.relpath(hierarchy_path, mount.root) if mount.root != "/" else hierarchy_path
    return mount.mountpoint / relative.lstrip("./").lstrip("/")


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)  # not open(): this is on every execution's path
    try:
        return os.read(fd, 1 << 16).decode()
    finally:
        os.close(fd)


def _keyed(path: Path, key: str) -> int:
    for line in _read(path).splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


def default_roots(root: str | None) -> tuple[int, dict[str, Path]]:
    """The cgroup version to use and where its per-execution cgroups go (nothing is created).

    `root` is SANDBOX_CGROUP_ROOT: a path inside the hierarchy. Unset, it is
    `corral` below this process's own cgroup, so the parent's limits still hold.
    """
    mounts, own = _mounts(), _own_cgroups()
    v1 = {}
    for controller in V1_CONTROLLERS:
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if mount is not None:
            base = root if root is not None else f"{own.get(controller, '/')}/corral"
            v1[controller] = _under(mount, base)
    if len(v1) == len(V1_CONTROLLERS):
        return 1, v1
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is None or not (unified.mountpoint / "cgroup.controllers").exists():
        missing = ", ".join(c for c in V1_CONTROLLERS if c not in v1)
        raise CgroupUnavailable(
            f"no cgroup v1 mount for {missing} and no cgroup v2 hierarchy: "
            "mount cgroup v2 with the memory, cpu and pids controllers"
        )
    base = root if root is not None else f"{own.get('', '/')}/corral"
    return 2, {"unified": _under(unified, base)}


def _set_v1_memory(memory: Path, value: str) -> None:
    """Set the v1 memory limit, and the memory+swap limit to the same (swap must not extend
    it); memsw may never be below the plain limit, so the order depends on the direction."""
    limit, swap = memory / "memory.limit_in_bytes", memory / "memory.memsw.limit_in_bytes"
    if not swap.exists():  # no swap accounting on this kernel
        _write(limit, value)
        return
    try:
        _write(limit, value)
    except OSError:  # raising the limit past the current memsw: memsw first
        _write(swap, value)
        _write(limit, value)
    else:
        _write(swap, value)


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

    @property
    def label(self) -> str:
        """`cgroup-v1` or `cgroup-v2`."""
        return f"cgroup-v{self.version}"

    @classmethod
    def detect(cls, root: str | None) -> Hierarchy:
        """Find a usable hierarchy; raise CgroupUnavailable saying why there is none."""
        if os.geteuid() != 0:
            raise CgroupUnavailable("not running as root: run as root to get per-execution cgroups")
        version, roots = default_roots(root)
        hierarchy = cls(version, roots)
        hierarchy._prepare_roots()
        return hierarchy

    def _prepare_roots(self) -> None:
        for path in self.roots.values():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CgroupUnavailable(f"cannot create the cgroup root {path}: {exc}") from None
        if self.version == 2:
            root = self.roots["unified"]
            wanted = set(V2_CONTROLLERS)
            available = set(_read(root / "cgroup.controllers").split())
            if not wanted <= available:
                raise CgroupUnavailable(
                    f"the cgroup v2 root {root} lacks the {', '.join(sorted(wanted - available))} "
                    "controller(s): enable them in the parent's cgroup.subtree_control"
                )
            try:
                _write(root / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cannot delegate controllers below {root}: {exc}"
                ) from None

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
        removed = 0
        for name in names:
            owner = name.partition("-")[0]
            if not owner.isdigit():
                continue
            if (not name.startswith(prefix)) if prefix is not None else _alive(int(owner)):
                continue
            ExecutionCgroup(
                self.version, {c: root / name for c, root in self.roots.items()}
            ).remove()
            removed += 1
        return removed

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
        self._applied: tuple[int | None, int | None] = (-1, -1)  # memory, quota last written

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

    def make(self) -> None:
        """Create the directories, limited only in processes (pids.max)."""
        for path in dict.fromkeys(self.dirs.values()):
            path.mkdir()
        _write(self._dir("pids") / "pids.max", str(PIDS_MAX))

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
                _write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
                quota = "-1" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
                _write(cpu / "cpu.cfs_quota_us", quota)
        else:
            if memory_bytes is not None or reused:
                _write(memory / "memory.max", "max" if memory_bytes is None else str(memory_bytes))
                if (memory / "memory.swap.max").exists():
                    _write(memory / "memory.swap.max", "0")
            if limits.cpu_quota_us is not None or reused:
                quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
                _write(cpu / "cpu.max", f"{quota} {CFS_PERIOD_US}")

    def cpu_ns(self) -> int:
        """CPU time (user + sys) used by everything that ran in the cgroup."""
        if self.version == 1:
            return int(_read(self.dirs["cpuacct"] / "cpuacct.usage"))
        return _keyed(self.dirs["unified"] / "cpu.stat", "usage_usec") * 1000

    def memory_bytes(self) -> int:
        """Memory charged to the cgroup now."""
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        current = int(_read(self._dir("memory") / name))
        self._peak_seen = max(self._peak_seen, current)
        return current

    def peak_memory_bytes(self) -> int:
        """The most memory the cgroup held at once."""
        memory = self._dir("memory")
        peak_file = memory / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")
        try:
            return max(int(_read(peak_file)), self._peak_seen)
        except FileNotFoundError:  # memory.peak needs Linux 5.19
            return self._peak_seen

    def oom_kills(self) -> int:
        """How many tasks of this cgroup the kernel's OOM killer has killed."""
        if self.version == 1:
            return _keyed(self.dirs["memory"] / "memory.oom_control", "oom_kill")
        return _keyed(self.dirs["unified"] / "memory.events", "oom_kill")

    def reset_peak(self) -> None:
        """Start the peak over, for the next execution in a reused cgroup (v1; v2 keeps it)."""
        self._peak_seen = 0
        if self.version == 1:
            _write(self.dirs["memory"] / "memory.max_usage_in_bytes", "0")

    def pids(self) -> list[int]:
        """The processes in the cgroup now (every v1 controller holds the same ones)."""
        try:
            return [int(line) for line in _read(self._dir("pids") / "cgroup.procs").split()]
        except OSError as exc:
            # Removed, or being removed by another hand (the reaper and the zygote's janitor
            # may both clean up a closing sandbox's spares): nothing left inside.
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return []
            raise

    def kill_all(self) -> None:
        """SIGKILL everything in the cgroup and wait until it has left."""
        deadline = time.monotonic() + _REMOVE_PATIENCE_S
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                logger.warning("corral: processes %s survived SIGKILL in %r", pids, self)
                return
            time.sleep(0.0005)

    def remove(self) -> None:
        """Kill what is left inside and remove the cgroup's directories."""
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


def _backoff() -> Iterator[float]:
    delay = 0.0002
    while True:
        yield delay
        delay = min(delay * 2, 0.05)
