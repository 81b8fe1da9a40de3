"""The reaper: waits for killed children and removes their cgroups, off the caller's path.

Host side.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading
from collections.abc import Callable

from corral.sandbox._cgroups import ExecutionCgroup

logger = logging.getLogger("corral.sandbox")

EXIT_WAIT_S = 2.0  # a SIGKILLed child leaves within milliseconds; past this something is wrong


class Reaper:
    """Waits for killed children to be gone and removes their cgroups, off the caller's path.

    The child is already SIGKILLed when it gets here; what is left (its exit,
    the cgroup's removal) costs the caller nothing. `drain()` waits for it.
    """

    def __init__(self, after_each: Callable[[], None] | None = None) -> None:
        self._after_each = after_each  # work that must stay off the caller's path too
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
                if self._after_each is not None:
                    self._after_each()
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


def exited(pidfd: int, timeout_s: float = 0.0) -> bool:
    """Whether the process behind `pidfd` has exited (its pidfd turns readable), waiting up to
    `timeout_s`."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _reap(pid: int | None, pidfd: int | None, cgroup: ExecutionCgroup | None) -> None:
    if pidfd is not None:
        try:
            if not exited(pidfd, EXIT_WAIT_S):
                logger.warning(
                    "corral: sandbox pid %s still running %.0f s after SIGKILL", pid, EXIT_WAIT_S
                )
        finally:
            os.close(pidfd)
    if cgroup is not None:
        cgroup.remove()
