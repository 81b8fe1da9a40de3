"""The zygote: a warm, single-threaded process that forks the sandbox children.

Runs in its own interpreter, started by the host with `python -I`; it never
runs connector code itself. It keeps a few spare children forked ahead of
need (each already confined as far as it can be without a request), hands
each request to a spare, and forks a replacement while the spare runs, so
the fork is off the caller's path. Children are reaped by the kernel
(SIGCHLD ignored) and die with the zygote (PR_SET_PDEATHSIG). When the
host's end of the control socket closes (the host exited, even by SIGKILL),
the zygote kills what is left in the host's cgroups, removes them and exits.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from corral.sandbox import _child, _worker  # noqa: F401 - _worker: spares may become workers
from corral.sandbox import _protocol as proto
from corral.sandbox._cgroups import Hierarchy
from corral.sandbox._policy import CompileCache, ImportPolicy

COMPILE_CACHE_SIZE = 256  # distinct connector sources kept compiled
COMPILE_CACHE_BYTES = 8 << 20  # of source; compiled code is about ten times larger
MAX_REQUEST_BYTES = 64 << 20
_PR_SET_THP_DISABLE = 41
#: Namespaces the zygote enters once, so every child inherits them at no cost per execution:
#: a network namespace whose only interface is a loopback that is down (no network at all),
#: and IPC and UTS namespaces of their own.
NAMESPACES = {"net": 0x40000000, "ipc": 0x08000000, "uts": 0x04000000}


class Zygote:
    """The fork server: spares, the compile cache and the import policy they inherit."""

    def __init__(self, control: socket.socket, config: dict[str, Any]) -> None:
        self.control = control
        plain = bool(config.get("unsafe_plain_python"))  # corral's own tests only
        self.imports = ImportPolicy(config["allowed_imports"], unsafe_plain_python=plain)
        self.cache = CompileCache(
            COMPILE_CACHE_SIZE, COMPILE_CACHE_BYTES, _child.FILENAME, plain=plain
        )
        self.cache.get(_child.WARM_SOURCE)  # warms the compiler; every spare runs it once
        self.pid = os.getpid()
        self.initial_spares = int(config["spares"])

    def _fork_spare(self) -> None:
        """Fork a spare and give the host its socket; the zygote keeps no handle on it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            _child.spare(theirs.fileno(), self.cache, self.imports, self.pid)
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
    """The host is gone (or closed us): kill and remove every cgroup it made through us."""
    cgroup = config.get("cgroup")
    if not cgroup:
        return
    hierarchy = Hierarchy(cgroup["version"], {k: Path(v) for k, v in cgroup["roots"].items()})
    hierarchy.sweep(prefix=cgroup["prefix"])
    hierarchy.remove_roots()


def main() -> None:
    """Entry point: `python -I -c ...` with the control fd and the JSON config in argv."""
    # Huge pages would make every copy-on-write fault in a child copy 2 MiB.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_THP_DISABLE, 1, 0, 0, 0)
    for flag in NAMESPACES.values():
        libc.unshare(flag)  # where the host refuses (not root), `corral selftest` says so
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps children
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the host
    control = socket.socket(fileno=int(sys.argv[1]))
    config = json.loads(sys.argv[2])
    try:
        Zygote(control, config).serve()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the host closed us while we were handing it a spare
    except Exception as exc:  # the host sees the zygote gone and says so
        print(f"corral zygote: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        _janitor(config)
