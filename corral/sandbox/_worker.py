"""A long-lived sandbox worker, child side: one execution at a time, many in its life.

A spare becomes a worker when its spec says so; it is confined exactly like
a one-shot child. Its main thread is the control thread: it reads each
request, runs it on the execution thread, sends heartbeats while it runs,
and stops it cooperatively when it passes its wall time, CPU time or memory
(an asynchronous exception raised in the execution thread; the verdict
stands whatever the code does with it). What does not stop within GRACE_S —
a loop in C that holds the GIL does not even let this thread run — the host
ends by killing the worker.

Nothing one execution leaves survives it: every execution gets fresh
globals and fresh module views (which hold no mutable containers); after it,
the settings the interpreter keeps outside any namespace are put back (trace
and profile functions, hooks, limits, the collector's, `sys`'s streams), the
finalizers of what it left run, the execution thread's decimal context and the
random module's state are reset, and so is every interpreter-wide structure
allowed code can write (`_leftovers`: caches, enum maps, the codec and ABC
caches, rebound globals), and so are the process's rlimits and interval
timers. What cannot be put back, or was changed again by those finalizers,
retires the worker.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import gc
import json
import operator
import os
import queue
import resource
import signal
import socket
import sys
import time
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

from corral.sandbox import _leftovers
from corral.sandbox import _protocol as proto
from corral.sandbox._child import (
    _PR_SET_PDEATHSIG,
    CHANNEL_FD,
    MAX_REQUEST_BYTES,
    _Channel,
    _execute,
    _Logs,
    _make_log,
    _make_printer,
    _prctl,
    announce,
    answer,
    beat,
    compile_reporting,
    lock_down,
)
from corral.sandbox._http import make_http
from corral.sandbox._policy import SLEEP_CUT, CompileCache, Guards, ImportPolicy

GRACE_S = 0.1  # how long a stopped execution may take to unwind before the worker gives up
SETTLE_S = 1.0  # how long the clean-up after a stopped execution may take
# How long the execution thread may take to come back once it has sent its answer (it only
# returns): generous, so that a slow or loaded host never retires a sound worker for it.
ANSWERED_BACK_S = 30.0
_CPU_CHECK_FLOOR_S = 0.002
# PyThreadState_SetAsyncExc(thread id, exception type), and with NULL to withdraw it.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)
_clear_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


class _Stopped(BaseException):
    """Raised in the execution thread when the control thread stops it."""


_GC_ROUNDS = 3  # collections after an execution: cycles of cycles need more than one


def _clear_caches() -> None:
    """Drop what allowed modules cached for connectors (the keys tell what they asked)."""
    re = sys.modules.get("re")
    if re is not None:
        re.purge()
    parse = sys.modules.get("urllib.parse")
    if parse is not None:
        for cached in ("urlsplit", "_byte_quoter_factory"):
            with contextlib.suppress(AttributeError):
                getattr(parse, cached).cache_clear()
    strptime = sys.modules.get("_strptime")
    if strptime is not None:
        with contextlib.suppress(AttributeError):
            strptime._regex_cache.clear()


_STD = ("stdin", "stdout", "stderr", "displayhook", "excepthook", "unraisablehook",
        "breakpointhook")  # fmt: skip
# The limits that, lowered, would fail later executions (those of core dumps, file size
# and processes are 0 from the start).
_RLIMITS = (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_DATA,
            resource.RLIMIT_NOFILE, resource.RLIMIT_STACK)  # fmt: skip
_ITIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)


def _gc_callbacks() -> list[Any]:
    return list(gc.callbacks)


def _set_gc_callbacks(callbacks: list[Any]) -> None:
    gc.callbacks[:] = callbacks


def _set_std(values: tuple[Any, ...]) -> None:
    for name, value in zip(_STD, values, strict=True):
        setattr(sys, name, value)


def _rlimits() -> tuple[tuple[int, int], ...]:
    return tuple(resource.getrlimit(which) for which in _RLIMITS)


def _set_rlimits(limits: tuple[tuple[int, int], ...]) -> None:
    for which, limit in zip(_RLIMITS, limits, strict=True):
        with contextlib.suppress(ValueError, OSError):  # a lowered hard limit stays lowered
            resource.setrlimit(which, limit)  # (and the rest are still put back)


def _itimers() -> tuple[tuple[float, float], ...]:
    return tuple(signal.getitimer(which) for which in _ITIMERS)


def _set_itimers(timers: tuple[tuple[float, float], ...]) -> None:
    for which, (delay, interval) in zip(_ITIMERS, timers, strict=True):
        signal.setitimer(which, delay, interval)


_Pairs = tuple[tuple[Callable[[], Any], Callable[[Any], object]], ...]

#: What the interpreter keeps outside every module's namespace, where `_leftovers`' census
#: does not look, as (getter, setter): the execution thread's own (trace and profile
#: functions, async generator hooks, coroutine origin tracking), the interpreter's, the
#: collector's callbacks and `sys`'s streams and hooks. The language layer keeps `sys` and
#: `gc` from connector code; without it, each would reach later executions (a profile
#: function sees, and may change, every later return).
_SETTINGS: _Pairs = (
    (sys.gettrace, sys.settrace),
    (sys.getprofile, sys.setprofile),
    (sys.get_asyncgen_hooks, lambda hooks: sys.set_asyncgen_hooks(*hooks)),
    (sys.get_coroutine_origin_tracking_depth, sys.set_coroutine_origin_tracking_depth),
    (sys.getrecursionlimit, sys.setrecursionlimit),
    (sys.getswitchinterval, sys.setswitchinterval),
    (sys.get_int_max_str_digits, sys.set_int_max_str_digits),
    (sys.getdlopenflags, sys.setdlopenflags),
    (gc.isenabled, lambda enabled: gc.enable() if enabled else gc.disable()),
    (gc.get_threshold, lambda threshold: gc.set_threshold(*threshold)),
    (gc.get_debug, gc.set_debug),
    (_gc_callbacks, _set_gc_callbacks),
    (partial(operator.attrgetter(*_STD), sys), _set_std),
)
#: What the OS keeps for the process that a later execution would meet, as (getter,
#: setter): its limits (a lowered one would fail it) and interval timers (whose signal
#: would end the worker in the middle of it). Only code past the language layer reaches
#: them too. The working directory, umask and default socket time-out are not reset: a
#: later execution opens no file and no socket.
_PROCESS: _Pairs = (
    (_rlimits, _set_rlimits),
    (_itimers, _set_itimers),
)
# Their baselines, taken when the worker starts serving (its start sets some of them).
_settings_baseline: tuple[Any, ...] = ()
_process_baseline: tuple[Any, ...] = ()


def _take_baselines() -> None:
    """What the resets put `_SETTINGS` and `_PROCESS` back to: the worker as it starts
    serving."""
    global _settings_baseline, _process_baseline
    _settings_baseline = tuple(get() for get, _ in _SETTINGS)
    _process_baseline = tuple(get() for get, _ in _PROCESS)


def _put_back(pairs: _Pairs, baseline: tuple[Any, ...]) -> bool:
    """Put each of `pairs` (getter, setter) back to its value in `baseline`; True when none
    had changed. What cannot be put back stays changed, and says so again next time."""
    unchanged = True
    for (get, put), value in zip(pairs, baseline, strict=True):
        if get() != value:
            with contextlib.suppress(OSError, ValueError):
                put(value)
            unchanged = False
    return unchanged


def _restore_settings() -> bool:
    """Put every one of `_SETTINGS` back to its baseline; True when none had changed."""
    return _put_back(_SETTINGS, _settings_baseline)


def _restore_process() -> bool:
    """Put every one of `_PROCESS` back to its baseline; False when one cannot be (a
    lowered hard limit). The second look is taken only when the first found a change."""
    return _put_back(_PROCESS, _process_baseline) or _put_back(_PROCESS, _process_baseline)


def _reset_state() -> None:
    """Give the execution thread a fresh decimal context and the random module a new seed."""
    decimal = sys.modules.get("decimal")
    if decimal is not None:
        decimal.setcontext(decimal.Context())
    random = sys.modules.get("random")
    if random is not None:
        random.seed()


def _leave_nothing_behind() -> bool:
    """After an execution: clear the caches, run now the finalizers of what it left in
    cycles (a generator's `finally`, a context's exit), then reset the state they may
    have touched and every interpreter-wide structure of `_leftovers`. While this runs,
    the execution is still watched and stoppable.

    False when the worker must retire: garbage was still being made after the last
    round (finalizers that leave new cycles each time: some of the execution's code
    would run in a later one), or the execution changed what cannot be put back.
    """
    # The settings and caches first: what they held of the execution (a hook, a key of
    # its own class) is collected below with the rest, so its finalizers run before the
    # state is reset. A setting changed again after that was changed by a finalizer.
    _restore_settings()
    if _leftovers.WATCH is None:
        _clear_caches()
    else:
        _leftovers.reset()
    settled = False
    for _ in range(_GC_ROUNDS):
        if not gc.collect():
            settled = True
            break
    _reset_state()
    restored = _restore_settings() and _restore_process()
    return _leftovers.reset() and restored and settled


def _gone() -> None:
    """A job with no execution's guards to watch (the settling after a stop)."""
    return None


def _ran() -> tuple[int, dict[str, Any]]:
    raise RuntimeError("this job has run")


class _Job:
    """One execution handed to the execution thread."""

    def __init__(
        self,
        run: Callable[[], tuple[int, dict[str, Any]]],
        end: Callable[[], None],
        guards: Any = None,
        answer: Callable[[tuple[int, dict[str, Any]]], bool] | None = None,
    ) -> None:
        self._run = run
        self._end = end  # closes the execution's capabilities once it has its result
        # Every function, class, frame and generator of the connector holds its globals,
        # which hold the guards: alive after the clean-up, something of the execution is
        # kept somewhere, and could run in a later one.
        self._guards = weakref.ref(guards) if guards is not None else _gone
        self.result: tuple[int, dict[str, Any]] | None = None
        self.tainted = False  # its leftovers would outlive it: the worker must go
        # Called once the execution ended clean (nothing left behind): this thread answers
        # it itself, sparing the hop back to the control thread, unless a limit is broken
        # (the verdict says which answered).
        self._answer = answer
        self.done = _thread.allocate_lock()
        self.done.acquire()

    #: False while an execution's clean-up has not finished: a stop that landed in it
    #: leaves the clean-up to the start of the next execution.
    clean_slate = True

    def __call__(self) -> None:
        try:
            SLEEP_CUT.clear()
            if not _Job.clean_slate and not _leave_nothing_behind():
                self.tainted = True  # (serve() settles a stopped execution before this)
            _Job.clean_slate = False
            try:
                self.result = self._run()
            finally:
                self._end()
                self._run = self._end = _ran  # the request, params and globals go with them
            # the next execution starts from here
            clean = _leave_nothing_behind() and self._guards() is None
            self.tainted = not clean or self.tainted
            _Job.clean_slate = True
            if not self.tainted and self._answer is not None and self.result is not None:
                self._answer(self.result)
        finally:
            self.done.release()


class _ExecutionThread:
    """The thread connector code runs on, fed one job at a time."""

    def __init__(self, start: Callable[..., None]) -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        ready = _thread.allocate_lock()
        ready.acquire()
        self.ident = 0
        start(self._loop, ready)
        ready.acquire()  # its ident is known from here on

    def _loop(self, ready: Any) -> None:
        self.ident = _thread.get_ident()
        self._clock = time.pthread_getcpuclockid(self.ident)
        ready.release()
        while True:
            try:
                self._jobs.get()()
            except _Stopped:
                continue  # a stop that landed after its execution had ended

    def submit(self, job: _Job) -> None:
        """Run `job` on this thread."""
        self._jobs.put(job)

    def cpu_ns(self) -> int:
        """CPU time this thread has used."""
        return time.clock_gettime_ns(self._clock)

    def stop(self) -> None:
        """Raise _Stopped in this thread at its next bytecode (and cut a sleep short)."""
        _set_async_exc(self.ident, _Stopped)
        SLEEP_CUT.set()

    def unstop(self) -> None:
        """Withdraw a stop that has not landed yet."""
        _clear_async_exc(self.ident, None)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return int(os.read(fd, 256).split()[1]) * _PAGE_SIZE
    finally:
        os.close(fd)


class _Verdict:
    """The control thread's side of one execution: heartbeats and cooperative limits."""

    def __init__(self, limits: dict[str, Any], executor: _ExecutionThread, rss_start: int) -> None:
        self.limits = limits
        self.executor = executor
        self.started = time.monotonic()
        self.deadline = self.started + limits["timeout_ms"] / 1000
        self.cpu_start = executor.cpu_ns()
        self.rss_start = rss_start  # taken while the worker waited for the request
        self.error: dict[str, str] | None = None
        # Who answers: the execution thread claims a clean execution unless a limit was
        # found broken first; the control thread beats and stops only what is unclaimed.
        self.lock = _thread.allocate_lock()
        self.claimed = False

    def claim(self) -> bool:
        """(Execution thread, its execution over and clean.) Take the answer over, unless a
        limit is broken: found by the control thread, or now, since its last check (then
        the control thread answers, with that verdict, as the process backend would)."""
        with self.lock:
            if self.error is None:
                self.error = self._broken(time.monotonic())
            self.claimed = self.error is None
            return self.claimed

    def cpu_ms(self) -> float:
        return (self.executor.cpu_ns() - self.cpu_start) / 1e6

    def _broken(self, now: float) -> dict[str, str] | None:
        limits = self.limits
        if now >= self.deadline:
            message = f"the execution did not finish within its {limits['timeout_ms']} ms time-out"
            return {"type": "timeout", "message": message}
        used = self.cpu_ms()
        if limits["max_cpu_ms"] is not None and used >= limits["max_cpu_ms"]:
            message = (
                f"the execution used {used:.0f} ms of CPU time, "
                f"over its {limits['max_cpu_ms']} ms limit"
            )
            return {"type": "cpu_limit", "message": message}
        memory = limits["max_memory_bytes"]
        if memory is not None and _rss() - self.rss_start > memory:
            message = f"the execution used more than its {memory >> 20} MB memory limit"
            return {"type": "memory_limit", "message": message}
        return None

    def _next_check(self, now: float) -> float:
        limit = self.limits["max_cpu_ms"]
        wake = self.deadline
        if limit is not None:
            wake = min(wake, now + max(_CPU_CHECK_FLOOR_S, (limit - self.cpu_ms()) / 1000))
        return wake

    def watch(self, job: _Job, channel: _Channel, logs: _Logs) -> bool:
        """Wait for `job`, beating and enforcing; True when it would not stop."""
        interval = self.limits["heartbeat_interval_ms"] / 1000
        next_beat = self.started + interval
        give_up = float("inf")
        while True:
            now = time.monotonic()
            wake = min(next_beat, self._next_check(now) if self.error is None else give_up)
            if job.done.acquire(timeout=max(0.0, wake - now)):
                if self.error is not None:
                    self.executor.unstop()
                return False
            with self.lock:
                if not self.claimed:  # (claimed: being answered, nothing may follow)
                    now = time.monotonic()
                    if now >= next_beat:
                        channel.send(proto.json_frame(proto.HEARTBEAT, beat(logs, self.cpu_ms())))
                        next_beat = now + interval
                    if self.error is None:
                        self.error = self._broken(now)
                        if self.error is not None:
                            self.executor.stop()
                            give_up = now + GRACE_S
                    elif now >= give_up:
                        return True
                    else:
                        self.executor.stop()  # again: the code may have caught the first one
            if self.claimed:  # answered: True if its thread does not come back from it
                return not job.done.acquire(timeout=ANSWERED_BACK_S)


def _nothing() -> tuple[int, dict[str, Any]]:
    return proto.RESULT, {}


def _settled(executor: _ExecutionThread) -> bool:
    """After an execution a stop cut short (its clean-up did not run): run the clean-up
    now, before the answer; False when the worker must retire (it found what cannot be
    put back, or did not finish within SETTLE_S)."""
    if _Job.clean_slate:
        return True
    cleanup = _Job(_nothing, lambda: None)
    executor.submit(cleanup)
    return cleanup.done.acquire(timeout=SETTLE_S) and not cleanup.tainted


def _answer_clean(
    channel: _Channel, logs: _Logs, verdict: _Verdict, result: tuple[int, dict[str, Any]]
) -> bool:
    """(Execution thread.) Answer an execution that ended clean, unless the control thread
    found a limit broken first; whether it was answered."""
    if not verdict.claim():
        return False
    kind, message = result
    try:
        answer(channel, kind, message, logs, cpu_ms=verdict.cpu_ms())
    except BaseException:  # claimed, so nothing else may answer it: the worker goes
        os._exit(1)
    return True


def serve(
    spec: dict[str, Any],
    cache: CompileCache,
    imports: ImportPolicy,
    start_thread: Callable[..., None],
) -> None:
    """The worker's life: announce the pidfd, then answer requests until the host hangs up.

    A worker outlives its zygote (the host may restart that one): it leaves when
    its channel closes, and its cgroup holds it to its limits meanwhile.
    """
    _prctl(_PR_SET_PDEATHSIG, 0, 0, 0, 0)
    sock = socket.socket(fileno=CHANNEL_FD)
    announce(sock)
    channel = _Channel(sock)
    executor = _ExecutionThread(start_thread)
    lock_down(spec)
    _reset_state()
    _take_baselines()
    if _leftovers.WATCH is not None:
        _leftovers.WATCH.baseline()  # what every execution of this worker starts from
    gc.freeze()  # the worker's own objects: the collection after each execution skips them
    rss = _rss()  # the memory limit counts from here: the request is the execution's
    while (frame := proto.read_frame(sock, MAX_REQUEST_BYTES)) is not None:
        if frame[0] != proto.REQUEST:
            continue  # an HTTP reply to an execution that was stopped while it waited
        request = json.loads(frame[1])
        limits = request["limits"]
        logs = _Logs(limits["max_log_bytes"])
        compiled = compile_reporting(cache, request["source"], channel)
        guards = Guards(imports, _make_log(logs), _make_printer(logs))
        http, close_http = make_http(channel.send, sock, guards.violation)

        def end(logs: _Logs = logs, close_http: Callable[[], None] = close_http) -> None:
            logs.ended = True
            close_http()

        verdict = _Verdict(limits, executor, rss)
        job = _Job(
            partial(_execute, compiled, request, guards, logs, limits["max_output_bytes"], http),
            end,
            guards,
            partial(_answer_clean, channel, logs, verdict),
        )
        # Only the job holds the execution's objects now: when it drops them, whatever the
        # code hung on them (a generator in the params) is finalized within the execution.
        del request, compiled, guards, http, close_http, end, frame
        executor.submit(job)
        stuck = verdict.watch(job, channel, logs)
        if verdict.claimed:  # answered on the execution thread
            if stuck:  # which did not come back from it: the worker goes
                os._exit(0)
            rss = _rss()  # the next execution's baseline, read off its path
            continue
        if verdict.error is not None:
            kind, message = proto.ERROR, dict(verdict.error)
        else:
            assert job.result is not None
            kind, message = job.result
        leaving = stuck or job.tainted or not _settled(executor)
        if leaving:
            message["leaving"] = True  # the host must not hand this worker another execution
        answer(channel, kind, message, logs, cpu_ms=verdict.cpu_ms())
        if leaving:  # the host sees the answer, then the worker gone, and replaces it
            os._exit(0)
        rss = _rss()  # the next execution's baseline, read off its path
