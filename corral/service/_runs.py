"""What an operator (the API, the scheduler) does to runs: submit, cancel, retry. Each
keeps the run record and the queue in step: the record first, so that a worker that
leases the run always finds it."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from corral.service.queue import RunQueue
from corral.service.records import FINISHED, Records, new_run


class RunConflict(Exception):
    """The run is in a state that does not allow what was asked (e.g. retry a running run)."""


def new_run_id() -> str:
    """A fresh run id."""
    return uuid.uuid4().hex


async def submit_run(
    records: Records,
    queue: RunQueue,
    definition: dict[str, Any],
    run_input: dict[str, Any],
    *,
    run_id: str | None = None,
    clock: Callable[[], float] = time.time,
) -> str:
    """Record a queued run of `definition` and queue it; its run id. RunConflict when
    `run_id` is taken."""
    run_id = run_id or new_run_id()
    if not await records.create_run(new_run(run_id, definition, run_input, clock())):
        raise RunConflict(f"run {run_id!r} exists; retry it with POST /api/runs/{run_id}/retry")
    await queue.enqueue(run_id, {"run_id": run_id, "workflow": definition.get("id")})
    return run_id


async def cancel_run(
    records: Records, queue: RunQueue, run_id: str, *, clock: Callable[[], float] = time.time
) -> dict[str, Any] | None:
    """Cancel a queued run at once, or ask the worker of a running one to stop it (its
    sandbox execution is killed); the record, or None when there is no such run.
    RunConflict for a finished run."""
    removed = await queue.remove(run_id)
    now = clock()

    def cancel(record: dict[str, Any]) -> dict[str, Any]:
        if record["status"] in FINISHED:
            raise RunConflict(f"run {run_id!r} already {record['status']}")
        if record["status"] == "queued" and removed:
            error = {"type": "cancelled", "message": "cancelled before it started"}
            return {
                **record,
                "status": "cancelled",
                "finished_at": now,
                "cancel_requested": True,
                "error": error,
            }
        return {**record, "cancel_requested": True}  # its worker stops it

    record = await records.update_run(run_id, cancel)
    if record is not None and record["status"] not in FINISHED:
        await records.changes().ring("cancels")  # its worker hears it at once
    return record


async def retry_run(records: Records, queue: RunQueue, run_id: str) -> dict[str, Any] | None:
    """Queue a failed or cancelled run again under the same run id: its finished nodes
    replay and it resumes where it stopped. None when there is no such run; RunConflict
    when it is not failed or cancelled."""

    def requeue(record: dict[str, Any]) -> dict[str, Any]:
        if record["status"] not in ("failed", "cancelled"):
            raise RunConflict(
                f"run {run_id!r} is {record['status']}; only a failed or cancelled run is retried"
            )
        return {
            **record,
            "status": "queued",
            "cancel_requested": False,
            "error": None,
            "finished_at": None,
            "worker": None,
        }

    record = await records.update_run(run_id, requeue)
    if record is not None:
        await queue.enqueue(run_id, {"run_id": run_id, "workflow": record["workflow"]})
    return record
