"""The zygote: a warm, single-threaded process that forks the sandbox children.

Runs in its own interpreter, started by the host with `python -I`; it never
runs connector code itself. The process the host starts stays outside the
sandbox: it forks the zygote into a new PID namespace, maps the zygote's
user namespace, waits for it, and then cleans up after it (the janitor).
The zygote enters every namespace its children inherit (see `_confine`),
keeps a few spare children forked ahead of need (each already confined as
far as it can be without a request), hands each request to a spare, and
forks a replacement while the spare runs, so the fork is off the caller's
path. Children are reaped by the kernel (SIGCHLD ignored) and die with the
zygote (PR_SET_PDEATHSIG, and the end of its PID namespace). When the
host's end of the control socket closes (the host exited, even by SIGKILL),
the zygote exits and the janitor kills what is left in the host's cgroups,
removes them and exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from corral.sandbox import _child, _leftovers, _worker  # noqa: F401 - _worker: spares may become workers
from corral.sandbox import _confine as confine
from corral.sandbox import _protocol as proto
from corral.sandbox._cgroups import Hierarchy
from corral.sandbox._policy import CompileCache, ImportPolicy

COMPILE_CACHE_SIZE = 256  # distinct connector sources kept compiled
COMPILE_CACHE_BYTES = 8 << 20  # of source; compiled code is about ten times larger
MAX_REQUEST_BYTES = 64 << 20
_PR_SET_THP_DISABLE = 41
#: Entered with the user namespace: a network namespace whose only interface is a loopback
#: that is down (no network at all), and IPC and UTS namespaces of their own.
_WITH_USER_NAMESPACE = confine.CLONE_NEWNET | confine.CLONE_NEWIPC | confine.CLONE_NEWUTS


class Zygote:
    """The fork server: spares, the compile cache and the import policy they inherit."""

    def __init__(
        self, control: socket.socket, config: dict[str, Any], confinement: confine.Confinement
    ) -> None:
        self.control = control
        self.confinement = confinement
        plain = "language" in config["unsafe_layers_off"]  # corral's own tests only
        self.imports = ImportPolicy(config["allowed_imports"], unsafe_plain_python=plain)
        self.cache = CompileCache(
            COMPILE_CACHE_SIZE, COMPILE_CACHE_BYTES, _child.FILENAME, plain=plain
        )
        self.cache.get(_child.WARM_SOURCE)  # warms the compiler; every spare runs it once
        _leftovers.prepare()  # what a worker resets after each execution; lazy imports ahead
        self.pid = os.getpid()
        self.initial_spares = int(config["spares"])

    def _fork_spare(self) -> None:
        """Fork a spare and give the host its socket; the zygote keeps no handle on it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            _child.spare(theirs.fileno(), self.cache, self.imports, self.pid, self.confinement)
        theirs.close()
        try:
            proto.send_fd(self.control, proto.PID.pack(pid), ours.fileno())
        finally:
            ours.close()

    def serve(self) -> None:
        """Fork spares as the host asks for them, until it closes the control socket."""
        gc.freeze()  # what exists now is shared copy-on-write by every child: keep gc off it
        for _ in range(self.initial_spares):
            self._fork_spare()
        while True:
            frame = proto.read_frame(self.control, MAX_REQUEST_BYTES)
            if frame is None:
                return
            kind, payload = frame
            if kind != proto.SPARES:
                raise ValueError(f"unexpected frame kind {kind} from the host")
            request = json.loads(payload)
            if request.get("source"):
                try:
                    self.cache.get(request["source"])  # the next spares inherit it compiled
                except Exception as exc:  # no source may take the zygote down
                    print(f"corral zygote: compiling a source failed: {exc!r}", file=sys.stderr)
            for _ in range(int(request.get("count", 0))):
                self._fork_spare()


def _janitor(config: dict[str, Any]) -> None:
    """The zygote is gone: kill and remove every cgroup the host made through it."""
    cgroup = config.get("cgroup")
    if not cgroup:
        return
    hierarchy = Hierarchy(cgroup["version"], {k: Path(v) for k, v in cgroup["roots"].items()})
    hierarchy.sweep(prefix=cgroup["prefix"])
    hierarchy.remove_roots()


def _confined(config: dict[str, Any], ask_for_map: int, mapped: int) -> confine.Confinement:
    """Enter the namespaces and the filesystem view; what each child will apply after.

    Layers the host refuses are left out and said on stderr; `corral selftest`
    shows which hold. `ask_for_map`/`mapped` are pipes to the parent, which maps
    the user namespace. An unprivileged host's zygote is already in a user
    namespace of its own (see `main`): it builds the same view there, and its
    children drop every capability instead of changing uid.
    """
    layers_off = set(config["unsafe_layers_off"])
    program = None if "seccomp" in layers_off else confine.filter_program()
    confinement = confine.Confinement(None, program, confine.syscall_number("seccomp"))
    try:
        if os.geteuid() != 0:
            raise OSError(1, "not running as root, and no user namespace of its own")
        confine.unshare(confine.CLONE_NEWNS, "mount namespace")
        confine.enter_filesystem_view(confine.interpreter_paths())
    except OSError as exc:
        print(f"corral zygote: no filesystem view: {exc}", file=sys.stderr)
    if config.get("own_user_namespace"):
        os.write(ask_for_map, b"-")
        try:
            confine.unshare(_WITH_USER_NAMESPACE, "network, IPC and UTS namespaces")
        except OSError as exc:
            print(f"corral zygote: {exc}", file=sys.stderr)
        confinement.drop_capabilities = True
        return confinement
    try:
        confine.unshare(confine.CLONE_NEWUSER | _WITH_USER_NAMESPACE, "user namespace")
        os.write(ask_for_map, b"u")
        if os.read(mapped, 1) != b"1":
            raise OSError(1, "the parent could not map the user namespace")
        confine.become_namespace_root()
        confinement.uid = 1  # the namespace's second uid: the host's sandbox uid + 1
    except OSError as exc:
        os.write(ask_for_map, b"-")
        print(f"corral zygote: no user namespace: {exc}", file=sys.stderr)
        with contextlib.suppress(OSError):  # not root: none of these either
            confine.unshare(_WITH_USER_NAMESPACE, "network, IPC and UTS namespaces")
        if os.geteuid() == 0:
            confinement.uid = int(config["sandbox_uid"]) + 1
    return confinement


def _zygote(control: socket.socket, config: dict[str, Any], ask_for_map: int, mapped: int) -> int:
    """The zygote's life, in the new PID namespace (as its init where the host allows)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_child._PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return 70
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps children
    try:
        Zygote(control, config, _confined(config, ask_for_map, mapped)).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the host closed us while we were handing it a spare
    except Exception as exc:  # the host sees the zygote gone and says so
        print(f"corral zygote: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    """Entry point: `python -I -c ...` with the control fd and the JSON config in argv."""
    # Huge pages would make every copy-on-write fault in a child copy 2 MiB.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the host
    control = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    if os.geteuid() == 0:
        with contextlib.suppress(OSError):
            confine.unshare(confine.CLONE_NEWPID, "PID namespace")
    else:  # a user namespace of our own first, in which the other namespaces are allowed
        try:
            confine.enter_own_user_namespace(confine.CLONE_NEWPID)
            config["own_user_namespace"] = True
        except OSError as exc:
            print(f"corral zygote: no user namespace: {exc}", file=sys.stderr)
    ask_for_map, asked = os.pipe()
    answer, mapped = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ask_for_map)
        os.close(mapped)
        os._exit(_zygote(control, config, asked, answer))
    for fd in (asked, answer):
        os.close(fd)
    control.close()  # the zygote's now: its end reads EOF when the host goes
    try:
        if os.read(ask_for_map, 1) == b"u":
            try:
                confine.map_user_namespace(pid, int(config["sandbox_uid"]))
                os.write(mapped, b"1")
            except OSError as exc:
                print(f"corral zygote: cannot map the user namespace: {exc}", file=sys.stderr)
                os.write(mapped, b"0")
        os.waitpid(pid, 0)
    finally:
        _janitor(config)
