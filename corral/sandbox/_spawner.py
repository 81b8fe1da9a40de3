"""The host's handle on the zygote: starting it, and taking the spares it forks.

Host side. The zygote (see `_zygote`) forks spare children ahead of need and
hands their sockets to the host over the control socket; a receiver thread
queues them. Each execution takes a spare, asks the zygote for a replacement
at once, and gives the spare its request directly: neither a fork nor the
zygote is on the caller's path. Requests to the zygote go through a sender
thread, so a zygote busy compiling never blocks an event loop.

With `join_ahead` (the process backend, with cgroups), each spare is given a
blank cgroup made ahead of need as it arrives and joins it while it waits:
moving a process into a cgroup can take milliseconds after an idle spell,
and this keeps it off the caller's path. A spare's cgroup goes with it to
its execution; a spare that is retired (a zygote restart, close()) takes
its cgroup along to `release`.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from corral._exceptions import Aborted, SandboxCrash
from corral.sandbox import _protocol as proto
from corral.sandbox._cgroups import ExecutionCgroup

logger = logging.getLogger("corral.sandbox")

SPARES = 2  # children forked ahead of need: enough for back-to-back calls on 2 cores
COMPILED_SOURCES_TRACKED = 256  # sources sent to the zygote to compile (its cache's size)
ZYGOTE_START_TIMEOUT_S = 30.0  # importing the policy modules takes ~0.2 s; a loaded CI box more
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
# The zygote imports only the child-side modules: empty stand-ins for the
# packages keep their __init__ (pydantic, psutil, the host side) out of it, so
# it stays small and every fork copies less.
_ZYGOTE_BOOTSTRAP = """\
import sys, types
for name in ("corral", "corral.config", "corral.sandbox"):
    path = name.replace(".", "/")
    package = types.ModuleType(name)
    package.__path__ = [{parent!r} + "/" + path]
    sys.modules[name] = package
from corral.sandbox._zygote import main
main()
"""


@dataclass
class _Spare:
    """A child forked ahead of need, waiting for its one request."""

    pid: int
    sock: socket.socket
    cgroup: ExecutionCgroup | None = None  # the one it joined while it waits, if any


class Spawner:
    """The zygote process, its control socket and the spares it has handed over.

    Thread-safe; the zygote is started on first use and restarted when it
    dies. A receiver thread collects the spares the zygote forks; each
    execution takes one and asks for a replacement at once.
    """

    def __init__(self, config: dict[str, Any], spares: int = SPARES) -> None:
        self.spares = spares  # kept forked ahead of need
        self._config = {**config, "spares": spares}
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._spares: queue.SimpleQueue[_Spare | None] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._compiled: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.closed = False
        self._ready_cgroup: Callable[[], ExecutionCgroup | None] | None = None
        self._release: Callable[[ExecutionCgroup], None] | None = None
        self._before_start: Callable[[], None] | None = None

    def join_ahead(
        self,
        ready_cgroup: Callable[[], ExecutionCgroup | None],
        release: Callable[[ExecutionCgroup], None],
        before_start: Callable[[], None],
    ) -> None:
        """Have each spare join a cgroup while it waits (call before the zygote starts).

        `ready_cgroup` gives a blank cgroup made ahead, or None, and must not
        block: it runs as spares arrive. `release` gets the cgroup of a spare
        that will run nothing (retired or dead), to remove it off the caller's
        path. `before_start` runs as a zygote (re)starts, which is on the
        caller's path anyway: it makes the cgroups its first spares join.
        """
        self._ready_cgroup, self._release = ready_cgroup, release
        self._before_start = before_start

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
        self._outbox = outbox = queue.SimpleQueue()
        self._compiled.clear()
        threading.Thread(
            target=self._receive_spares, args=(ours, spares), name="corral-zygote-rx", daemon=True
        ).start()
        threading.Thread(
            target=_send_requests, args=(ours, outbox), name="corral-zygote-tx", daemon=True
        ).start()

    def _running(self) -> queue.SimpleQueue[_Spare | None]:
        """The spare queue of a running zygote, starting one if needed."""
        with self._lock:
            if self.closed:
                raise Aborted("the sandbox was closed before the execution started")
            if self._proc is None or self._proc.poll() is not None:
                self._discard()
                if self._before_start is not None:
                    self._before_start()
                self._start()
            return self._spares

    async def take(self) -> _Spare:
        """A spare, which may have died since it was forked: `give` it its request or `retire`
        it. A replacement is asked for at once."""
        for _ in range(3):
            spares = self._running()
            # Asked before waiting, so that a cancelled wait still gets its spare replaced.
            self._outbox.put(proto.json_frame(proto.SPARES, {"count": 1}))
            spare = await _next_spare(spares)
            if spare is not None:
                return spare
            with self._lock:  # the zygote died: reap it so the next round restarts it
                if self._spares is spares and self._proc is not None:
                    self._proc.wait()
        raise SandboxCrash("the sandbox zygote keeps dying (see its messages on stderr)")

    def remember(self, source: str) -> None:
        """Have the zygote compile `source`, so that the spares it forks next inherit it.

        Call it only for a source a child has already compiled within its limits:
        the zygote is under none.
        """
        key = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return
            self._compiled[key] = None
            if len(self._compiled) > COMPILED_SOURCES_TRACKED:
                self._compiled.popitem(last=False)
            self._outbox.put(proto.json_frame(proto.SPARES, {"source": source}))

    async def give(
        self,
        spare: _Spare,
        spec: dict[str, Any],
        channel: socket.socket,
        join: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Send `spare` its SPAWN frame: `spec`, with `channel` and the cgroup files to `join`
        attached. OSError: the spare is gone. The host's end of its socket is closed after,
        whatever happens; its cgroup is the caller's."""
        data = proto.json_frame(proto.SPAWN, spec)
        fds = _fd_array(channel.fileno(), *join)
        try:
            spare.sock.setblocking(False)
            sent = spare.sock.sendmsg(  # the spare's buffer is empty: this takes the fds
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
            )
            if sent < len(data):  # (an empty send would fail once the spare hung up)
                await asyncio.get_running_loop().sock_sendall(spare.sock, data[sent:])
        finally:
            spare.sock.close()

    async def spawn(
        self, spec: dict[str, Any], channel: socket.socket, join: list[int] | tuple[int, ...] = ()
    ) -> int:
        """Give `spec`, `channel` and the cgroup files to `join` to a spare; its pid (as
        the zygote sees it). Only for spawners that do not `join_ahead`."""
        for _ in range(3):
            spare = await self.take()
            try:
                await self.give(spare, spec, channel, join)
            except OSError:
                continue  # that spare died (killed from outside): take the next
            return spare.pid
        raise SandboxCrash("no spare sandbox process could take the execution")

    def retire(self, spare: _Spare) -> None:
        """Let a spare go unused: it reads EOF and exits; its cgroup goes to `release`."""
        spare.sock.close()
        cgroup, spare.cgroup = spare.cgroup, None
        if cgroup is not None and self._release is not None:
            self._release(cgroup)

    def _join_ahead(self, spare: _Spare) -> None:
        """Give a new spare a blank cgroup to join while it waits (receiver thread).

        When none is ready the spare joins nothing now, and its cgroup is made
        and joined with its request, as without `join_ahead`.
        """
        if self._ready_cgroup is None or (cgroup := self._ready_cgroup()) is None:
            return
        try:
            join = cgroup.open_procs()
        except OSError:  # removed under us (a janitor swept our cgroups): not for this spare
            if self._release is not None:
                self._release(cgroup)
            return
        try:
            # Tiny, into an empty buffer: a blocking send that does not wait.
            spare.sock.sendmsg(
                [proto.json_frame(proto.JOIN, {"joins": len(join)})],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_array(*join))],
            )
        except OSError:  # the spare is gone already; whoever takes it will see
            if self._release is not None:
                self._release(cgroup)
            return
        finally:
            for fd in join:
                os.close(fd)
        spare.cgroup = cgroup

    def _receive_spares(
        self, sock: socket.socket, spares: queue.SimpleQueue[_Spare | None]
    ) -> None:
        """Receiver thread: every spare the zygote forks, then None when it is gone."""
        try:
            while True:
                data, fd = proto.recv_fd(sock, proto.PID.size)
                if fd is None or len(data) < proto.PID.size:
                    if fd is not None:
                        os.close(fd)
                    return
                spare = _Spare(proto.PID.unpack(data)[0], socket.socket(fileno=fd))
                self._join_ahead(spare)
                with self._lock:  # queued only while this zygote is current: else never taken
                    current = self._sock is sock
                    if current:
                        spares.put(spare)
                if not current:
                    self.retire(spare)
                    return
        except OSError:
            return
        finally:
            spares.put(None)

    @property
    def pid(self) -> int | None:
        """The zygote's pid while it runs."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

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
        self._outbox.put(None)  # the sender thread ends
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
                self.retire(spare)  # the spare reads EOF and exits
        self._spares.put(None)  # wakes whoever waits for a spare of this zygote, at once

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
            spare = spares.get_nowait()
        except queue.Empty:
            if time.monotonic() > deadline:
                raise SandboxCrash(
                    f"the sandbox zygote forked nothing in {ZYGOTE_START_TIMEOUT_S:.0f} s"
                ) from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.01)
        else:
            if spare is None:  # the zygote is gone: put it back for every other waiter
                spares.put(None)
            return spare


def _send_requests(sock: socket.socket, outbox: queue.SimpleQueue[bytes | None]) -> None:
    """Sender thread: requests to the zygote, which may be busy compiling, off every loop."""
    while (data := outbox.get()) is not None:
        try:
            sock.sendall(data)
        except OSError:
            return  # the zygote is gone; the next execution restarts it


def _fd_array(*fds: int) -> bytes:
    return array.array("i", fds).tobytes()
