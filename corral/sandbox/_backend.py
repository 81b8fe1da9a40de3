"""What both backends share, host side: cgroups, the zygote, the reaper, and the
executions in flight (so that `close()` can abort them)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

from corral._exceptions import ConfigError
from corral._warnings import warn_once
from corral.config import CgroupMode, Settings
from corral.sandbox._cgroups import CgroupLimits, CgroupUnavailable, ExecutionCgroup, Hierarchy
from corral.sandbox._egress import EgressPolicy, HttpBroker
from corral.sandbox._reaper import Reaper
from corral.sandbox._spawner import Spawner
from corral.sandbox._supervisor import ExecutionRequest, Supervisor

#: Layers corral's own tests may switch off, to prove that the others hold on their own.
UNSAFE_LAYERS = frozenset({"language", "seccomp"})


class Backend:
    """A way to run executions: `execute(request)` and `close()`; the rest is shared here."""

    name: ClassVar[str]

    def __init__(
        self, settings: Settings, *, spares: int, unsafe_layers_off: frozenset[str] = frozenset()
    ) -> None:
        unknown = unsafe_layers_off - UNSAFE_LAYERS
        if unknown:
            raise ConfigError(f"no such layer to switch off: {', '.join(sorted(unknown))}")
        self.egress = EgressPolicy.from_settings(settings)
        self._settings = settings
        self.hierarchy, self.isolation = detect_cgroups(settings)
        config = zygote_config(settings, self.hierarchy)
        config["unsafe_layers_off"] = sorted(unsafe_layers_off)
        self.zygote = Spawner(config, spares=spares)
        self.reaper = Reaper(after_each=self._between_executions)
        self._live: set[Supervisor] = set()
        self._lock = threading.Lock()
        self.closed = False

    async def spawn(
        self, spec: dict[str, Any], channel: socket.socket, cgroup: ExecutionCgroup | None
    ) -> int:
        """Hand `spec` and `channel` to a spare, with its cgroup's join files opened here (the
        spare has no right to any cgroup file); the spare's pid as the zygote sees it."""
        join = cgroup.open_procs() if cgroup is not None else []
        try:
            return await self.zygote.spawn({**spec, "joins": len(join)}, channel, join)
        finally:
            for fd in join:
                os.close(fd)

    def new_broker(self) -> HttpBroker:
        """The `http` capability of one execution: this deployment's egress policy and caps."""
        settings = self._settings
        return HttpBroker(
            self.egress,
            timeout_s=settings.http_timeout_s,
            max_response_bytes=settings.http_max_response_bytes,
            max_requests=settings.http_max_requests,
            max_redirects=settings.http_max_redirects,
        )

    def _between_executions(self) -> None:
        """Work for the reaper thread after each child it reaped: off the caller's path."""

    def _release(self) -> None:
        """Give back what the backend holds besides executions in flight (on close)."""

    @contextlib.contextmanager
    def in_flight(self, supervisor: Supervisor) -> Iterator[None]:
        """Track an execution so that close() can abort it."""
        with self._lock:
            if self.closed:
                raise ConfigError("this NodeSandbox is closed; create a new one")
            self._live.add(supervisor)
        try:
            yield
        finally:
            with self._lock:
                self._live.discard(supervisor)

    def abort(self, reason: str) -> int:
        """Kill every execution in flight; each ends as `aborted` with `reason`, keeping its
        logs and usage so far. The number of executions aborted."""
        with self._lock:
            live = list(self._live)
        for supervisor in live:
            supervisor.abort(reason)
        return len(live)

    def close(self) -> None:
        """Abort executions in flight, stop every sandbox process and remove the cgroups."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            live = list(self._live)
        for supervisor in live:  # each then reports `aborted`
            supervisor.abort("the sandbox was closed while the execution ran")
        self._release()
        self.reaper.drain()
        self.zygote.stop()  # its janitor removes whatever cgroup of ours is left
        self.reaper.drain()  # the cgroups of the spares stop() retired
        if self.hierarchy is not None:
            self.hierarchy.remove_roots()


def cgroup_limits(request: ExecutionRequest) -> CgroupLimits:
    """The part of an execution's limits its cgroup enforces."""
    quota_ms = request.limits.cpu_quota_ms
    return CgroupLimits(
        memory_bytes=request.limits.max_memory_bytes,
        cpu_quota_us=None if quota_ms is None else quota_ms * 1000,
    )


def zygote_config(settings: Settings, hierarchy: Hierarchy | None) -> dict[str, Any]:
    """What the zygote needs to know: the import policy, and the cgroups to clean after us."""
    config: dict[str, Any] = {
        "allowed_imports": list(settings.allowed_imports),
        "host_pid": os.getpid(),
        "sandbox_uid": settings.sandbox_uid,
        "unsafe_layers_off": [],
        "cgroup": None,
    }
    if hierarchy is not None:
        config["cgroup"] = {
            "version": hierarchy.version,
            "roots": {k: str(v) for k, v in hierarchy.roots.items()},
            "prefix": hierarchy.prefix,
        }
    return config


def detect_cgroups(settings: Settings) -> tuple[Hierarchy | None, str]:
    """The hierarchy to use and the isolation label; warns once when degraded."""
    if settings.cgroups is CgroupMode.OFF:
        reason = "cgroups are switched off (CORRAL_CGROUPS=off): unset it to use them"
    else:
        try:
            hierarchy = Hierarchy.detect(settings.sandbox_cgroup_root)
        except CgroupUnavailable as exc:
            if settings.cgroups is CgroupMode.REQUIRED:
                raise ConfigError(f"corral: CORRAL_CGROUPS=required, but {exc}") from None
            reason = str(exc)
        else:
            hierarchy.sweep()  # cgroups of corral hosts that died without cleaning up
            return hierarchy, hierarchy.label
    warn_once(
        "degraded",
        f"sandbox limits degraded to rlimits and polling: {reason}",
    )
    return None, f"degraded: {reason}"
