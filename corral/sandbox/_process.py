"""The process backend, host side: one fresh child per execution, supervised to the end.

For each execution the host creates a cgroup, gives a spare child (see
`_spawner`) the request and one end of a fresh socketpair, and supervises
the child over the other end: it receives the child's pidfd first, then
heartbeats and logs, then the answer. Wall time, heartbeat silence and CPU
time are enforced here; memory by the cgroup (the kernel's OOM killer).
However the execution ends, the child is SIGKILLed at once and handed to
the reaper, which waits for it and removes its cgroup.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from corral._exceptions import (
    Aborted,
    ConfigError,
    CpuLimitExceeded,
    ExecutionTimeout,
    HeartbeatTimeout,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    SandboxCrash,
    SandboxError,
    error_for_type,
)
from corral._warnings import warn_once
from corral.config import CgroupMode, Settings
from corral.sandbox import _protocol as proto
from corral.sandbox._cgroups import CgroupLimits, CgroupUnavailable, ExecutionCgroup, Hierarchy
from corral.sandbox._limits import ResolvedLimits
from corral.sandbox._reaper import Reaper
from corral.sandbox._redact import Redactor
from corral.sandbox._result import ExecutionResult, LogEntry, Usage
from corral.sandbox._spawner import Spawner

_CPU_CHECK_FLOOR_S = 0.002  # the closest two CPU reads may be
ZYGOTE_COMPILE_MAX_CPU_MS = 500  # to compile a source the zygote may stall its forks for
ZYGOTE_COMPILE_MAX_BYTES = 256 << 20  # peak memory of a child that compiled it
MAX_ERROR_MESSAGE_CHARS = 4096  # enough to say what went wrong
_FRAME_SLACK = 64 << 10  # JSON framing around the output and log text


@dataclass(frozen=True)
class ExecutionRequest:
    """One validated execution: what to run, with what, under which limits."""

    code: str
    entry_point: str
    params: Any
    context: Any
    timeout_ms: int
    limits: ResolvedLimits
    secrets: tuple[str, ...] = field(default=())


class _Failure(Exception):
    """Internal: the supervisor decided the execution must die, and why."""

    def __init__(self, error: type[SandboxError], message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class _Execution:
    """Supervision of one child: reading its frames and enforcing the host-side limits."""

    def __init__(self, backend: ProcessBackend, request: ExecutionRequest) -> None:
        self.backend = backend
        self.request = request
        self.limits = request.limits
        self.cgroup: ExecutionCgroup | None = None
        self.expected_pid: int | None = None  # the spare's pid, as the zygote told it
        self.pid: int | None = None  # set once the child proved it with its pidfd
        self.pidfd: int | None = None
        self.logs: list[tuple[str, str]] = []
        self.log_bytes = 0
        self.child_cpu_ms = 0.0
        self.child_maxrss = 0
        self.compile_cost: tuple[float, int] | None = None
        self.may_hold_surrogates = False
        self._last_cpu_poll = 0.0
        self.polled_peak = 0
        self.abort_reason: str | None = None
        self.started = self.last_beat = self.next_cpu_check = 0.0
        self.finished_at: float | None = None

    # -- the child's frames --------------------------------------------------------

    def _frame_cap(self) -> int:
        # Log text may grow six-fold as JSON (\uXXXX escapes).
        return self.limits.max_output_bytes + 6 * self.limits.max_log_bytes + _FRAME_SLACK

    def _take_logs(self, entries: list[tuple[str, str]]) -> None:
        for level, message in entries:
            self.log_bytes += len(message.encode("utf-8", "replace")) + len(level)
            self.logs.append((level, message))
        if self.log_bytes > self.limits.max_log_bytes:
            raise _Failure(
                OutputLimitExceeded, f"the logs passed the {self.limits.max_log_bytes} byte cap"
            )

    async def _read(self, sock: socket.socket) -> tuple[int, dict[str, Any]] | None:
        """Frames from the child until its answer; None when it died without one."""
        loop = asyncio.get_running_loop()
        await _readable(loop, sock)
        try:
            data, fd = proto.recv_fd(sock, proto.PID.size)
        except ConnectionResetError:  # died with our request unread
            return None
        if fd is not None:
            # Only the spare we gave the request (or, once it exited, nobody: -1).
            if _pidfd_target(fd) not in (self.expected_pid, -1):
                os.close(fd)
                raise _Failure(SandboxCrash, "the sandbox sent a pidfd of another process")
            self.pidfd = fd
            if self.abort_reason is not None:  # closed while the child was starting
                self.abort(self.abort_reason)
        if len(data) < proto.PID.size or self.pidfd is None:
            return None
        self.pid = self.expected_pid
        buffer = bytearray()
        cap = self._frame_cap()
        while True:
            try:
                chunk = await loop.sock_recv(sock, 1 << 18)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buffer += chunk
            while len(buffer) >= proto.HEADER.size:
                size, kind = proto.HEADER.unpack_from(buffer)
                if size > cap:
                    raise _Failure(
                        OutputLimitExceeded,
                        f"the sandbox sent {size} bytes at once, over the output and log caps",
                    )
                end = proto.HEADER.size + size
                if len(buffer) < end:
                    break
                payload = bytes(buffer[proto.HEADER.size : end])
                del buffer[:end]
                try:  # the child is untrusted: anything malformed ends it
                    message = json.loads(payload)
                    self._take_logs([(str(lvl), str(msg)) for lvl, msg in message.get("logs", [])])
                    self.child_cpu_ms = float(message.get("cpu_ms", self.child_cpu_ms))
                    self.child_maxrss = int(message.get("maxrss", self.child_maxrss))
                except (ValueError, TypeError, AttributeError, RecursionError) as exc:
                    raise _Failure(
                        SandboxCrash, f"the sandbox sent a malformed frame: {exc}"
                    ) from None
                if kind == proto.HEARTBEAT:
                    self.last_beat = time.monotonic()
                elif kind == proto.COMPILED:
                    self.compile_cost = (self.child_cpu_ms, self.child_maxrss)
                elif kind in (proto.RESULT, proto.ERROR):
                    # Lone surrogates arrive as \udXXX escapes (so do valid pairs).
                    self.may_hold_surrogates = b"\\ud" in payload
                    return kind, message
                else:
                    raise _Failure(SandboxCrash, f"the sandbox sent an unknown frame ({kind})")

    # -- the limits the host enforces ----------------------------------------------

    def _cpu_ms(self) -> float:
        if self.cgroup is not None:
            return self.cgroup.cpu_ns() / 1e6
        if self.pid is None:
            return self.child_cpu_ms
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.pid).cpu_times()
            self._last_cpu_poll = (times.user + times.system) * 1000
        return max(self.child_cpu_ms, self._last_cpu_poll)

    def _poll_memory(self) -> None:
        if self.cgroup is not None or self.pid is None:
            return
        with contextlib.suppress(psutil.Error):
            self.polled_peak = max(self.polled_peak, psutil.Process(self.pid).memory_info().rss)

    def _next_wake(self) -> float:
        wakes = [self.deadline, self.last_beat + self.heartbeat_timeout_s]
        if self.limits.max_cpu_ms is not None:
            wakes.append(self.next_cpu_check)
        if self.cgroup is None and self.limits.max_memory_mb is not None:
            wakes.append(time.monotonic() + self.heartbeat_interval_s)
        return max(0.0, min(wakes) - time.monotonic())

    def _check(self) -> None:
        """Raise _Failure when a limit is broken."""
        now = time.monotonic()
        if now >= self.deadline:
            raise _Failure(
                ExecutionTimeout,
                f"the execution did not finish within its {self.request.timeout_ms} ms time-out",
            )
        silence = now - self.last_beat
        if silence >= self.heartbeat_timeout_s:
            raise _Failure(
                HeartbeatTimeout,
                f"no heartbeat for {silence * 1000:.0f} ms (time-out "
                f"{self.limits.heartbeat_timeout_ms} ms): the code is stuck, for example in a "
                "C loop that holds the GIL such as a backtracking regex",
            )
        max_cpu = self.limits.max_cpu_ms
        if max_cpu is not None and now >= self.next_cpu_check:
            used = self._cpu_ms()
            if used >= max_cpu:
                raise _Failure(
                    CpuLimitExceeded,
                    f"the execution used {used:.0f} ms of CPU time, over its {max_cpu} ms limit",
                )
            # The child runs on one thread: it cannot burn CPU faster than the wall clock.
            self.next_cpu_check = now + max(_CPU_CHECK_FLOOR_S, (max_cpu - used) / 1000)
        self._poll_memory()
        limit = self.limits.max_memory_bytes
        if self.cgroup is None and limit is not None and self.polled_peak > limit:
            raise _Failure(
                MemoryLimitExceeded,
                f"the execution used {self.polled_peak >> 20} MB, "
                f"over its {self.limits.max_memory_mb} MB limit",
            )

    # -- the life of one execution -------------------------------------------------

    def _spec(self) -> dict[str, Any]:
        limits = self.limits
        degraded = self.cgroup is None
        return {
            "source": self.request.code,
            "cgroup_procs": self.cgroup.procs_files if self.cgroup is not None else [],
            "heartbeat_interval_ms": limits.heartbeat_interval_ms,
            "max_log_bytes": limits.max_log_bytes,
            "max_output_bytes": limits.max_output_bytes,
            # The kernel's own CPU limit, one second past ours: kills even if the host stalls.
            "rlimit_cpu_s": math.ceil(limits.max_cpu_ms / 1000) + 1
            if limits.max_cpu_ms is not None
            else None,
            "rlimit_as_bytes": limits.max_memory_bytes if degraded else None,
        }

    async def run(self) -> ExecutionResult:
        limits = self.limits
        self.heartbeat_interval_s = limits.heartbeat_interval_ms / 1000
        self.heartbeat_timeout_s = limits.heartbeat_timeout_ms / 1000
        backend = self.backend
        loop = asyncio.get_running_loop()
        request_frame = proto.json_frame(
            proto.REQUEST,
            {
                "entry_point": self.request.entry_point,
                "params": self.request.params,
                "context": self.request.context,
            },
        )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader: asyncio.Future[Any] | None = None
        sender: asyncio.Future[Any] | None = None
        outcome: tuple[int, dict[str, Any]] | None = None
        failure: _Failure | None = None
        try:
            if backend.hierarchy is not None:
                quota_ms = limits.cpu_quota_ms
                try:
                    self.cgroup = backend.hierarchy.create(
                        CgroupLimits(
                            memory_bytes=limits.max_memory_bytes,
                            cpu_quota_us=None if quota_ms is None else quota_ms * 1000,
                        )
                    )
                except CgroupUnavailable as exc:
                    raise SandboxCrash(f"the execution's cgroup could not be made: {exc}") from exc
            self.expected_pid = await backend.zygote.spawn(self._spec(), theirs)
            theirs.close()
            self.started = self.last_beat = time.monotonic()
            self.deadline = self.started + self.request.timeout_ms / 1000
            if limits.max_cpu_ms is not None:
                self.next_cpu_check = self.started + limits.max_cpu_ms / 1000
            ours.setblocking(False)
            sender = asyncio.ensure_future(loop.sock_sendall(ours, request_frame))
            reader = asyncio.ensure_future(self._read(ours))
            while True:
                await asyncio.wait({reader}, timeout=self._next_wake())
                if reader.done():
                    outcome = reader.result()
                    break
                self._check()
        except _Failure as exc:
            failure = exc
        finally:
            self.finished_at = time.monotonic()
            theirs.close()
            self._finish()
            try:
                await _settle(task for task in (sender, reader) if task is not None)
            finally:
                ours.close()
        return self._conclude(outcome, failure)

    def _finish(self) -> None:
        """Kill the child and read its final usage; the reaper does the rest. Never awaits."""
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        if self.cgroup is not None:
            try:
                self.cpu_ms = self.cgroup.cpu_ns() / 1e6
                self.peak = self.cgroup.peak_memory_bytes()
                self.oom = self.cgroup.oom_killed()
            except FileNotFoundError:  # close() raced us: the zygote removed the cgroup
                self.cpu_ms, self.peak, self.oom = self.child_cpu_ms, None, False
        else:
            self.cpu_ms = max(self.child_cpu_ms, self._last_cpu_poll)
            self.peak = max(self.polled_peak, self.child_maxrss) or None
            self.oom = False
        self.backend.reaper.submit(self.pid, self.pidfd, self.cgroup)
        self.pidfd = None
        # The zygote compiles outside every limit: it only gets a source whose compile a
        # child finished within the budget (reported before any connector code ran).
        if self.compile_cost is not None:
            cpu_ms, maxrss = self.compile_cost
            if cpu_ms <= ZYGOTE_COMPILE_MAX_CPU_MS and maxrss <= ZYGOTE_COMPILE_MAX_BYTES:
                self.backend.zygote.remember(self.request.code)

    def _usage(self) -> Usage:
        end = self.finished_at or time.monotonic()
        wall = (end - self.started) * 1000 if self.started else 0.0
        return Usage(wall_ms=wall, cpu_ms=self.cpu_ms, peak_memory_bytes=self.peak)

    def _conclude(
        self, outcome: tuple[int, dict[str, Any]] | None, failure: _Failure | None
    ) -> ExecutionResult:
        redact = Redactor(self.request.secrets)
        logs = [LogEntry(redact.text(level), redact.text(message)) for level, message in self.logs]
        usage = self._usage()
        if self.abort_reason is not None:
            error, message = Aborted, self.abort_reason
        elif failure is not None:
            error, message = failure.error, failure.message
        elif outcome is None:
            error, message = self._death_cause()
        elif outcome[0] == proto.ERROR:
            error, message = _reported_error(outcome[1])
        else:
            output = outcome[1].get("output")
            return ExecutionResult(
                output=redact.value(output, may_hold_surrogates=self.may_hold_surrogates),
                logs=logs,
                executor="process",
                usage=usage,
                isolation=self.backend.isolation,
            )
        raise error(_shortened(redact.text(message)), logs=logs, usage=usage, executor="process")

    def _death_cause(self) -> tuple[type[SandboxError], str]:
        """Why a child died without an answer."""
        max_cpu, memory_mb = self.limits.max_cpu_ms, self.limits.max_memory_mb
        if self.oom:
            return (
                MemoryLimitExceeded,
                f"the execution went over its {memory_mb} MB memory limit and was killed",
            )
        if max_cpu is not None and self.cpu_ms >= max_cpu:
            return (
                CpuLimitExceeded,
                f"the execution used {self.cpu_ms:.0f} ms of CPU time, over its {max_cpu} ms limit",
            )
        return SandboxCrash, "the sandbox process exited without an answer"

    def abort(self, reason: str) -> None:
        """Kill the child from any thread; the supervisor reports `aborted`."""
        self.abort_reason = reason
        pidfd = self.pidfd
        if pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)


def _shortened(message: str) -> str:
    """An error message cut to MAX_ERROR_MESSAGE_CHARS, after its secrets were masked."""
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    cut = len(message) - MAX_ERROR_MESSAGE_CHARS
    return f"{message[:MAX_ERROR_MESSAGE_CHARS]}… ({cut} more characters)"


def _pidfd_target(fd: int) -> int | None:
    """The pid a pidfd refers to: -1 once that process has exited, None if `fd` is no pidfd."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


#: The error types a child may report itself; the host decides every other one.
_CHILD_ERROR_TYPES = frozenset(
    {"code_error", "policy_violation", "invalid_input", "output_limit", "memory_limit"}
)


def _reported_error(message: dict[str, Any]) -> tuple[type[SandboxError], str]:
    error_type, text = message.get("type"), str(message.get("message", ""))
    if error_type not in _CHILD_ERROR_TYPES:
        return SandboxCrash, f"the sandbox reported an error of unknown type {error_type!r}"
    return error_for_type(str(error_type)), text


async def _settle(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are done: none may still watch a socket we close."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if any(not task.done() for task in tasks):
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # e.g. a child that died early broke the pipe: seen, not raised


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until `sock` has data (or EOF) without reading it."""
    ready = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())


class ProcessBackend:
    """Runs every execution in a fresh child forked from the warm zygote."""

    name = "process"

    def __init__(self, settings: Settings) -> None:
        self.hierarchy, self.isolation = _detect_cgroups(settings)
        config: dict[str, Any] = {
            "allowed_imports": list(settings.allowed_imports),
            "host_pid": os.getpid(),
            "cgroup": None,
        }
        if self.hierarchy is not None:
            config["cgroup"] = {
                "version": self.hierarchy.version,
                "roots": {k: str(v) for k, v in self.hierarchy.roots.items()},
                "prefix": self.hierarchy.prefix,
            }
        self.zygote = Spawner(config)
        self.reaper = Reaper(after_each=self._make_cgroups_ahead)
        self._live: set[_Execution] = set()
        self._lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        """Start the zygote (and make cgroups) now rather than on the first execution."""
        self.zygote.start()
        self._make_cgroups_ahead()

    def _make_cgroups_ahead(self) -> None:
        if self.hierarchy is not None and not self.closed:
            self.hierarchy.replenish()

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one execution in a fresh child."""
        execution = _Execution(self, request)
        with self._lock:
            if self.closed:
                raise ConfigError("this NodeSandbox is closed; create a new one")
            self._live.add(execution)
        try:
            return await execution.run()
        finally:
            with self._lock:
                self._live.discard(execution)

    def close(self) -> None:
        """Abort executions in flight, stop the zygote and remove the cgroup roots."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            live = list(self._live)
        for execution in live:  # each supervisor then reports `aborted`
            execution.abort("the sandbox was closed while the execution ran")
        self.reaper.drain()
        if self.hierarchy is not None:
            self.hierarchy.discard_ready()
        self.zygote.stop()
        if self.hierarchy is not None:
            self.hierarchy.remove_roots()


def _detect_cgroups(settings: Settings) -> tuple[Hierarchy | None, str]:
    """The hierarchy to use and the isolation label; warns once when degraded."""
    if settings.cgroups is CgroupMode.OFF:
        reason = "cgroups are switched off (CORRAL_CGROUPS=off)"
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
