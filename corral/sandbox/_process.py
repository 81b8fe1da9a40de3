"""The process backend, host side: one fresh child per execution.

Each spare child (see `_spawner`) joins a blank cgroup of its own, made
ahead of need, while it waits: moving a process into a cgroup can take
milliseconds after an idle spell, and this keeps the move off the caller's
path. For each execution the host takes a spare, writes the execution's
limits into its cgroup and takes the cgroup's counters as the execution's
baselines, gives the spare the spec and one end of a fresh socketpair, and a
Supervisor watches the child over the other end. (A spare that joined
nothing, because no cgroup was ready when it came, joins a fresh cgroup
with its request.) However the execution ends, the child is SIGKILLed at
once and handed to the reaper, which waits for it and removes its cgroup.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import Any

from corral._exceptions import SandboxCrash
from corral.config import Settings
from corral.sandbox._backend import Backend, cgroup_limits
from corral.sandbox._cgroups import CgroupLimits, CgroupUnavailable, ExecutionCgroup
from corral.sandbox._result import ExecutionResult
from corral.sandbox._spawner import SPARES
from corral.sandbox._supervisor import ExecutionRequest, Supervisor

logger = logging.getLogger("corral.sandbox")

SPARE_ATTEMPTS = 3  # spares tried for one execution before it fails (one dead or unfit each)


class ProcessBackend(Backend):
    """Runs every execution in a fresh child forked from the warm zygote."""

    name = "process"

    def __init__(
        self, settings: Settings, *, unsafe_layers_off: frozenset[str] = frozenset()
    ) -> None:
        super().__init__(settings, spares=SPARES, unsafe_layers_off=unsafe_layers_off)
        if self.hierarchy is not None:
            self.zygote.join_ahead(
                self._take_ready, self._discard_cgroup, self._cgroups_for_new_zygote
            )

    def _take_ready(self) -> ExecutionCgroup | None:
        """A blank cgroup for a new spare to join while it waits; the reaper makes its
        replacement, so that as many stay ready as after any execution."""
        assert self.hierarchy is not None
        cgroup = self.hierarchy.take_ready()
        if cgroup is not None and not self.closed:
            self.reaper.submit(None, None, None)  # nothing to reap: only its replenish runs
        return cgroup

    def _cgroups_for_new_zygote(self) -> None:
        """Blank cgroups for a new zygote's first spares; those made for a previous one are
        dropped, as its janitor may have swept them (a zygote restart is rare)."""
        assert self.hierarchy is not None
        try:
            self.hierarchy.discard_ready()
            self.hierarchy.replenish()
        except CgroupUnavailable as exc:  # the spares join nothing ahead: each execution's own
            logger.warning("corral: no cgroups made ahead for the spares: %s", exc)

    def _discard_cgroup(self, cgroup: ExecutionCgroup) -> None:
        """The cgroup of a spare that will run nothing: the reaper kills what is inside and
        removes it."""
        self.reaper.submit(None, None, cgroup)

    def start(self) -> None:
        """Start the zygote (and make cgroups) now rather than on the first execution."""
        self.zygote.start()

    def _between_executions(self) -> None:
        if self.hierarchy is not None and not self.closed:
            self.hierarchy.replenish()  # cgroups made ahead of need

    def _release(self) -> None:
        if self.hierarchy is not None:
            self.hierarchy.discard_ready()

    def _spec(self, request: ExecutionRequest, cgroup: bool) -> dict[str, Any]:
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
            "rlimit_as_bytes": None if cgroup else limits.max_memory_bytes,
        }

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one execution in a fresh child."""
        supervisor = Supervisor(
            request, executor=self.name, isolation=self.isolation, broker=self.new_broker()
        )
        with self.in_flight(supervisor):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                spec = self._spec(request, self.hierarchy is not None)
                if self.hierarchy is None:
                    supervisor.expected_pid = await self.spawn(spec, theirs, None)
                else:
                    supervisor.expected_pid = await self._hand_over(spec, theirs, supervisor)
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

    async def _hand_over(
        self, spec: dict[str, Any], channel: socket.socket, supervisor: Supervisor
    ) -> int:
        """Give the execution to a spare whose cgroup has the execution's limits; its pid
        (as the zygote sees it). The cgroup is `supervisor.cgroup` from the moment the
        spare is taken, so the execution's clean-up removes it whatever happens."""
        assert self.hierarchy is not None
        limits = cgroup_limits(supervisor.request)
        unfit = ""
        for _ in range(SPARE_ATTEMPTS):
            spare = await self.zygote.take()
            supervisor.cgroup, spare.cgroup = spare.cgroup, None
            join: list[int] = []
            try:
                if supervisor.cgroup is None:  # it joined nothing while it waited
                    try:
                        supervisor.cgroup = self.hierarchy.create(limits)
                        join = supervisor.cgroup.open_procs()
                    except (CgroupUnavailable, OSError) as exc:
                        spare.sock.close()
                        message = f"the execution's cgroup could not be made: {exc}"
                        raise SandboxCrash(message) from exc
                elif why := _limit_waiting(supervisor, limits):
                    unfit = why
                    spare.sock.close()  # it exits; its cgroup is removed with what is inside
                    self._discard_cgroup(supervisor.cgroup)
                    supervisor.cgroup = None
                    continue
                try:
                    await self.zygote.give(spare, {**spec, "joins": len(join)}, channel, join)
                except OSError:  # that spare died (killed from outside): take the next
                    self._discard_cgroup(supervisor.cgroup)
                    supervisor.cgroup = None
                    continue
                return spare.pid
            finally:
                for fd in join:
                    os.close(fd)
        if unfit:
            raise SandboxCrash(f"no sandbox process could take the execution: {unfit}")
        raise SandboxCrash("no spare sandbox process could take the execution")


def _limit_waiting(supervisor: Supervisor, limits: CgroupLimits) -> str:
    """Write the execution's limits into the cgroup a spare joined while it waited, and take
    its counters as the execution's baselines; why the spare cannot take it, or "".

    The cgroup is fresh but for the spare's wait: the CPU it used there (its
    move into the cgroup) does not count against the execution, nor does a
    peak before the request. Its memory does count, as a fresh cgroup's would
    from the join on; a limit below what it holds already cannot be applied,
    and the execution never runs without it.
    """
    cgroup = supervisor.cgroup
    assert cgroup is not None
    try:
        held = cgroup.memory_bytes()
        if limits.memory_bytes is not None and held >= limits.memory_bytes:
            return (
                f"a waiting sandbox process holds {held >> 20} MB, at or over the "
                f"execution's {limits.memory_bytes >> 20} MB memory limit"
            )
        cgroup.apply(limits)  # a blank cgroup: only what `limits` sets is written
        cgroup.reset_peak()
        supervisor.cpu_base_ns, supervisor.oom_base = cgroup.cpu_ns(), cgroup.oom_kills()
    except OSError as exc:
        return f"the limits could not be written into {cgroup!r}: {exc}"
    return ""
