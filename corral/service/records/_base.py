"""Run records, stored workflows and worker heartbeats: the interface and the record shape.

A run record is one JSON document (`new_run` builds it):

    id, workflow, definition (the workflow as it was when the run was queued), input,
    status    queued | running | succeeded | failed | cancelled
    created_at, started_at, finished_at   (seconds since the epoch; None until then)
    attempts  how many times a worker started it (a reclaimed or retried run: more than 1)
    worker    the id of the worker that holds or last held it
    cancel_requested   set by a cancel while the run is running; its worker stops it
    error     {"type", "message"} of the run, or None (the first failed node's, or
              worker_lost, cancelled)
    nodes     {node id: {"status", "output", "metadata", "error", "logs", "usage"}}

Every change goes through `update_run(run_id, change)`: read, change, write only if no one
wrote in between (a version number), else read again; so a cancel and a finishing worker
never overwrite each other. `change_run` also answers the version written, so that the next
change by the same process can skip the read.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from corral.service._changes import Changes

RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
MAX_LIST_LIMIT = 500
MAX_SINCE = 1e11  # seconds since the epoch: the year 5138; sort keys stay 15 digits wide
PRUNE_BATCH = 500  # runs removed per call of prune_runs
UPDATE_ATTEMPTS = 50  # optimistic writes retried; only a storm of writers to one run loses

_NO_CHANGES = Changes()


class RecordsError(Exception):
    """The records did not answer (database locked or unreadable, Redis unreachable)."""


def new_run(
    run_id: str, definition: dict[str, Any], run_input: dict[str, Any], now: float
) -> dict[str, Any]:
    """A queued run record."""
    return {
        "id": run_id,
        "workflow": str(definition.get("id") or "workflow"),
        "definition": definition,
        "input": run_input,
        "status": "queued",
        "created_at": now,
        "started_at": None,
        "finished_at": None,
        "attempts": 0,
        "worker": None,
        "cancel_requested": False,
        "error": None,
        "nodes": {},
    }


def run_summary(run: dict[str, Any]) -> dict[str, Any]:
    """The line of a run in a list: id, workflow, status, times, duration, error type."""
    started, finished = run.get("started_at"), run.get("finished_at")
    duration = None if started is None or finished is None else round(finished - started, 3)
    return {
        "id": run["id"],
        "workflow": run["workflow"],
        "status": run["status"],
        "created_at": run["created_at"],
        "started_at": started,
        "finished_at": finished,
        "duration_s": duration,
        "error_type": (run.get("error") or {}).get("type"),
    }


def sort_key(run: dict[str, Any]) -> str:
    """Orders runs by creation, newest last, ties by id; also the list cursor."""
    return f"{round(run['created_at'] * 1000):015d}:{run['id']}"


def since_key(since: float) -> str:
    """The smallest sort key of a run created at or after `since`."""
    return f"{round(since * 1000):015d}:"


class Records(abc.ABC):
    """Run records, stored workflows and worker heartbeats, shared by every process."""

    kind: str

    # -- runs ----------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_run(
        self, run: dict[str, Any], *, events: list[dict[str, Any]] | None = None
    ) -> bool:
        """Store a new run record, with `events` as the start of its stream, in one write;
        False (nothing changes) when its id is taken. A record created finished counts in
        `finished_counts`."""

    async def get_run(self, run_id: str) -> dict[str, Any] | None:
        """The run record, or None."""
        found = await self._read_run(run_id)
        return None if found is None else found[0]

    async def update_run(
        self,
        run_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        events: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any] | None:
        """Apply `change` to the current record and store what it returns, atomically with
        respect to every other update; `change` returns None to leave the record as it is
        (and then None is returned). None also when there is no such run. `events` are
        appended to the run's stream in the same write, and only if it is made."""
        written = await self.change_run(run_id, change, events=events)
        return None if written is None else written[0]

    async def change_run(
        self,
        run_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        events: list[dict[str, Any]] | None = None,
        last: tuple[dict[str, Any], int] | None = None,
    ) -> tuple[dict[str, Any], int] | None:
        """`update_run`, answering the record written with its version, and starting from
        `last` (a record and version as this process last wrote it) when given: the first
        attempt changes that without reading; if the run changed since, the write is
        refused and the change is made to the record read then."""
        found = last
        for _ in range(UPDATE_ATTEMPTS):
            if found is None:
                found = await self._read_run(run_id)
                if found is None:
                    return None
            run, version = found
            changed = change(run)
            if changed is None:
                if found is last:  # said of a record that may be old: ask the current one
                    found = None
                    continue
                return None
            if await self._write_run(changed, version, events or []):
                return changed, version + 1
            found = None
        raise RecordsError(f"run {run_id!r}: {UPDATE_ATTEMPTS} concurrent updates in a row")

    async def run_statuses(self, run_ids: list[str]) -> dict[str, str | None]:
        """The status of each of `run_ids` (None for a run that does not exist)."""
        found = {run_id: await self._read_run(run_id) for run_id in run_ids}
        return {run_id: None if f is None else f[0]["status"] for run_id, f in found.items()}

    @abc.abstractmethod
    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        since: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Run summaries, newest first, and the cursor of the next page (None: no more)."""

    @abc.abstractmethod
    async def finished_counts(self) -> dict[tuple[str, str], int]:
        """How many runs finished, by (workflow, status), ever: each time a run's record
        turns succeeded, failed or cancelled counts (a retried run counts again)."""

    @abc.abstractmethod
    async def prune_runs(self, *, finished_before: float, limit: int = PRUNE_BATCH) -> list[str]:
        """Remove up to `limit` runs that finished (succeeded, failed, cancelled) before
        `finished_before`, with their events; the ids removed. Queued and running runs stay
        whatever their age; finished counts (corral_runs_total) are kept."""

    @abc.abstractmethod
    async def _read_run(self, run_id: str) -> tuple[dict[str, Any], int] | None:
        """The record and its version."""

    @abc.abstractmethod
    async def _write_run(
        self, run: dict[str, Any], version: int, events: list[dict[str, Any]]
    ) -> bool:
        """Store the record if its version is still `version` (it becomes `version` + 1), and
        append `events` to its stream in the same write."""

    @abc.abstractmethod
    async def append_event(self, run_id: str, event: dict[str, Any]) -> int:
        """Add an event to a run's stream; its sequence number (1, 2, …)."""

    async def append_events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Add `(run id, event)` pairs to their runs' streams, in order (one write where the
        records allow it: a worker hands over every event pending at once)."""
        for run_id, event in events:
            await self.append_event(run_id, event)

    @abc.abstractmethod
    async def run_events(self, run_id: str, *, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """A run's events after sequence number `after`, in order."""

    # -- workflows -----------------------------------------------------------------------

    @abc.abstractmethod
    async def put_workflow(self, definition: dict[str, Any], now: float) -> None:
        """Store (or replace) a workflow under its id."""

    @abc.abstractmethod
    async def get_workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """A stored workflow's definition, or None."""

    @abc.abstractmethod
    async def delete_workflow(self, workflow_id: str) -> bool:
        """Remove a stored workflow; False when there was none."""

    @abc.abstractmethod
    async def list_workflows(self) -> list[dict[str, Any]]:
        """Every stored workflow: `{"id", "definition", "updated_at"}`, by id."""

    # -- connections (credentials arrive encrypted: corral.service._keys) -----------------

    @abc.abstractmethod
    async def put_connection(
        self, connection: dict[str, Any], *, expect_secret: str | None = None
    ) -> bool:
        """Store a connection `{"app", "baseUrl", "secret", "credential_names", "key_id",
        "updated_at"}` (secret: the encrypted credentials). With `expect_secret`, only if
        the stored one is still that (a rotation never overwrites a newer write)."""

    @abc.abstractmethod
    async def get_connection(self, app: str) -> dict[str, Any] | None:
        """A stored connection, or None."""

    @abc.abstractmethod
    async def delete_connection(self, app: str) -> bool:
        """Remove a stored connection; False when there was none."""

    @abc.abstractmethod
    async def list_connections(self) -> list[dict[str, Any]]:
        """Every stored connection, by app."""

    # -- small settings of the deployment (the key ring's canary) -----------------------------

    @abc.abstractmethod
    async def get_meta(self, key: str) -> str | None:
        """A value kept under `key`, or None."""

    @abc.abstractmethod
    async def put_meta(self, key: str, value: str, *, only_new: bool = False) -> bool:
        """Keep `value` under `key`; with `only_new`, only if there is none (False then)."""

    # -- workers -------------------------------------------------------------------------

    @abc.abstractmethod
    async def beat(self, worker: dict[str, Any]) -> None:
        """Record a worker's heartbeat: `{"id", "host", "pid", "running", "last_heartbeat"}`."""

    @abc.abstractmethod
    async def workers(self, *, seen_since: float) -> list[dict[str, Any]]:
        """Workers whose last heartbeat is at or after `seen_since`, by id."""

    # -- lifetime ------------------------------------------------------------------------

    def changes(self) -> Changes:
        """Topics `runs` (a run finished) and `events` (a run's stream grew), rung by
        every process that writes them where the backend can (the API's waits for finished
        runs and its event streams hear them); this default rings and hears nothing."""
        return _NO_CHANGES

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the records can be written; raise RecordsError otherwise."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads; idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def check_list_args(status: str | None, limit: int, since: float | None = None) -> None:
    """Raise ValueError for a status, a limit or a time a list cannot take."""
    if since is not None and not 0 <= since <= MAX_SINCE:
        raise ValueError(f"since must be seconds since the epoch, from 0 to {MAX_SINCE:.0f}")
    if status is not None and status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise ValueError(f"limit must be from 1 to {MAX_LIST_LIMIT}, got {limit}")
