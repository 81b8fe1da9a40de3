"""Waiting for runs to finish inside the API (GET /api/runs/ID?wait_s=N, and POST
/api/workflows/ID/runs?wait_s=N, whose wait starts before the run is queued): one loop
looks at the status of the awaited runs at once, however many requests wait, so a client
that waits costs one request instead of a poll every few milliseconds. Where a finish
rings with the run's name (Redis), the wait on that run ends without a look, and with the
finished record where the ring carries it; else a ring makes the loop look at every
awaited run."""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Awaitable
from typing import Any

from corral.service._changes import ANY, finished_ring
from corral.service.records import FINISHED, Records, RecordsError

MAX_WAIT_S = 30.0  # the longest a request may wait; a client waits longer by asking again
POLL_S = (0.002, 0.02)  # looks, from the first to the slowest (doubling while none finish)
# Where rings name runs, every awaited run is still looked at this often: a ring can be
# lost (Redis drops what is published while a subscription is being renewed).
LOOK_ALL_S = 0.25


class RunWaiter:
    """Resolves the waits on runs of `records` once each run has finished (or is gone)."""

    def __init__(self, records: Records) -> None:
        self.records = records
        self._waits: dict[str, set[asyncio.Future[dict[str, Any] | None]]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._wakeup = asyncio.Event()
        self._new: set[str] = set()  # awaited runs not looked at yet
        self._rung: set[str] = set()  # the `runs` rings heard (finished runs), or ANY
        # Awaited runs being queued (by how many waits): no record yet is not a run gone.
        self._queuing: collections.Counter[str] = collections.Counter()

    async def wait(
        self, run_id: str, timeout_s: float, *, queue: Awaitable[object] | None = None
    ) -> dict[str, Any] | None:
        """Return once `run_id` has finished, or after `timeout_s` (whichever comes first):
        the finished record when the ring that told of the finish carried it, else None
        (read it).

        `queue`, when given, is what queues the run (its exceptions are raised): the wait
        starts before it, so the finish is heard without a first look at the run's status.
        """
        future: asyncio.Future[dict[str, Any] | None]
        future = asyncio.get_running_loop().create_future()
        self._waits.setdefault(run_id, set()).add(future)
        if queue is None:
            self._new.add(run_id)  # it may have finished before this waits
            self._wakeup.set()
        else:
            self._queuing[run_id] += 1
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._look())
        try:
            if queue is not None:
                try:
                    await queue
                finally:
                    self._queuing[run_id] -= 1
                    if not self._queuing[run_id]:
                        del self._queuing[run_id]
            try:  # a time-out, not wait_for: no task of its own per wait
                async with asyncio.timeout(timeout_s):
                    return await future
            except TimeoutError:
                return None
        finally:
            waits = self._waits.get(run_id)
            if waits is not None:
                waits.discard(future)
                if not waits:
                    del self._waits[run_id]

    async def _look(self) -> None:
        changes = self.records.changes()
        rung = self._rung
        changes.subscribe("runs", self._wakeup, rung)  # a finish rings it (with its name)
        rung.add(ANY)
        poll, looked_all = POLL_S[0], 0.0
        try:
            while self._waits:
                self._wakeup.clear()
                # A ring that names a run is its finish, and may carry its record; not for
                # a wait begun since the last pass, whose ring may tell of a finish before
                # it (the run retried since): that run is looked at instead. Two finishes
                # of one run: its record is read back.
                heard: dict[str, str] = {}
                for ring in rung:
                    run_id, record = finished_ring(ring)
                    heard[run_id] = "" if run_id in heard else record
                finished = {
                    run_id: record
                    for run_id, record in heard.items()
                    if run_id in self._waits and run_id not in self._new
                }
                if ANY in heard or time.monotonic() - looked_all >= LOOK_ALL_S:
                    looked = [run_id for run_id in self._waits if run_id not in finished]
                    looked_all = time.monotonic()
                else:
                    looked = [run_id for run_id in self._new if run_id in self._waits]
                rung.clear()
                self._new.clear()
                # No record is a run gone only if it was queued before the read was made
                # (not if its queueing ended while the read was on its way).
                settled = {run_id for run_id in looked if run_id not in self._queuing}
                try:
                    statuses = await self.records.run_statuses(looked) if looked else {}
                except RecordsError:  # looked at again next time; a wait may end at its time-out
                    statuses = {}
                    rung.add(ANY)
                finished.update(
                    (run_id, "")
                    for run_id, status in statuses.items()
                    if status in FINISHED or (status is None and run_id in settled)
                )
                for run_id, record in finished.items():
                    futures = self._waits.pop(run_id, ())
                    answer = _record(run_id, record) if record and futures else None
                    for future in futures:
                        if not future.done():
                            future.set_result(answer)
                poll = POLL_S[0] if finished else min(poll * 2, POLL_S[1])
                try:
                    async with asyncio.timeout(POLL_S[1] if changes.live else poll):
                        await self._wakeup.wait()
                except TimeoutError:
                    rung.add(ANY)
        finally:
            changes.unsubscribe("runs", self._wakeup)

    async def close(self) -> None:
        """Stop looking (the API stops); waits end at their time-outs."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)


def _record(run_id: str, carried: str) -> dict[str, Any] | None:
    """The finished record of `run_id` that a ring carried; None (read it back) for one that
    is not (anyone who can publish on the channel can send anything)."""
    try:
        record = json.loads(carried)
    except (ValueError, RecursionError):
        return None
    finished = isinstance(record, dict) and record.get("status") in FINISHED
    return record if finished and record.get("id") == run_id else None
