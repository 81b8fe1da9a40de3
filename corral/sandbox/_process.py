"""The process backend, host side: one fresh child per execution.

For each execution the host takes a cgroup (made ahead of need), gives a
spare child (see `_spawner`) the spec and one end of a fresh socketpair, and
a Supervisor watches the child over the other end. However the execution
ends, the child is SIGKILLed at once and handed to the reaper, which waits
for it and removes its cgroup.
"""

from __future__ import annotations

import math
import os
import socket
import threading
from typing import Any

from corral._exceptions import ConfigError, SandboxCrash
from corral.config import Settings
from corral.sandbox._cgroups import CgroupLimits, CgroupUnavailable, ExecutionCgroup, Hierarchy
from corral.sandbox._reaper import Reaper
from corral.sandbox._result import ExecutionResult
from corral.sandbox._spawner import Spawner
from corral.sandbox._supervisor import ExecutionRequest, Supervisor, detect_cgroups


def zygote_config(settings: Settings, hierarchy: Hierarchy | None) -> dict[str, Any]:
    """What the zygote needs to know: the import policy, and the cgroups to clean after us."""
    config: dict[str, Any] = {
        "allowed_imports": list(settings.allowed_imports),
        "host_pid": os.getpid(),
        "cgroup": None,
    }
    if hierarchy is not None:
        config["cgroup"] = {
            "version": hierarchy.version,
            "roots": {k: str(v) for k, v in hierarchy.roots.items()},
            "prefix": hierarchy.prefix,
        }
    return config


def cgroup_limits(request: ExecutionRequest) -> CgroupLimits:
    """The part of an execution's limits its cgroup enforces."""
    quota_ms = request.limits.cpu_quota_ms
    return CgroupLimits(
        memory_bytes=request.limits.max_memory_bytes,
        cpu_quota_us=None if quota_ms is None else quota_ms * 1000,
    )


class ProcessBackend:
    """Runs every execution in a fresh child forked from the warm zygote."""

    name = "process"

    def __init__(self, settings: Settings) -> None:
        self.hierarchy, self.isolation = detect_cgroups(settings)
        self.zygote = Spawner(zygote_config(settings, self.hierarchy))
        self.reaper = Reaper(after_each=self._make_cgroups_ahead)
        self._live: set[Supervisor] = set()
        self._lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        """Start the zygote (and make cgroups) now rather than on the first execution."""
        self.zygote.start()
        self._make_cgroups_ahead()

    def _make_cgroups_ahead(self) -> None:
        if self.hierarchy is not None and not self.closed:
            self.hierarchy.replenish()

    def _spec(self, request: ExecutionRequest, cgroup: ExecutionCgroup | None) -> dict[str, Any]:
        limits = request.limits
        return {
            "source": request.code,
            "cgroup_procs": cgroup.procs_files if cgroup is not None else [],
            "heartbeat_interval_ms": limits.heartbeat_interval_ms,
            "max_log_bytes": limits.max_log_bytes,
            "max_output_bytes": limits.max_output_bytes,
            # The kernel's own CPU limit, one second past ours: kills even if the host stalls.
            "rlimit_cpu_s": None
            if limits.max_cpu_ms is None
            else math.ceil(limits.max_cpu_ms / 1000) + 1,
            "rlimit_as_bytes": limits.max_memory_bytes if cgroup is None else None,
        }

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one execution in a fresh child."""
        supervisor = Supervisor(request, executor=self.name, isolation=self.isolation)
        with self._lock:
            if self.closed:
                raise ConfigError("this NodeSandbox is closed; create a new one")
            self._live.add(supervisor)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.hierarchy is not None:
                try:
                    supervisor.cgroup = self.hierarchy.create(cgroup_limits(request))
                except CgroupUnavailable as exc:
                    raise SandboxCrash(f"the execution's cgroup could not be made: {exc}") from exc
            spec = self._spec(request, supervisor.cgroup)
            supervisor.expected_pid = await self.zygote.spawn(spec, theirs)
            theirs.close()
            await supervisor.watch(ours, request.frame(with_source=False))
        finally:
            theirs.close()
            supervisor.kill()
            supervisor.read_usage()
            self.reaper.submit(supervisor.pid, supervisor.pidfd, supervisor.cgroup)
            supervisor.pidfd = None
            ours.close()
            if supervisor.cheap_to_compile:
                self.zygote.remember(request.code)
            with self._lock:
                self._live.discard(supervisor)
        return supervisor.conclude()

    def close(self) -> None:
        """Abort executions in flight, stop the zygote and remove the cgroup roots."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            live = list(self._live)
        for supervisor in live:  # each then reports `aborted`
            supervisor.abort("the sandbox was closed while the execution ran")
        self.reaper.drain()
        if self.hierarchy is not None:
            self.hierarchy.discard_ready()
        self.zygote.stop()
        if self.hierarchy is not None:
            self.hierarchy.remove_roots()
