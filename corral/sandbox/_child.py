"""What runs inside a sandbox child, from the fork in the zygote to `_exit`.

Child side: imports only the standard library and the other child-side
modules (`_policy`, `_protocol`, the import table in `corral.config`). The
order matters: a spare confines itself (session, death signal, descriptors,
environment, its uid, no_new_privs and the system-call filter of
`_confine`) while it waits, and joins the cgroup it will run in through
files the host opened (while it waits, or with its request); with its
request it hands the host a pidfd, starts the heartbeat, sets rlimits, and
only then compiles and runs connector code.
"""

from __future__ import annotations

import _thread
import contextlib
import ctypes
import json
import os
import resource
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from typing import Any, NoReturn

from corral.sandbox import _protocol as proto
from corral.sandbox._confine import WORKDIR, Confinement
from corral.sandbox._http import Http, HTTPError, make_http
from corral.sandbox._policy import CompileCache, Guards, ImportPolicy, PolicyError

CHANNEL_FD = 3  # the execution's channel to the host, once descriptors are tidied
SPARE_FD = 4  # a waiting spare's socket to the zygote
PIDFD_FD = 5  # the spare's own pidfd, until it hands it to the host
MAX_JOINS = 4  # cgroup.procs files of one cgroup: one per v1 hierarchy (or the v2 one)
MAX_OPEN_FILES = 8  # stdio, the channel and a little slack: the code opens nothing
MAX_REQUEST_BYTES = 64 << 20  # params and context arrive in one frame
FILENAME = "<connector>"
WARM_SOURCE = (  # a trivial connector every spare runs once while it waits
    "import json\ndef run(params, context):\n    log('warm')\n"
    "    return json.loads(json.dumps(params))\n"
)
MAX_MESSAGE_CHARS = 64 << 10  # of an error message sent to the host (which shortens it)
MAX_OUTPUT_DEPTH = 256  # nesting of the output: far past any record, well within the host's
_REAL_TRACEBACK = BaseException.__dict__["__traceback__"]  # a class may shadow the attribute

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved in the zygote: the child never loads a library


class _LogOverflow(BaseException):
    """Raised in the code when its logs pass the cap; `except Exception` does not catch it."""


class _Channel:
    """The child's end of the execution channel; frames from two threads never interleave."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)


class _Logs:
    """Log lines waiting to reach the host, with the cap on their total size."""

    def __init__(self, max_bytes: int) -> None:
        self.pending: list[list[str]] = []
        self.lock = threading.Lock()
        self.total = 0
        self.max_bytes = max_bytes
        self.overflowed = False
        self.partial = ""
        self.ended = False  # the execution answered: its leftovers may log no more

    def _charge(self, size: int) -> None:
        if self.ended:
            raise RuntimeError("this execution has ended: its logs are closed")
        if self.overflowed:
            raise _LogOverflow
        self.total += size
        if self.total > self.max_bytes:
            self.overflowed = True
            raise _LogOverflow

    def add(self, level: str, message: str) -> None:
        """A log line; past the cap, _LogOverflow."""
        self._charge(
            len(message.encode("utf-8", "replace")) + len(level.encode("utf-8", "replace"))
        )
        with self.lock:
            self.pending.append([level, message])

    def write(self, text: str) -> None:
        """Printed text, charged as it is written: every completed line becomes an info entry."""
        self._charge(len(text.encode("utf-8", "replace")))
        if "\n" not in text:
            self.partial += text
            return
        first, *middle, self.partial = (self.partial + text).split("\n")
        with self.lock:
            self.pending.extend(["info", line] for line in (first, *middle))

    def flush(self) -> None:
        """Log the last printed line even if it never got its newline."""
        if self.partial:
            with self.lock:
                self.pending.append(["info", self.partial])
            self.partial = ""

    def take(self) -> list[list[str]]:
        with self.lock:
            taken, self.pending = self.pending, []
        return taken


def _make_log(logs: _Logs) -> Any:
    def log(*parts: Any, level: str = "info") -> None:
        """Record a log line: the parts joined by spaces, as print() would."""
        # Plain str copies: a str subclass of the connector's would carry its methods into
        # code that runs after the execution (the heartbeat, the answer, the next one).
        logs.add(str.__str__(str(level)), " ".join([str(part) for part in parts]))

    return log


def _make_printer(logs: _Logs) -> type:
    class Printer:
        """RestrictedPython's `_print_`: each printed line becomes an info log entry."""

        def __init__(self, _getattr_: Any = None) -> None:
            self._getattr_ = _getattr_
            self.txt: list[str] = []

        def write(self, text: str) -> None:
            text = str.__str__(text)  # a plain copy: a str subclass would run its methods
            self.txt.append(text)  # here and in what reads the logs after the execution
            logs.write(text)

        def __call__(self) -> str:
            return "".join(self.txt)

        def _call_print(self, *objects: Any, **kwargs: Any) -> None:
            if kwargs.get("file") is None:
                kwargs["file"] = self
            else:
                self._getattr_(kwargs["file"], "write")
            print(*objects, **kwargs)

    return Printer


def _maxrss() -> int:
    """The most resident memory this process had, in bytes (shared pages included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Standby:
    """A thread started while the spare waits (a thread start is slow here), for whatever
    the request needs: a one-shot child's heartbeat, or a worker's execution thread.

    It moves into the execution's cgroup with the process.
    """

    def __init__(self) -> None:
        self._go = _thread.allocate_lock()
        self._go.acquire()
        self._work: tuple[Callable[..., None], tuple[Any, ...]] | None = None
        # _thread rather than threading: Thread.start() waits for the thread to run first.
        _thread.start_new_thread(self._run, ())

    def run(self, target: Callable[..., None], *args: Any) -> None:
        """Have the thread run `target(*args)`."""
        self._work = (target, args)
        self._go.release()

    def _run(self) -> None:
        self._go.acquire()
        assert self._work is not None
        target, args = self._work
        target(*args)


def _heartbeat(channel: _Channel, logs: _Logs, interval_s: float, stop: Any) -> None:
    """Prove the child alive every interval and carry pending logs, until `stop` is released.

    A loop in C that holds the GIL (a backtracking regex) stops this thread
    too: the silence is what lets the host catch it.
    """
    while not stop.acquire(timeout=interval_s):
        try:
            channel.send(proto.json_frame(proto.HEARTBEAT, beat(logs)))
        except OSError:
            return


def beat(logs: _Logs, cpu_ms: float | None = None) -> dict[str, Any]:
    """A heartbeat: the logs still pending and the CPU (the process's, unless given) and
    peak memory used so far."""
    cpu = time.process_time() * 1000 if cpu_ms is None else cpu_ms
    return {"logs": logs.take(), "cpu_ms": cpu, "maxrss": _maxrss()}


def compile_reporting(cache: CompileCache, source: str, channel: _Channel) -> Any:
    """`source` compiled; when it was not compiled already, tell the host what that cost.

    Sent before any connector code runs, so the host may trust it.
    """
    misses, started = cache.misses, time.process_time()
    compiled = cache.get(source)
    if cache.misses != misses:
        cost = {"cpu_ms": (time.process_time() - started) * 1000, "maxrss": _maxrss()}
        channel.send(proto.json_frame(proto.COMPILED, cost))
    return compiled


def _prepare(zygote_pid: int, spare_fd: int) -> None:
    """Confinement that needs no request: done while the spare waits for one."""
    os.setsid()
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != zygote_pid:
        os._exit(70)  # the zygote is already gone: nobody would reap or watch us
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.dup2(spare_fd, SPARE_FD)
    os.closerange(PIDFD_FD, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    with contextlib.suppress(OSError):  # free fd 3 for the execution's channel
        os.close(CHANNEL_FD)
    os.environ.clear()
    os.chdir(WORKDIR if os.path.isdir(WORKDIR) else "/")  # (no filesystem view: not root)
    os.umask(0o077)


def _enter_cgroups(joins: list[int]) -> None:
    """Enter the execution's cgroups through the files the host opened, and close them
    (they could move any process)."""
    try:
        for fd in joins:
            os.write(fd, b"0")
    finally:
        for fd in joins:
            os.close(fd)


def _await_spawn(control: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The SPAWN frame's spec and descriptors; a JOIN frame before it is carried out first.

    The host sends a JOIN while the spare waits so that the move into a cgroup
    (slow after an idle spell) is off the request's path. Anything else ends
    the spare: it has run no connector code, but it trusts nothing unexpected.
    """
    joined = False
    while True:
        header, fds = proto.recv_fds(control, proto.HEADER.size, 1 + MAX_JOINS)
        if not header or not fds:
            for fd in fds:
                os.close(fd)
            os._exit(0)  # the zygote retired this spare
        header += proto.recv_exactly(control, proto.HEADER.size - len(header))
        size, kind = proto.HEADER.unpack(header)
        message = json.loads(proto.recv_exactly(control, size))
        if kind == proto.SPAWN:
            return message, fds
        if kind != proto.JOIN or joined or len(fds) != message["joins"]:
            raise OSError(f"unexpected frame {kind} (or its cgroup files) from the host")
        _enter_cgroups(fds)
        joined = True


def _place_channel(channel_fd: int) -> None:
    """Put the execution's channel at CHANNEL_FD and close the spare's socket."""
    if channel_fd != CHANNEL_FD:
        os.dup2(channel_fd, CHANNEL_FD)
        os.close(channel_fd)
    os.close(SPARE_FD)


def lock_down(spec: dict[str, Any]) -> None:
    """The last step before connector code: rlimits (backstops that hold without cgroups,
    and the only limits in degraded mode). The uid drop, no_new_privs and the system-call
    filter came while the spare waited."""
    limits = {
        resource.RLIMIT_CORE: 0,
        resource.RLIMIT_FSIZE: 0,
        resource.RLIMIT_NOFILE: MAX_OPEN_FILES,
        resource.RLIMIT_NPROC: 0,  # no new processes or threads, once the uid is dropped
    }
    if spec.get("rlimit_cpu_s"):
        limits[resource.RLIMIT_CPU] = spec["rlimit_cpu_s"]
    if spec.get("rlimit_as_bytes"):
        with open("/proc/self/statm") as statm:
            mapped = int(statm.read().split()[0]) * resource.getpagesize()
        limits[resource.RLIMIT_AS] = mapped + spec["rlimit_as_bytes"]
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


def announce(sock: socket.socket) -> None:
    """Hand the host this process's pidfd (opened while it waited) on its channel."""
    proto.send_fd(sock, proto.PID.pack(os.getpid()), PIDFD_FD)
    os.close(PIDFD_FD)


def _where(exc: BaseException) -> str:
    """` (line N, in fn)` for the innermost frame of connector code, or ``.

    Reads the exception's real traceback (the connector may have set a fake
    `__traceback__` on its own class) and no source lines: nothing here opens
    a file a connector could name.
    """
    tb = _REAL_TRACEBACK.__get__(exc)
    where = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_filename == FILENAME:
            name = "" if code.co_name == "<module>" else f", in {code.co_name}"
            where = f" (line {tb.tb_lineno}{name})"
        tb = tb.tb_next
    return where


def _truncated(text: str) -> str:
    """A message cut to MAX_MESSAGE_CHARS; the host masks secrets, then cuts it shorter."""
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS]


def _describe(exc: BaseException) -> str:
    """`Type: message (line N, in fn)`; the message may be the connector's own code."""
    try:
        text = _truncated(str(exc))
    except BaseException:
        text = "(the exception's message could not be shown)"
    return f"{type(exc).__name__}{': ' if text else ''}{text}{_where(exc)}"


def _attribute(exc: BaseException, name: str) -> Any:
    """`exc.name`, or None when reading it fails (it may be the connector's property)."""
    try:
        return getattr(exc, name, None)
    except BaseException:
        return None


class _Unserialisable(Exception):
    """The return value cannot be JSON."""


def _encode(output: Any) -> str:
    """`output` as compact JSON, at most MAX_OUTPUT_DEPTH deep (the host parses it too)."""
    frame, depth = sys._getframe(), 0
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + MAX_OUTPUT_DEPTH)
    try:
        return json.dumps(output, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise _Unserialisable(f"it is nested deeper than {MAX_OUTPUT_DEPTH} levels") from None
    except (TypeError, ValueError) as exc:  # plain now, while the tripwire still counts
        raise _Unserialisable(str.__str__(str(exc))) from None
    finally:
        sys.setrecursionlimit(limit)


def _execute(
    compiled: tuple[Any, str | None, str],
    request: dict[str, Any],
    guards: Guards,
    logs: _Logs,
    max_output_bytes: int,
    http: Http | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run the connector (and its output's serialisation); the frame kind and message to send."""
    code, compile_error, compile_message = compiled
    if code is None:
        return proto.ERROR, {"type": compile_error, "message": compile_message}
    entry_point = request["entry_point"]
    namespace = guards.globals()
    if http is not None:
        namespace["http"] = http
    encoded = ""
    try:
        exec(code, namespace)
        entry = namespace.get(entry_point)
        if not isinstance(entry, types.FunctionType):
            defined = sorted(
                name for name, value in namespace.items()
                if isinstance(value, types.FunctionType) and not name.startswith("_")
                and name != "log"
            )  # fmt: skip
            what = "is not defined" if entry is None else "is not a function"
            hint = f"; the code defines: {', '.join(defined)}" if defined else ""
            return proto.ERROR, {
                "type": "invalid_input",
                "message": f"entry point {entry_point!r} {what}{hint}",
            }
        shape = getattr(entry, "__code__", None)  # None: a callable object, called as it is
        if shape is not None and shape.co_argcount < 2 and not shape.co_flags & 0x04:  # VARARGS
            taken = ", ".join(shape.co_varnames[: shape.co_argcount])
            return proto.ERROR, {
                "type": "invalid_input",
                "message": f"entry point {entry_point}({taken}) must take (params, context): "
                f"corral calls it as {entry_point}(params, context)",
            }
        encoded = _encode(entry(request["params"], request["context"]))
        logs.flush()
    except _LogOverflow:
        if not guards.violations:  # (a violation the code caught, then re-raised as this)
            return proto.ERROR, {"type": "output_limit", "message": _log_cap_message(logs)}
    except PolicyError as exc:  # reported below from the tripwire, even when the code caught it
        if not guards.violations:
            guards.violations.append(str(exc))
    except MemoryError:
        if not guards.violations:
            return proto.ERROR, {"type": "memory_limit", "message": "the memory limit was reached"}
    except HTTPError as exc:  # raise_for_status() or a failed request, left uncaught
        # First: all three may run connector code, which may trip the policy. The code may
        # have raised one itself, with anything in it: plain values only.
        message = _describe(exc)
        status, retry_after = _attribute(exc, "status_code"), _attribute(exc, "retry_after")
        if not guards.violations:
            return proto.ERROR, {
                "type": "http_error",
                "status": status if type(status) is int and 100 <= status < 600 else None,
                "retry_after": retry_after if type(retry_after) is str else None,
                "message": message,
            }
    except _Unserialisable as exc:
        if not guards.violations:
            message = f"the return value is not JSON-serialisable: {_truncated(str(exc))}"
            return proto.ERROR, {"type": "code_error", "message": message}
    except BaseException as exc:  # the code's own failure, whatever it raised
        message = _describe(exc)  # first: the message may be connector code that trips
        if not guards.violations:
            return proto.ERROR, {"type": "code_error", "message": message}
    if guards.violations:
        return proto.ERROR, {
            "type": "policy_violation",
            "message": _truncated(guards.violations[0]),
        }
    if logs.overflowed:
        return proto.ERROR, {"type": "output_limit", "message": _log_cap_message(logs)}
    if len(encoded) > max_output_bytes:
        return proto.ERROR, {
            "type": "output_limit",
            "message": f"the output is {len(encoded)} bytes, over the {max_output_bytes} byte cap",
        }
    return proto.RESULT, {"output": encoded}


def _log_cap_message(logs: _Logs) -> str:
    return f"the logs passed the {logs.max_bytes} byte cap"


def spare(
    spare_fd: int,
    cache: CompileCache,
    imports: ImportPolicy,
    zygote_pid: int,
    confinement: Confinement,
) -> NoReturn:
    """The whole life of a sandbox child. Never returns.

    Forked ahead of need by the zygote, it confines itself, joins the
    execution's cgroups (while it waits, or with the request), waits for one
    request (a spec and the channel to its host), hands the host its pidfd,
    and only then touches connector code.
    """
    status = 1
    try:
        _prepare(zygote_pid, spare_fd)
        _warm(cache, imports)
        os.dup2(pidfd := os.pidfd_open(os.getpid()), PIDFD_FD)  # before the filter refuses it
        os.close(pidfd)
        if _prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        confinement.apply()  # single-threaded still: a uid change need not visit threads
        standby = _Standby()
        control = socket.socket(fileno=SPARE_FD)
        spec, fds = _await_spawn(control)
        control.detach()
        channel_fd, joins = fds[0], fds[1:]
        if len(joins) != spec["joins"]:
            raise OSError("the host's cgroup files did not all arrive")
        _enter_cgroups(joins)
        _place_channel(channel_fd)
        if spec.get("worker"):
            worker = sys.modules["corral.sandbox._worker"]
            worker.serve(spec, cache, imports, standby.run)
        else:
            _run(spec, cache, imports, standby)
        status = 0
    except BaseException:
        with contextlib.suppress(BaseException):
            traceback.print_exc()  # stderr is /dev/null once confined; useful before that
    finally:
        os._exit(status)


def _warm(cache: CompileCache, imports: ImportPolicy) -> None:
    """Run a trivial connector through the whole path while waiting for a request.

    A fork shares the zygote's pages until they are written, and each first
    write costs a copy-on-write fault: taking them now keeps them off the
    request's path. Trusted code only; the tripwire is reset by the next Guards.
    """
    logs = _Logs(1 << 10)
    guards = Guards(imports, _make_log(logs), _make_printer(logs))
    request = {"entry_point": "run", "params": {"warm": [1, "x"]}, "context": {}}
    kind, message = _execute(cache.get(WARM_SOURCE), request, guards, logs, 1 << 10)
    json.loads(proto.json_frame(kind, message)[proto.HEADER.size :])


def _run(
    spec: dict[str, Any],
    cache: CompileCache,
    imports: ImportPolicy,
    standby: _Standby,
) -> None:
    """Announce the pidfd, start the heartbeat, lock down, read the request, answer it."""
    sock = socket.socket(fileno=CHANNEL_FD)
    announce(sock)
    channel = _Channel(sock)
    logs = _Logs(spec["max_log_bytes"])
    stop = _thread.allocate_lock()
    stop.acquire()  # released when the answer is ready: the heartbeat then ends
    standby.run(_heartbeat, channel, logs, spec["heartbeat_interval_ms"] / 1000, stop)
    lock_down(spec)
    frame = proto.read_frame(sock, MAX_REQUEST_BYTES)
    if frame is None or frame[0] != proto.REQUEST:
        return  # the host went away before sending the request
    request = json.loads(frame[1])
    compiled = compile_reporting(cache, spec["source"], channel)
    guards = Guards(imports, _make_log(logs), _make_printer(logs))
    http, _ = make_http(channel.send, sock, guards.violation)
    kind, message = _execute(compiled, request, guards, logs, spec["max_output_bytes"], http)
    stop.release()
    answer(channel, kind, message, logs)


def answer(
    channel: _Channel,
    kind: int,
    message: dict[str, Any],
    logs: _Logs,
    cpu_ms: float | None = None,
) -> None:
    """Send the RESULT or ERROR frame, with the logs still pending and what was used."""
    message.update(beat(logs, cpu_ms))
    if kind == proto.RESULT:  # the output is JSON already: spliced in, not encoded twice
        output = message.pop("output").encode()
        payload = b'{"output":%s,%s' % (output, json.dumps(message).encode()[1:])
        channel.send(proto.frame(kind, payload))
        return
    try:
        frame = proto.json_frame(kind, message)
    except (TypeError, ValueError, RecursionError):  # nothing the code raised may crash this
        text = "the code's error could not be reported"
        frame = proto.json_frame(proto.ERROR, {**beat(logs, cpu_ms), "type": "code_error",
                                               "message": text})  # fmt: skip
    channel.send(frame)
