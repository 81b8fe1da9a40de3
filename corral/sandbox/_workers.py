"""The worker backend, host side: a warm pool of long-lived sandbox workers.

Each worker is a spare from the zygote that became a worker (see `_worker`):
confined like a one-shot child, in a cgroup of its own that it keeps for
life. An execution takes an idle worker (or waits for one, in order), gets
its cgroup's limits written for it, and is watched by a Supervisor exactly
like a fresh child, with `WORKER_GRACE_S` added: the worker stops its own
executions at their limits, and the host kills it only when it could not.
A worker that was killed, died, ran `max_executions` or grew past its
memory bound is replaced.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Any

from corral._exceptions import Aborted, ConfigError, SandboxCrash
from corral.config import Settings
from corral.sandbox._backend import Backend, cgroup_limits
from corral.sandbox._cgroups import CgroupLimits, CgroupUnavailable, ExecutionCgroup
from corral.sandbox._reaper import exited
from corral.sandbox._result import ExecutionResult
from corral.sandbox._spawner import ZYGOTE_START_TIMEOUT_S
from corral.sandbox._supervisor import (
    CHILD_ERROR_TYPES,
    ExecutionRequest,
    Failure,
    Supervisor,
    receive_pidfd,
)

WORKER_GRACE_S = 0.1  # past its limits, the time a worker gets to stop an execution itself
#: A worker reports the limits it enforced itself.
WORKER_ERROR_TYPES = CHILD_ERROR_TYPES | {"timeout", "cpu_limit"}


@dataclass(eq=False)
class _Worker:
    """The host's handle on one worker process."""

    pid: int
    pidfd: int
    sock: socket.socket
    cgroup: ExecutionCgroup | None
    executions: int = 0
    maxrss_start: int = 0  # the peak resident memory it reported after its first execution
    cpu_ns: int = 0  # its cgroup's CPU time and OOM kills when its last execution ended:
    oom_kills: int = 0  # the baselines of the next one

    def alive(self) -> bool:
        """Whether the process is still running."""
        return not exited(self.pidfd)

    def kill(self) -> None:
        """SIGKILL the worker; closing the channel also tells a live one to leave."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.sock.close()


class _Pool:
    """Idle workers, and the executions waiting for one in order; safe across threads and loops.

    A waiter is handed either an idle worker or, when a worker's place came
    free, None: the permission to start one itself.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._idle: collections.deque[_Worker] = collections.deque()
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any]]]
        self._waiters = collections.deque()
        self._places = 0  # workers alive or being started
        self._lock = threading.Lock()
        self._closed = False

    async def take(self) -> _Worker | None:
        """An idle worker, or None when the caller should start one in a free place."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._closed:
                raise Aborted("the sandbox was closed before the execution started")
            if self._idle:
                return self._idle.pop()
            if self._places < self.size:
                self._places += 1
                return None
            waiter: asyncio.Future[_Worker | None] = loop.create_future()
            self._waiters.append((loop, waiter))
        try:
            return await waiter
        except asyncio.CancelledError:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, waiter))
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed over, then cancelled before this task resumed: give it on.
                item = waiter.result()
                if item is None:
                    self.leave()
                else:
                    self.put_back(item)
            raise  # one still on its way comes back through _deliver

    def _hand(self, item: _Worker | None) -> bool:
        """Give `item` to the first waiter still waiting (lock held); False if there is none."""
        while self._waiters:
            loop, waiter = self._waiters.popleft()
            if not waiter.done():
                try:
                    loop.call_soon_threadsafe(self._deliver, waiter, item)
                except RuntimeError:  # its loop is closed: nobody waits there any more
                    continue
                return True
        return False

    def _deliver(self, waiter: asyncio.Future[Any], item: _Worker | None) -> None:
        if not waiter.cancelled():
            waiter.set_result(item)
        elif item is not None:
            self.put_back(item)  # its waiter gave up in the meantime: the next one gets it
        else:
            self.leave()

    def put_back(self, worker: _Worker) -> None:
        """A worker is idle again."""
        with self._lock:
            if not self._hand(worker):
                self._idle.append(worker)

    def leave(self) -> None:
        """A worker's place came free (it died, was retired, or never started)."""
        with self._lock:
            if not self._hand(None):
                self._places -= 1

    def close(self) -> list[_Worker]:
        """Refuse new takes, abort the waiters, and hand back every idle worker."""
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters), collections.deque()
            idle, self._idle = list(self._idle), collections.deque()
        for loop, waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits there
                loop.call_soon_threadsafe(_abort_waiter, waiter)
        return idle


def _abort_waiter(waiter: asyncio.Future[Any]) -> None:
    if not waiter.done():
        waiter.set_exception(Aborted("the sandbox was closed while the execution waited"))


class WorkerBackend(Backend):
    """Runs executions one at a time in each of a pool of long-lived workers."""

    name = "worker"

    def __init__(
        self, settings: Settings, *, unsafe_layers_off: frozenset[str] = frozenset()
    ) -> None:
        # A spare only when a worker is replaced.
        super().__init__(settings, spares=1, unsafe_layers_off=unsafe_layers_off)
        self.pool = _Pool(settings.worker_pool_size)
        self.max_executions = settings.worker_max_executions
        self.max_growth = settings.worker_max_memory_mb << 20

    def start(self) -> None:
        """Start the pool's workers now rather than on the first executions."""

        async def fill() -> None:
            started = []
            for _ in range(self.pool.size):
                if (worker := await self.pool.take()) is None:
                    started.append(await self._start_worker())
            for worker in started:
                self.pool.put_back(worker)

        _run_in_own_loop(fill())

    async def _start_worker(self) -> _Worker:
        """A new worker in a free place of the pool (the place is given back on failure)."""
        cgroup = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.closed:
                raise Aborted("the sandbox was closed before the execution started")
            if self.hierarchy is not None:
                try:
                    cgroup = self.hierarchy.create(CgroupLimits(None, None))
                except CgroupUnavailable as exc:
                    raise SandboxCrash(f"a worker's cgroup could not be made: {exc}") from exc
                cgroup.hold()  # it serves many executions: its files are read for each
            spec = {
                "worker": True,
                "rlimit_cpu_s": None,  # a worker lives for many executions
                "rlimit_as_bytes": None,
            }
            expected = await self.spawn(spec, theirs, cgroup)
            theirs.close()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
                # lands as the pidfd arrives, and the cancelled execution would run on.
                async with asyncio.timeout(ZYGOTE_START_TIMEOUT_S):
                    received = await receive_pidfd(ours, expected)
            except Failure as exc:
                raise SandboxCrash(exc.message) from None
            if received is None or received[1] is None:
                raise SandboxCrash("a new sandbox worker died before it was ready")
            pidfd, pid = received
        except BaseException:
            ours.close()
            if cgroup is not None:
                self.reaper.submit(None, None, cgroup)
            self.pool.leave()
            raise
        finally:
            theirs.close()
        return _Worker(pid, pidfd, ours, cgroup)

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one execution on a worker from the pool."""
        if self.closed:
            raise ConfigError("this NodeSandbox is closed; create a new one")
        worker = await self._worker()
        supervisor = Supervisor(
            request,
            executor=self.name,
            isolation=self.isolation,
            cgroup=worker.cgroup,
            pid=worker.pid,
            pidfd=worker.pidfd,
            grace_s=WORKER_GRACE_S,
            child_errors=WORKER_ERROR_TYPES,
            broker=self.new_broker(),
        )
        try:
            with self.in_flight(supervisor):
                if worker.cgroup is not None:
                    worker.cgroup.apply(cgroup_limits(request), reused=True)
                supervisor.begin_accounting(worker.cpu_ns, worker.oom_kills)
                await supervisor.watch(worker.sock, request.frame(with_source=True))
        finally:
            supervisor.read_usage()
            worker.executions += 1
            worker.cpu_ns, worker.oom_kills = supervisor.cgroup_counters
            if worker.executions == 1:
                worker.maxrss_start = supervisor.child_maxrss
            if self._keeps(worker, supervisor):
                self.pool.put_back(worker)
            else:
                self._retire(worker)
            if supervisor.cheap_to_compile:
                self.zygote.remember(request.code)
        return supervisor.conclude()

    async def _worker(self) -> _Worker:
        """A live worker from the pool, started if its place was free."""
        while (worker := await self.pool.take()) is not None:
            if worker.alive():
                return worker
            self._retire(worker)  # it died idle (its zygote went, or someone killed it)
        return await self._start_worker()

    def _keeps(self, worker: _Worker, supervisor: Supervisor) -> bool:
        return (
            supervisor.clean
            and not self.closed
            and worker.executions < self.max_executions
            and supervisor.child_maxrss - worker.maxrss_start <= self.max_growth
            and worker.alive()
        )

    def _retire(self, worker: _Worker) -> None:
        """Kill a worker, have it reaped with its cgroup, and free its place."""
        worker.kill()
        self.reaper.submit(worker.pid, worker.pidfd, worker.cgroup)
        self.pool.leave()

    def _release(self) -> None:
        for worker in self.pool.close():  # waiters get `aborted`
            self._retire(worker)


def _run_in_own_loop(coroutine: Any) -> None:
    """Run `coroutine` to the end on a fresh event loop in a thread of its own."""
    failure: list[BaseException] = []

    def runner() -> None:
        try:
            asyncio.run(coroutine)
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=runner, name="corral-start")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
