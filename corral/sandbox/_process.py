"""The process backend, host side: one fresh child per execution, forked by the zygote.

The host creates the execution's cgroup, asks the zygote for a child over
the control socket (passing one end of a fresh socketpair), and supervises
the child over the other end: it receives the child's pidfd first, then
heartbeats and logs, then the result. Wall time, heartbeat silence and CPU
time are enforced here; memory by the cgroup (the kernel's OOM killer). The
child is killed, waited for, and its cgroup removed whatever happens.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
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
from corral.config import CgroupMode, Settings
from corral.sandbox import _protocol as proto
from corral.sandbox._cgroups import CgroupLimits, CgroupUnavailable, ExecutionCgroup, Hierarchy
from corral.sandbox._limits import Limits
from corral.sandbox._redact import Redactor
from corral.sandbox._result import ExecutionResult, LogEntry, Usage

logger = logging.getLogger("corral.sandbox")

SPARES = 2  # children forked ahead of need: enough for back-to-back calls on 2 cores
COMPILED_SOURCES_TRACKED = 256  # sources the zygote was sent to compile (as its cache)
ZYGOTE_START_TIMEOUT_S = 30.0  # importing the policy modules takes ~0.2 s; a loaded CI box more
EXIT_WAIT_S = 2.0  # a SIGKILLed child leaves within milliseconds; past this something is wrong
_CPU_CHECK_FLOOR_S = 0.002  # the closest two CPU reads may be
_FRAME_SLACK = 64 << 10  # JSON framing around the output and log text
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_warned: set[str] = set()
# The zygote imports only the child-side modules: empty stand-ins for the two
# packages keep their __init__ (pydantic, psutil, the host side) out of it, so
# it stays small and every fork copies less.
_ZYGOTE_BOOTSTRAP = """\
import sys, types
for name, path in (("corral", "corral"), ("corral.sandbox", "corral/sandbox")):
    package = types.ModuleType(name)
    package.__path__ = [{parent!r} + "/" + path]
    sys.modules[name] = package
from corral.sandbox._zygote import main
main()
"""


def warn_once(key: str, message: str) -> None:
    """Emit `message` as a RuntimeWarning, once per process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


@dataclass(frozen=True)
class ExecutionRequest:
    """One validated execution: what to run, with what, under which limits."""

    code: str
    entry_point: str
    params: Any
    context: Any
    timeout_ms: int
    limits: Limits  # every field resolved
    secrets: tuple[str, ...] = field(default=())


@dataclass
class _Spare:
    """A child forked ahead of need, waiting for its one request."""

    pid: int
    sock: socket.socket


class _Zygote:
    """The zygote process, its control socket and the spares it has handed over.

    Thread-safe; the zygote is started on first use and restarted when it
    dies. A receiver thread collects the spares the zygote forks; each
    execution takes one and asks for a replacement at once.
    """

    def __init__(self, config: dict[str, Any], spares: int) -> None:
        self._config = {**config, "spares": spares}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._spares: queue.SimpleQueue[_Spare | None] = queue.SimpleQueue()
        self._compiled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.closed = False

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        bootstrap = _ZYGOTE_BOOTSTRAP.format(parent=_PACKAGE_PARENT)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", bootstrap, str(theirs.fileno()),
                 json.dumps(self._config)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={},  # children inherit it: nothing of the host reaches them
                start_new_session=True,  # a terminal's signals are for the host, not the zygote
            )  # fmt: skip
        finally:
            theirs.close()
        self._sock = ours
        self._spares = spares = queue.SimpleQueue()
        self._compiled.clear()
        threading.Thread(
            target=_receive_spares, args=(ours, spares), name="corral-zygote", daemon=True
        ).start()

    def _running(self) -> queue.SimpleQueue[_Spare | None]:
        """The spare queue of a running zygote, starting one if needed."""
        with self._lock:
            if self.closed:
                raise Aborted("the sandbox was closed before the execution started")
            if self._proc is None or self._proc.poll() is not None:
                self._discard()
                self._start()
            return self._spares

    async def _take(self, source: str) -> _Spare:
        for _ in range(3):
            spares = self._running()
            self._request_spare(source)  # before waiting: a cancelled wait still gets replaced
            spare = await _next_spare(spares)
            if spare is not None:
                return spare
            with self._lock:  # the zygote died: reap it so the next round restarts it
                if self._spares is spares and self._proc is not None:
                    self._proc.wait()
        raise SandboxCrash("the sandbox zygote keeps dying (see its messages on stderr)")

    def _request_spare(self, source: str) -> None:
        key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            new = key not in self._compiled
            self._compiled[key] = None
            self._compiled.move_to_end(key)
            if len(self._compiled) > COMPILED_SOURCES_TRACKED:
                self._compiled.popitem(last=False)
            message = {"count": 1, "source": source if new else None}
            if self._sock is not None:
                with contextlib.suppress(OSError):  # a dead zygote is restarted by _take
                    self._sock.sendall(proto.json_frame(proto.SPARES, message))

    async def spawn(self, spec: dict[str, Any], channel: socket.socket) -> int:
        """Give `spec` and `channel` to a spare; its pid."""
        data = proto.json_frame(proto.SPAWN, spec)
        for _ in range(3):
            spare = await self._take(spec["source"])
            try:
                sent = spare.sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(channel.fileno()))]
                )
                if sent < len(data):
                    spare.sock.sendall(data[sent:])
                return spare.pid
            except OSError:
                continue  # that spare died (killed from outside): take the next
            finally:
                spare.sock.close()
        raise SandboxCrash("no spare sandbox process could take the execution")

    def start(self) -> None:
        """Start the zygote and wait until its first spare is ready."""
        spares = self._running()
        try:
            spare = spares.get(timeout=ZYGOTE_START_TIMEOUT_S)
        except queue.Empty:
            raise SandboxCrash("the sandbox zygote did not start") from None
        spares.put(spare)

    def _discard(self) -> None:
        """Drop the current zygote's socket and spares (lock held)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):  # wakes the receiver thread; the zygote sees EOF
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
        while True:
            try:
                spare = self._spares.get_nowait()
            except queue.Empty:
                break
            if spare is not None:
                spare.sock.close()  # the spare reads EOF and exits

    def stop(self) -> None:
        """Close the control socket; the zygote cleans up after its children and exits."""
        with self._lock:
            self.closed = True
            self._discard()
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.warning("corral: the zygote did not exit within 5 s of close(); killing it")
            proc.kill()
            proc.wait()


async def _next_spare(spares: queue.SimpleQueue[_Spare | None]) -> _Spare | None:
    """The next spare, polled without a thread so that a cancelled wait ends at once."""
    deadline = time.monotonic() + ZYGOTE_START_TIMEOUT_S
    delay = 0.0002  # a fork takes about 1.5 ms here: poll finely, then back off
    while True:
        try:
            return spares.get_nowait()
        except queue.Empty:
            if time.monotonic() > deadline:
                raise SandboxCrash(
                    f"the sandbox zygote forked nothing in {ZYGOTE_START_TIMEOUT_S:.0f} s"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)


def _receive_spares(sock: socket.socket, spares: queue.SimpleQueue[_Spare | None]) -> None:
    """Receiver thread: every spare the zygote forks, then None when it is gone."""
    try:
        while True:
            data, fd = proto.recv_fd(sock, proto.PID.size)
            if fd is None or len(data) < proto.PID.size:
                if fd is not None:
                    os.close(fd)
                return
            spares.put(_Spare(proto.PID.unpack(data)[0], socket.socket(fileno=fd)))
    except OSError:
        return
    finally:
        spares.put(None)


class _Reaper:
    """Waits for killed children to be gone and removes their cgroups, off the caller's path.

    The child is already SIGKILLed when it gets here; what is left (its exit,
    the cgroup's removal) costs the caller nothing. `drain()` waits for it.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[int | None, int | None, ExecutionCgroup | None]] = (
            queue.SimpleQueue()
        )
        self._pending = 0
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, pid: int | None, pidfd: int | None, cgroup: ExecutionCgroup | None) -> None:
        """Queue a killed child (and its cgroup) for reaping."""
        with self._idle:
            self._pending += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="corral-reaper", daemon=True)
                self._thread.start()
        self._jobs.put((pid, pidfd, cgroup))

    def _run(self) -> None:
        while True:
            pid, pidfd, cgroup = self._jobs.get()
            try:
                _reap(pid, pidfd, cgroup)
            except Exception:
                logger.exception("corral: cleaning up sandbox pid %s failed", pid)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def drain(self, timeout: float = 10.0) -> bool:
        """Wait until every queued child is gone; False if that took longer than `timeout`."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)


def _reap(pid: int | None, pidfd: int | None, cgroup: ExecutionCgroup | None) -> None:
    if pidfd is not None:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            if not poller.poll(EXIT_WAIT_S * 1000):
                logger.warning(
                    "corral: sandbox pid %s still running %.0f s after SIGKILL", pid, EXIT_WAIT_S
                )
        finally:
            os.close(pidfd)
    if cgroup is not None:
        cgroup.remove()


def _fd_array(fd: int) -> bytes:
    return array.array("i", [fd]).tobytes()


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
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.logs: list[list[str]] = []
        self.log_bytes = 0
        self.child_cpu_ms = 0.0
        self.child_maxrss = 0
        self._last_cpu_poll = 0.0
        self.polled_peak = 0
        self.abort_reason: str | None = None
        self.started = self.last_beat = self.next_cpu_check = 0.0
        self.finished_at: float | None = None

    # -- the child's frames --------------------------------------------------------

    def _frame_cap(self) -> int:
        assert isinstance(self.limits.max_output_bytes, int)
        assert isinstance(self.limits.max_log_bytes, int)
        # Log text may grow six-fold as JSON (\uXXXX escapes).
        return self.limits.max_output_bytes + 6 * self.limits.max_log_bytes + _FRAME_SLACK

    def _take_logs(self, entries: list[list[str]]) -> None:
        for level, message in entries:
            self.log_bytes += len(message.encode("utf-8", "replace")) + len(level)
            self.logs.append([level, message])
        assert isinstance(self.limits.max_log_bytes, int)
        if self.log_bytes > self.limits.max_log_bytes:
            raise _Failure(
                OutputLimitExceeded, f"the logs passed the {self.limits.max_log_bytes} byte cap"
            )

    async def _read(self, sock: socket.socket) -> tuple[int, dict[str, Any]] | None:
        """Frames from the child until its answer; None when it died without one."""
        loop = asyncio.get_running_loop()
        await _readable(loop, sock)
        data, fd = proto.recv_fd(sock, proto.PID.size)
        if fd is not None:
            self.pidfd = fd
            if self.abort_reason is not None:  # closed while the child was starting
                self.abort(self.abort_reason)
        if len(data) < proto.PID.size:
            return None
        (self.pid,) = proto.PID.unpack(data)
        buffer = bytearray()
        cap = self._frame_cap()
        while True:
            chunk = await loop.sock_recv(sock, 1 << 18)
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
                try:
                    message = json.loads(payload)
                except (ValueError, RecursionError) as exc:
                    raise _Failure(
                        SandboxCrash, f"the sandbox sent a malformed frame: {exc}"
                    ) from None
                self._take_logs(message.get("logs", []))
                self.child_cpu_ms = float(message.get("cpu_ms", self.child_cpu_ms))
                self.child_maxrss = int(message.get("maxrss", self.child_maxrss))
                if kind == proto.HEARTBEAT:
                    self.last_beat = time.monotonic()
                elif kind in (proto.RESULT, proto.ERROR):
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
        if isinstance(max_cpu, int) and now >= self.next_cpu_check:
            used = self._cpu_ms()
            if used >= max_cpu:
                raise _Failure(
                    CpuLimitExceeded,
                    f"the execution used {used:.0f} ms of CPU time, over its {max_cpu} ms limit",
                )
            # The child runs on one thread: it cannot burn CPU faster than the wall clock.
            self.next_cpu_check = now + max(_CPU_CHECK_FLOOR_S, (max_cpu - used) / 1000)
        self._poll_memory()
        memory_mb = self.limits.max_memory_mb
        if (
            self.cgroup is None
            and isinstance(memory_mb, int)
            and self.polled_peak > memory_mb << 20
        ):
            raise _Failure(
                MemoryLimitExceeded,
                f"the execution used {self.polled_peak >> 20} MB, over its {memory_mb} MB limit",
            )

    # -- the life of one execution -------------------------------------------------

    def _spec(self) -> dict[str, Any]:
        limits = self.limits
        degraded_memory = self.cgroup is None and isinstance(limits.max_memory_mb, int)
        return {
            "source": self.request.code,
            "cgroup_procs": self.cgroup.procs_files if self.cgroup is not None else [],
            "heartbeat_interval_ms": limits.heartbeat_interval_ms,
            "max_log_bytes": limits.max_log_bytes,
            "max_output_bytes": limits.max_output_bytes,
            # The kernel's own CPU limit, one second past ours: kills even if the host stalls.
            "rlimit_cpu_s": math.ceil(limits.max_cpu_ms / 1000) + 1
            if isinstance(limits.max_cpu_ms, int)
            else None,
            "rlimit_as_bytes": limits.max_memory_mb << 20 if degraded_memory else None,  # type: ignore[operator]
        }

    async def run(self) -> ExecutionResult:
        limits = self.limits
        assert isinstance(limits.heartbeat_interval_ms, int)
        assert isinstance(limits.heartbeat_timeout_ms, int)
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
                self.cgroup = backend.hierarchy.create(
                    CgroupLimits(
                        memory_bytes=limits.max_memory_mb << 20  # type: ignore[operator]
                        if isinstance(limits.max_memory_mb, int)
                        else None,
                        cpu_quota_us=limits.cpu_quota_ms * 1000  # type: ignore[operator]
                        if isinstance(limits.cpu_quota_ms, int)
                        else None,
                    )
                )
            await backend.zygote.spawn(self._spec(), theirs)
            theirs.close()
            self.started = self.last_beat = time.monotonic()
            self.deadline = self.started + self.request.timeout_ms / 1000
            if isinstance(limits.max_cpu_ms, int):
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
            for task in (sender, reader):
                if task is not None and not task.done():
                    task.cancel()
            theirs.close()
            self._finish()
            ours.close()
            if sender is not None and sender.done() and not sender.cancelled():
                sender.exception()  # a child that died early breaks the pipe: seen, not raised
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

    def _usage(self) -> Usage:
        end = self.finished_at or time.monotonic()
        wall = (end - self.started) * 1000 if self.started else 0.0
        return Usage(wall_ms=wall, cpu_ms=self.cpu_ms, peak_memory_bytes=self.peak)

    def _conclude(
        self, outcome: tuple[int, dict[str, Any]] | None, failure: _Failure | None
    ) -> ExecutionResult:
        redact = Redactor(self.request.secrets)
        logs = [LogEntry(level, redact.text(message)) for level, message in self.logs]
        usage = self._usage()
        error: SandboxError | None = None
        if self.abort_reason is not None:
            error = Aborted(self.abort_reason)
        elif failure is not None:
            error = failure.error(failure.message)
        elif outcome is None:
            error = self._death_cause()
        elif outcome[0] == proto.ERROR:
            message = outcome[1]
            error = error_for_type(str(message.get("type")))(str(message.get("message")))
        if error is not None:
            error.message = redact.text(error.message)
            error.args = (error.message,)
            error.logs, error.usage, error.executor = logs, usage, "process"
            raise error
        assert outcome is not None
        return ExecutionResult(
            output=redact.value(outcome[1].get("output")),
            logs=logs,
            executor="process",
            usage=usage,
            isolation=self.backend.isolation,
        )

    def _death_cause(self) -> SandboxError:
        """Why a child died without an answer."""
        max_cpu, memory_mb = self.limits.max_cpu_ms, self.limits.max_memory_mb
        if self.oom:
            return MemoryLimitExceeded(
                f"the execution went over its {memory_mb} MB memory limit and was killed"
            )
        if isinstance(max_cpu, int) and self.cpu_ms >= max_cpu:
            return CpuLimitExceeded(
                f"the execution used {self.cpu_ms:.0f} ms of CPU time, over its {max_cpu} ms limit"
            )
        return SandboxCrash("the sandbox process exited without an answer")

    def abort(self, reason: str) -> None:
        """Kill the child from any thread; the supervisor reports `aborted`."""
        self.abort_reason = reason
        pidfd = self.pidfd
        if pidfd is not None:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)


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
            }
        self.zygote = _Zygote(config, spares=SPARES)
        self.reaper = _Reaper()
        self._live: set[_Execution] = set()
        self._lock = threading.Lock()
        self.closed = False

    def start(self) -> None:
        """Start the zygote now rather than on the first execution."""
        self.zygote.start()

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
