"""The host's watch over one execution in a sandbox process: frames, limits, verdict.

Host side, shared by both backends. The backend gives a Supervisor the
child's channel (and, for a fresh child, the pid the zygote announced);
`watch()` sends the request, reads the child's frames and enforces wall
time, heartbeat silence and CPU time; `read_usage()` and `conclude()` turn
what happened into an ExecutionResult or the right SandboxError.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import signal
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from corral._exceptions import (
    Aborted,
    CpuLimitExceeded,
    ExecutionTimeout,
    HeartbeatTimeout,
    HttpError,
    MemoryLimitExceeded,
    OutputLimitExceeded,
    SandboxCrash,
    SandboxError,
    error_for_type,
)
from corral._lazy import lazy_import
from corral.sandbox import _protocol as proto
from corral.sandbox._cgroups import ExecutionCgroup
from corral.sandbox._egress import HttpBroker
from corral.sandbox._limits import ResolvedLimits
from corral.sandbox._redact import Redactor
from corral.sandbox._result import ExecutionResult, LogEntry, Usage

psutil = lazy_import("psutil")  # the degraded mode's polling only

_CPU_CHECK_FLOOR_S = 0.002  # the closest two CPU reads may be
ZYGOTE_COMPILE_MAX_CPU_MS = 500  # to compile a source the zygote may stall its forks for
ZYGOTE_COMPILE_MAX_BYTES = 256 << 20  # peak memory of a child that compiled it
MAX_ERROR_MESSAGE_CHARS = 4096  # enough to say what went wrong
#: Frames a child may send: heartbeats (at most 40 a second), one request at a time,
#: logs riding on heartbeats. Far more means a flood meant to tie up the host's loop.
MAX_FRAMES, MAX_FRAMES_PER_S = 200, 400
_FRAME_SLACK = 64 << 10  # JSON framing around the output and log text

#: The error types a child may report itself; the host decides every other one.
CHILD_ERROR_TYPES = frozenset(
    {"code_error", "policy_violation", "invalid_input", "output_limit", "memory_limit",
     "http_error"}
)  # fmt: skip


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

    def frame(self, *, with_source: bool) -> bytes:
        """The REQUEST frame; a worker also needs the source and the limits."""
        message: dict[str, Any] = {
            "entry_point": self.entry_point,
            "params": self.params,
            "context": self.context,
        }
        if with_source:
            limits = self.limits
            message["source"] = self.code
            message["limits"] = {
                "timeout_ms": self.timeout_ms,
                "max_cpu_ms": limits.max_cpu_ms,
                "max_memory_bytes": limits.max_memory_bytes,
                "heartbeat_interval_ms": limits.heartbeat_interval_ms,
                "max_log_bytes": limits.max_log_bytes,
                "max_output_bytes": limits.max_output_bytes,
            }
        return proto.json_frame(proto.REQUEST, message)


class Failure(Exception):
    """The supervisor decided the execution must die, and why."""

    def __init__(self, error: type[SandboxError], message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class Supervisor:
    """The host's watch over one execution in a sandbox process.

    It sends the request, reads the child's frames (its pidfd first, for a
    fresh child), enforces wall time, heartbeat silence and CPU time (with
    `grace_s` added for a worker, which stops its own executions first), and
    gives the verdict. Killing the child and reusing or reaping it is the
    backend's business.
    """

    def __init__(
        self,
        request: ExecutionRequest,
        *,
        executor: str,
        isolation: str,
        cgroup: ExecutionCgroup | None = None,
        pid: int | None = None,
        pidfd: int | None = None,
        grace_s: float = 0.0,
        child_errors: frozenset[str] = CHILD_ERROR_TYPES,
        broker: HttpBroker | None = None,
    ) -> None:
        self.request = request
        self.broker = broker  # the `http` capability; None: the code has none
        self._http: asyncio.Future[None] | None = None  # the request being brokered
        self.limits = request.limits
        self.executor = executor
        self.isolation = isolation
        self.cgroup = cgroup
        self.expected_pid: int | None = None  # a fresh child's pid, as the zygote told it
        self.pid = pid  # known once the child proved it with its pidfd
        self.pidfd = pidfd
        self.grace_s = grace_s
        self.child_errors = child_errors
        self.logs: list[tuple[str, str]] = []
        self.log_bytes = 0
        self.child_cpu_ms = 0.0
        self.child_maxrss = 0
        self.compile_cost: tuple[float, int] | None = None
        self.frames = 0
        self.may_hold_surrogates = False
        self.trailing = False
        self._last_cpu_poll = 0.0
        self.polled_peak = 0
        self.cpu_base_ns = 0  # a worker's cgroup has served executions before this one
        self.cpu_base_ms_polled = 0.0
        self.oom_base = 0
        self.memory_base = 0
        self.rss_base = 0
        self.abort_reason: str | None = None
        self.outcome: tuple[int, dict[str, Any]] | None = None
        self.failure: Failure | None = None
        self.started = self.last_beat = self.next_cpu_check = self.deadline = 0.0
        self.next_memory_poll = 0.0
        self.finished_at: float | None = None
        self.cpu_ms, self.peak, self.oom = 0.0, None, False
        self.cgroup_counters = (0, 0)  # CPU ns and OOM kills of the cgroup when it ended

    def begin_accounting(self, cpu_ns: int, oom_kills: int) -> None:
        """Count from the given cgroup counters (a worker's, when its last execution ended)."""
        if self.cgroup is not None:
            self.cpu_base_ns, self.oom_base = cpu_ns, oom_kills
            self.cgroup.reset_peak(self.pid)
            self.memory_base = self.cgroup.memory_bytes()  # what the worker holds already
        elif self.pid is not None:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(self.pid)
                self.rss_base = process.memory_info().rss
                times = process.cpu_times()
                self.cpu_base_ms_polled = (times.user + times.system) * 1000

    @property
    def clean(self) -> bool:
        """Whether the execution ended with a complete answer and nothing was killed."""
        return (
            self.outcome is not None
            and self.failure is None
            and self.abort_reason is None
            and not self.trailing
            and not self.outcome[1].get("leaving")  # a worker that could not stop its code
        )

    # -- the child's frames --------------------------------------------------------

    def _frame_cap(self) -> int:
        # Log text may grow six-fold as JSON (\uXXXX escapes).
        return self.limits.max_output_bytes + 6 * self.limits.max_log_bytes + _FRAME_SLACK

    def _take_logs(self, entries: list[tuple[str, str]]) -> None:
        for level, message in entries:
            # Counted as the child counts them, so both sides agree on the cap.
            self.log_bytes += len(message.encode("utf-8", "replace"))
            self.log_bytes += len(level.encode("utf-8", "replace"))
            self.logs.append((level, message))
        if self.log_bytes > self.limits.max_log_bytes:
            raise Failure(
                OutputLimitExceeded, f"the logs passed the {self.limits.max_log_bytes} byte cap"
            )

    async def _read(self, sock: socket.socket) -> tuple[int, dict[str, Any]] | None:
        """Frames from the child until its answer; None when it died without one."""
        loop = asyncio.get_running_loop()
        if self.expected_pid is not None and self.pidfd is None:
            while not await _readable(loop, sock, self._next_wake()):
                self._check()
            received = pidfd_from(sock, self.expected_pid)
            if received is None:
                return None
            self.pidfd, self.pid = received
            if self.abort_reason is not None:  # closed while the child was starting
                self.abort(self.abort_reason)
        buffer = bytearray()
        cap = self._frame_cap()
        while True:
            try:
                chunk = await self._recv(loop, sock)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            buffer += chunk
            while len(buffer) >= proto.HEADER.size:
                size, kind = proto.HEADER.unpack_from(buffer)
                if size > cap:
                    raise Failure(
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
                except (
                    ValueError,
                    TypeError,
                    AttributeError,
                    ArithmeticError,
                    RecursionError,
                ) as exc:
                    raise Failure(
                        SandboxCrash, f"the sandbox sent a malformed frame: {exc}"
                    ) from None
                self.frames += 1
                if self.frames > MAX_FRAMES + MAX_FRAMES_PER_S * (time.monotonic() - self.started):
                    raise Failure(SandboxCrash, "the sandbox sent frames faster than it may")
                if kind == proto.HEARTBEAT:
                    self.last_beat = time.monotonic()
                elif kind == proto.HTTP:
                    self._broker_request(sock, message)
                elif kind == proto.COMPILED:
                    if self.compile_cost is None:  # only the first: the child sends it
                        # before any connector code runs; a later one could be the code's,
                        # asking the zygote for work.
                        self.compile_cost = (self.child_cpu_ms, self.child_maxrss)
                elif kind in (proto.RESULT, proto.ERROR):
                    # Lone surrogates arrive as \udXXX escapes (so do valid pairs).
                    self.may_hold_surrogates = b"\\ud" in payload
                    self.trailing = bool(buffer)  # nothing may follow an answer
                    return kind, message
                else:
                    raise Failure(SandboxCrash, f"the sandbox sent an unknown frame ({kind})")

    def _broker_request(self, sock: socket.socket, message: dict[str, Any]) -> None:
        """Send the child's HTTP request through the broker, and the reply back, in a task."""
        if self.broker is None:
            raise Failure(SandboxCrash, "the sandbox sent an HTTP request, but has no `http`")
        if self._http is not None and not self._http.done():
            raise Failure(SandboxCrash, "the sandbox sent a second HTTP request before a reply")
        broker = self.broker

        async def broker_and_reply() -> None:
            try:
                reply = await broker.handle(message)
                payload = json.dumps(reply, ensure_ascii=False, separators=(",", ":")).encode()
            except Exception as exc:  # the broker's promise never to raise, kept here too
                reply = {"id": message.get("id"), "error": f"the request failed: {exc!r}"}
                payload = json.dumps(reply).encode()
            frame = proto.frame(proto.HTTP_REPLY, payload)
            await asyncio.get_running_loop().sock_sendall(sock, frame)

        self._http = asyncio.ensure_future(broker_and_reply())

    # -- the limits the host enforces ----------------------------------------------

    def _cpu_ms(self) -> float:
        if self.cgroup is not None:
            return (self.cgroup.cpu_ns() - self.cpu_base_ns) / 1e6
        if self.pid is None:
            return self.child_cpu_ms
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(self.pid).cpu_times()
            self._last_cpu_poll = (times.user + times.system) * 1000 - self.cpu_base_ms_polled
        return max(self.child_cpu_ms, self._last_cpu_poll)

    def _poll_memory(self) -> None:
        if self.cgroup is not None or self.pid is None:
            return
        with contextlib.suppress(psutil.Error):
            rss = psutil.Process(self.pid).memory_info().rss - self.rss_base
            self.polled_peak = max(self.polled_peak, rss)

    def _next_wake(self) -> float:
        """Seconds until the next check is due (0: due now)."""
        wakes = [self.deadline, self.last_beat + self.heartbeat_timeout_s]
        if self.limits.max_cpu_ms is not None:
            wakes.append(self.next_cpu_check)
        if self.cgroup is None and self.limits.max_memory_mb is not None:
            wakes.append(self.next_memory_poll)
        return max(0.0, min(wakes) - time.monotonic())

    async def _recv(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
        """The next bytes from the child (b"" at EOF), checking the limits whenever a check
        is due, also while the child keeps sending."""
        while True:
            if self._next_wake() == 0.0:
                self._check()
            try:
                return sock.recv(1 << 18)
            except (BlockingIOError, InterruptedError):
                pass
            await _readable(loop, sock, self._next_wake())

    def _check(self) -> None:
        """Raise Failure when a limit is broken (a worker gets `grace_s` to stop it first)."""
        now = time.monotonic()
        if now >= self.deadline:
            raise Failure(
                ExecutionTimeout,
                f"the execution did not finish within its {self.request.timeout_ms} ms time-out",
            )
        silence = now - self.last_beat
        if silence >= self.heartbeat_timeout_s:
            raise Failure(
                HeartbeatTimeout,
                f"no heartbeat for {silence * 1000:.0f} ms (time-out "
                f"{self.limits.heartbeat_timeout_ms} ms): the code is stuck, for example in a "
                "C loop that holds the GIL such as a backtracking regex",
            )
        max_cpu = self.limits.max_cpu_ms
        if max_cpu is not None and now >= self.next_cpu_check:
            used = self._cpu_ms()
            kill_at = max_cpu + self.grace_s * 1000
            if used >= kill_at:
                raise Failure(
                    CpuLimitExceeded,
                    f"the execution used {used:.0f} ms of CPU time, over its {max_cpu} ms limit",
                )
            # The child runs on one thread: it cannot burn CPU faster than the wall clock.
            self.next_cpu_check = now + max(_CPU_CHECK_FLOOR_S, (kill_at - used) / 1000)
        if self.cgroup is None:
            self.next_memory_poll = now + self.heartbeat_interval_s
        self._poll_memory()
        limit = self.limits.max_memory_bytes
        if self.cgroup is None and limit is not None and self.polled_peak > limit:
            raise Failure(
                MemoryLimitExceeded,
                f"the execution used {self.polled_peak >> 20} MB, "
                f"over its {self.limits.max_memory_mb} MB limit",
            )

    # -- the life of one execution -------------------------------------------------

    async def watch(self, sock: socket.socket, request_frame: bytes) -> None:
        """Send the request and watch until the answer, the child's death or a broken limit.

        Sets `outcome` (the answer, or None if the child died without one) or
        `failure`. Never closes `sock`: a worker's channel outlives the execution.
        """
        limits = self.limits
        self.heartbeat_interval_s = limits.heartbeat_interval_ms / 1000
        self.heartbeat_timeout_s = limits.heartbeat_timeout_ms / 1000
        self.started = self.last_beat = time.monotonic()
        self.next_memory_poll = self.started + self.heartbeat_interval_s
        self.deadline = self.started + self.request.timeout_ms / 1000 + self.grace_s
        if limits.max_cpu_ms is not None:
            self.next_cpu_check = self.started + limits.max_cpu_ms / 1000
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:  # most requests fit the socket's buffer: then no task is needed to send them
            sent = sock.send(request_frame)
        except BlockingIOError:
            sent = 0
        except OSError:  # the child is already gone: the reader sees it
            sent = len(request_frame)
        sender = None
        if sent < len(request_frame):
            sender = asyncio.ensure_future(loop.sock_sendall(sock, request_frame[sent:]))
        try:  # read here, not in a task of its own: every hop through the loop costs
            self.outcome = await self._read(sock)
        except Failure as exc:
            self.failure = exc
        finally:
            self.finished_at = time.monotonic()
            if self._http is not None and not self._http.done():
                self.trailing = True  # a reply may be cut short: nothing may use the channel
            await _settle(task for task in (sender, self._http) if task is not None)
            if self.broker is not None:
                await self.broker.aclose()

    def kill(self) -> None:
        """SIGKILL the child through its pidfd (a no-op once it is gone)."""
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def read_usage(self) -> None:
        """What the execution used, from its cgroup (or, degraded, from polling and the child)."""
        if self.cgroup is not None:
            try:
                # An OOM kill matters only to a child that died without an answer (one that
                # answered and died after is retired): the others keep their baseline.
                oom_kills = self.cgroup.oom_kills() if self.outcome is None else self.oom_base
                self.cgroup_counters = (self.cgroup.cpu_ns(), oom_kills)
                self.cpu_ms = (self.cgroup_counters[0] - self.cpu_base_ns) / 1e6
                self.peak = max(0, self.cgroup.peak_memory_bytes() - self.memory_base)
                self.oom = self.cgroup_counters[1] > self.oom_base
            except OSError as exc:  # close() raced us: the zygote removed (or is removing) it
                if exc.errno not in (errno.ENOENT, errno.ENODEV):
                    raise
                self.cpu_ms, self.peak, self.oom = self.child_cpu_ms, None, False
        else:
            self.cpu_ms = max(self.child_cpu_ms, self._last_cpu_poll)
            self.peak = max(self.polled_peak, self.child_maxrss) or None
            self.oom = False

    @property
    def cheap_to_compile(self) -> bool:
        """Whether the child reported compiling the source within the zygote's budget.

        The zygote compiles outside every limit: it only gets such sources. The
        report was sent before any connector code ran, so it can be trusted.
        """
        if self.compile_cost is None:
            return False
        cpu_ms, maxrss = self.compile_cost
        return cpu_ms <= ZYGOTE_COMPILE_MAX_CPU_MS and maxrss <= ZYGOTE_COMPILE_MAX_BYTES

    def _usage(self) -> Usage:
        end = self.finished_at or time.monotonic()
        wall = (end - self.started) * 1000 if self.started else 0.0
        requests = self.broker.requests if self.broker is not None else 0
        return Usage(
            wall_ms=wall, cpu_ms=self.cpu_ms, peak_memory_bytes=self.peak, http_requests=requests
        )

    def conclude(self) -> ExecutionResult:
        """The result, or raise the SandboxError the execution ended with.

        Everything that leaves is masked in one pass (each log line's level and message,
        then the output or the error message), so a secret split across them is caught.
        """
        redact = Redactor(self.request.secrets)
        outcome = self.outcome
        error: type[SandboxError] | None = None
        if self.abort_reason is not None:
            error, message = Aborted, self.abort_reason
        elif self.failure is not None:
            error, message = self.failure.error, self.failure.message
        elif outcome is None:
            error, message = self._death_cause()
        elif outcome[0] == proto.ERROR:
            error, message = _reported_error(outcome[1], self.child_errors)
        if error is None:
            assert outcome is not None
            masked = redact.execution(
                self.logs, outcome[1].get("output"), may_hold_surrogates=self.may_hold_surrogates
            )
            output = masked.output
        else:
            masked = redact.execution(self.logs, error=message)
            message = masked.error or ""
        logs = [LogEntry(level, text) for level, text in masked.logs]
        usage = self._usage()
        if error is None:
            return ExecutionResult(
                output=output, logs=logs, executor=self.executor, usage=usage,
                isolation=self.isolation,
            )  # fmt: skip
        details: dict[str, Any] = {"logs": logs, "usage": usage, "executor": self.executor}
        if error is HttpError and outcome is not None:
            status, retry_after = outcome[1].get("status"), outcome[1].get("retry_after")
            details["status"] = status if type(status) is int and 100 <= status < 600 else None
            details["retry_after_s"] = retry_after_seconds(retry_after)
        raise error(_shortened(message), **details)

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
        """Kill the child from any thread; the verdict is `aborted`."""
        self.abort_reason = reason
        self.kill()


def retry_after_seconds(value: Any, now: float | None = None) -> float | None:
    """A Retry-After header (delay-seconds or an HTTP date) as seconds from now, at least 0;
    None when absent or unreadable."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        import email.utils  # only a 429 or 503 with a date in Retry-After needs it

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _shortened(message: str) -> str:
    """An error message cut to MAX_ERROR_MESSAGE_CHARS, after its secrets were masked."""
    if len(message) <= MAX_ERROR_MESSAGE_CHARS:
        return message
    cut = len(message) - MAX_ERROR_MESSAGE_CHARS
    return f"{message[:MAX_ERROR_MESSAGE_CHARS]}… ({cut} more characters)"


async def receive_pidfd(sock: socket.socket, expected_pid: int) -> tuple[int, int | None] | None:
    """A new child's first message: its pidfd and its pid as this host sees it (None once
    it exited), or None if it died before sending one.

    `expected_pid` is the spare's pid as the zygote sees it (in the sandbox's PID
    namespace). Only a pidfd of that spare (or, once it exited, of nobody) is
    accepted; anything else is a Failure.
    """
    await _readable(asyncio.get_running_loop(), sock)
    return pidfd_from(sock, expected_pid)


def pidfd_from(sock: socket.socket, expected_pid: int) -> tuple[int, int | None] | None:
    """`receive_pidfd` once the socket is readable."""
    try:
        data, fd = proto.recv_fd(sock, proto.PID.size)
    except ConnectionResetError:  # died with our request unread
        return None
    if fd is None:
        return None
    pids = _pidfd_targets(fd)
    if len(data) < proto.PID.size or not pids or pids[-1] not in (expected_pid, -1):
        os.close(fd)
        raise Failure(SandboxCrash, "the sandbox sent a pidfd of another process")
    return fd, pids[0] if pids[0] > 0 else None


def _pidfd_targets(fd: int) -> list[int]:
    """The pids of the process a pidfd refers to, from this host's PID namespace down to
    its own ([-1] once it has exited); [] if `fd` is no pidfd."""
    try:
        info = os.open(f"/proc/self/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            text = os.read(info, 4096)
        finally:
            os.close(info)
        for line in text.splitlines():
            if line.startswith(b"NSpid:"):
                return [int(pid) for pid in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _reported_error(
    message: dict[str, Any], allowed: frozenset[str]
) -> tuple[type[SandboxError], str]:
    error_type, text = message.get("type"), str(message.get("message", ""))
    if not isinstance(error_type, str) or error_type not in allowed:
        return SandboxCrash, f"the sandbox reported an error of unknown type {error_type!r}"
    return error_for_type(str(error_type)), text


async def _settle(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel `tasks` and wait until they are done: none may still watch the socket after."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if any(not task.done() for task in tasks):
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # e.g. a child that died early broke the pipe: seen, not raised


async def _readable(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, timeout: float | None = None
) -> bool:
    """Wait until `sock` has data (or EOF) without reading it, at most `timeout` seconds;
    whether it has."""
    ready: asyncio.Future[bool] = loop.create_future()
    fd = sock.fileno()
    loop.add_reader(fd, _settle_ready, ready, True)
    timer = None if timeout is None else loop.call_later(timeout, _settle_ready, ready, False)
    try:
        return await ready
    finally:
        loop.remove_reader(fd)
        if timer is not None:
            timer.cancel()


def _settle_ready(ready: asyncio.Future[bool], value: bool) -> None:
    if not ready.done():
        ready.set_result(value)
