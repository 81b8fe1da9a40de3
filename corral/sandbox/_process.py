"""The process backend, host side: one fresh child per execution.

For each execution the host takes a cgroup (made ahead of need), gives a
spare child (see `_spawner`) the spec and one end of a fresh socketpair, and
a Supervisor watches the child over the other end. However the execution
ends, the child is SIGKILLed at once and handed to the reaper, which waits
for it and removes its cgroup.
"""

from __future__ import annotations

import math
import socket
from typing import Any

from corral._exceptions import SandboxCrash
from corral.config import Settings
from corral.sandbox._backend import Backend, cgroup_limits
from corral.sandbox._cgroups import CgroupUnavailable, ExecutionCgroup
from corral.sandbox._result import ExecutionResult
from corral.sandbox._spawner import SPARES
from corral.sandbox._supervisor import ExecutionRequest, Supervisor


class ProcessBackend(Backend):
    """Runs every execution in a fresh child forked from the warm zygote."""

    name = "process"

    def __init__(
        self, settings: Settings, *, unsafe_layers_off: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(settings, spares=SPARES, unsafe_layers_off=unsafe_layers_off)

    def start(self) -> None:
        """Start the zygote (and make cgroups) now rather than on the first execution."""
        self.zygote.start()
        self._between_executions()

    def _between_executions(self) -> None:
        if self.hierarchy is not None and not self.closed:
            self.hierarchy.replenish()  # cgroups made ahead of need

    def _release(self) -> None:
        if self.hierarchy is not None:
            self.hierarchy.discard_ready()

    def _spec(self, request: ExecutionRequest, cgroup: ExecutionCgroup | None) -> dict[str, Any]:
        limits = request.limits
        return {
            "source": request.code,
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
        supervisor = Supervisor(
            request, executor=self.name, isolation=self.isolation, broker=self.new_broker()
        )
        with self.in_flight(supervisor):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if self.hierarchy is not None:
                    try:
                        supervisor.cgroup = self.hierarchy.create(cgroup_limits(request))
                    except CgroupUnavailable as exc:
                        message = f"the execution's cgroup could not be made: {exc}"
                        raise SandboxCrash(message) from exc
                spec = self._spec(request, supervisor.cgroup)
                supervisor.expected_pid = await self.spawn(spec, theirs, supervisor.cgroup)
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
        return supervisor.conclude()
