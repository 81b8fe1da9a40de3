"""Run records, workflows and heartbeats in the SQLite state database (CORRAL_STATE_DIR)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from corral.runtime.store._sqlite import transaction
from corral.service._changes import Changes
from corral.service._sqlite import SqliteThread
from corral.service.records._base import (
    FINISHED,
    PRUNE_BATCH,
    Records,
    RecordsError,
    check_list_args,
    run_summary,
    since_key,
    sort_key,
)

DB_NAME = "records.db"  # in CORRAL_STATE_DIR
WORKER_RETENTION_S = 86_400.0  # heartbeats older than a day are dropped when a worker beats

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    sort_key TEXT NOT NULL,       -- creation order, then id: the list cursor
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    version INTEGER NOT NULL,
    doc TEXT NOT NULL             -- the record, JSON
);
CREATE INDEX IF NOT EXISTS runs_order ON runs (sort_key);
CREATE INDEX IF NOT EXISTS runs_status ON runs (status, sort_key);
CREATE INDEX IF NOT EXISTS runs_workflow ON runs (workflow, sort_key);
CREATE TABLE IF NOT EXISTS run_counts (
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (workflow, status)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_events (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workflows (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS connections (
    app TEXT PRIMARY KEY,
    secret TEXT NOT NULL,         -- the encrypted credentials (compared by rotations)
    doc TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    seen_at REAL NOT NULL
);
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _create(conn: sqlite3.Connection, run: dict[str, Any], events: list[str]) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "INSERT INTO runs (id, sort_key, workflow, status, version, doc) "
            "VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT (id) DO NOTHING",
            (run["id"], sort_key(run), run["workflow"], run["status"], _dumps(run)),
        )
        if cursor.rowcount == 0:
            return False
        if run["status"] in FINISHED:
            _count_finished(conn, run)
        _insert_events(conn, [(run["id"], doc) for doc in events])
        return True


def _read(conn: sqlite3.Connection, run_id: str) -> tuple[dict[str, Any], int] | None:
    row = conn.execute("SELECT doc, version FROM runs WHERE id = ?", (run_id,)).fetchone()
    return None if row is None else (json.loads(row[0]), row[1])


def _write(conn: sqlite3.Connection, run: dict[str, Any], version: int, events: list[str]) -> bool:
    with transaction(conn):
        before = conn.execute(
            "SELECT status FROM runs WHERE id = ? AND version = ?", (run["id"], version)
        ).fetchone()
        if before is None:
            return False
        conn.execute(
            "UPDATE runs SET status = ?, doc = ?, version = version + 1 WHERE id = ?",
            (run["status"], _dumps(run), run["id"]),
        )
        if run["status"] != before[0] and run["status"] in FINISHED:
            _count_finished(conn, run)
        _insert_events(conn, [(run["id"], doc) for doc in events])
        return True


def _count_finished(conn: sqlite3.Connection, run: dict[str, Any]) -> None:
    """Count a record that turned finished (inside a write transaction)."""
    conn.execute(
        "INSERT INTO run_counts (workflow, status, count) VALUES (?, ?, 1) "
        "ON CONFLICT (workflow, status) DO UPDATE SET count = count + 1",
        (run["workflow"], run["status"]),
    )


def _counts(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
    rows = conn.execute("SELECT workflow, status, count FROM run_counts")
    return {(workflow, status): count for workflow, status, count in rows}


def _append_event(conn: sqlite3.Connection, run_id: str, doc: str) -> int:
    with transaction(conn):
        (last,) = conn.execute(
            "SELECT coalesce(max(seq), 0) FROM run_events WHERE run_id = ?", (run_id,)
        ).fetchone()
        conn.execute(
            "INSERT INTO run_events (run_id, seq, doc) VALUES (?, ?, ?)", (run_id, last + 1, doc)
        )
        return int(last) + 1


def _statuses(conn: sqlite3.Connection, run_ids: list[str]) -> dict[str, str | None]:
    found: dict[str, str | None] = dict.fromkeys(run_ids)
    for start in range(0, len(run_ids), 500):
        chunk = run_ids[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        for run_id, status in conn.execute(
            f"SELECT id, status FROM runs WHERE id IN ({marks})", chunk
        ):
            found[run_id] = status
    return found


def _append_events(conn: sqlite3.Connection, events: list[tuple[str, str]]) -> None:
    with transaction(conn):
        _insert_events(conn, events)


def _insert_events(conn: sqlite3.Connection, events: list[tuple[str, str]]) -> None:
    """Add `(run id, JSON)` events after each run's last (inside a write transaction)."""
    last: dict[str, int] = {}
    for run_id, doc in events:
        if run_id not in last:
            (last[run_id],) = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM run_events WHERE run_id = ?", (run_id,)
            ).fetchone()
        last[run_id] += 1
        conn.execute(
            "INSERT INTO run_events (run_id, seq, doc) VALUES (?, ?, ?)",
            (run_id, last[run_id], doc),
        )


def _run_events(conn: sqlite3.Connection, run_id: str, after: int) -> list[tuple[int, Any]]:
    rows = conn.execute(
        "SELECT seq, doc FROM run_events WHERE run_id = ? AND seq > ? ORDER BY seq",
        (run_id, after),
    )
    return [(seq, json.loads(doc)) for seq, doc in rows]


def _list(
    conn: sqlite3.Connection,
    status: str | None,
    workflow: str | None,
    since: float | None,
    limit: int,
    cursor: str | None,
) -> list[dict[str, Any]]:
    where, args = ["1"], []
    if status is not None:
        where.append("status = ?")
        args.append(status)
    if workflow is not None:
        where.append("workflow = ?")
        args.append(workflow)
    if since is not None:
        where.append("sort_key >= ?")
        args.append(since_key(since))
    if cursor is not None:
        where.append("sort_key < ?")
        args.append(cursor)
    rows = conn.execute(
        f"SELECT doc FROM runs WHERE {' AND '.join(where)} ORDER BY sort_key DESC LIMIT ?",
        (*args, limit),
    )
    return [json.loads(doc) for (doc,) in rows]


def _prune(conn: sqlite3.Connection, cutoff: float, limit: int) -> list[str]:
    finished = ", ".join(f"'{status}'" for status in sorted(FINISHED))
    with transaction(conn):
        # Finished before the cutoff means created before it too: the order index narrows.
        rows = conn.execute(
            f"DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE sort_key < ? "
            f"AND status IN ({finished}) AND json_extract(doc, '$.finished_at') < ? "
            "ORDER BY sort_key LIMIT ?) RETURNING id",
            (since_key(cutoff), cutoff, limit),
        ).fetchall()
        removed = [run_id for (run_id,) in rows]
        conn.executemany("DELETE FROM run_events WHERE run_id = ?", rows)
    return removed


def _put_workflow(conn: sqlite3.Connection, workflow_id: str, doc: str, now: float) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO workflows (id, doc, updated_at) VALUES (?, ?, ?)",
            (workflow_id, doc, now),
        )


def _get_workflow(conn: sqlite3.Connection, workflow_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT doc FROM workflows WHERE id = ?", (workflow_id,)).fetchone()
    return None if row is None else json.loads(row[0])


def _delete_workflow(conn: sqlite3.Connection, workflow_id: str) -> bool:
    with transaction(conn):
        return conn.execute("DELETE FROM workflows WHERE id = ?", (workflow_id,)).rowcount > 0


def _list_workflows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT id, doc, updated_at FROM workflows ORDER BY id")
    return [{"id": wid, "definition": json.loads(doc), "updated_at": at} for wid, doc, at in rows]


def _put_connection(
    conn: sqlite3.Connection, connection: dict[str, Any], expect_secret: str | None
) -> bool:
    with transaction(conn):
        if expect_secret is not None:
            cursor = conn.execute(
                "UPDATE connections SET secret = ?, doc = ? WHERE app = ? AND secret = ?",
                (connection["secret"], _dumps(connection), connection["app"], expect_secret),
            )
            return cursor.rowcount > 0
        conn.execute(
            "INSERT OR REPLACE INTO connections (app, secret, doc) VALUES (?, ?, ?)",
            (connection["app"], connection["secret"], _dumps(connection)),
        )
        return True


def _get_connection(conn: sqlite3.Connection, app: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT doc FROM connections WHERE app = ?", (app,)).fetchone()
    return None if row is None else json.loads(row[0])


def _delete_connection(conn: sqlite3.Connection, app: str) -> bool:
    with transaction(conn):
        return conn.execute("DELETE FROM connections WHERE app = ?", (app,)).rowcount > 0


def _list_connections(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [json.loads(doc) for (doc,) in conn.execute("SELECT doc FROM connections ORDER BY app")]


def _get_meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _put_meta(conn: sqlite3.Connection, key: str, value: str, only_new: bool) -> bool:
    verb = "INSERT OR IGNORE" if only_new else "INSERT OR REPLACE"
    with transaction(conn):
        cursor = conn.execute(f"{verb} INTO meta (key, value) VALUES (?, ?)", (key, value))
        return cursor.rowcount > 0


def _beat(conn: sqlite3.Connection, worker_id: str, doc: str, now: float) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT OR REPLACE INTO workers (id, doc, seen_at) VALUES (?, ?, ?)",
            (worker_id, doc, now),
        )
        conn.execute("DELETE FROM workers WHERE seen_at < ?", (now - WORKER_RETENTION_S,))


def _workers(conn: sqlite3.Connection, seen_since: float) -> list[dict[str, Any]]:
    rows = conn.execute("SELECT doc FROM workers WHERE seen_at >= ? ORDER BY id", (seen_since,))
    return [json.loads(doc) for (doc,) in rows]


def _ping(conn: sqlite3.Connection) -> None:
    # A write, so that a read-only or full database fails here and not on the next run.
    with transaction(conn):
        conn.execute("DELETE FROM workers WHERE id = ''")


class SqliteRecords(Records):
    """The records in the SQLite state database at `path`; a new one takes the rows of
    `legacy` (where the records were kept before), if given."""

    kind = "sqlite"

    def __init__(self, path: str | Path, *, legacy: Path | None = None) -> None:
        self.path = Path(path)
        self._db = SqliteThread(self.path, _SCHEMA, RecordsError, "run records", legacy=legacy)

    def __repr__(self) -> str:
        return f"SqliteRecords({str(self.path)!r}{'' if self._db.conn else ', closed'})"

    async def create_run(
        self, run: dict[str, Any], *, events: list[dict[str, Any]] | None = None
    ) -> bool:
        """Store a new run record, with `events` as the start of its stream, in one write;
        False (nothing changes) when its id is taken."""
        created = bool(await self._db.quick(_create, run, [_dumps(e) for e in events or []]))
        if created and run["status"] in FINISHED:
            await self._db.changes.ring("runs", run["id"])
        if created and events:
            await self._db.changes.ring("events")
        return created

    async def _read_run(self, run_id: str) -> tuple[dict[str, Any], int] | None:
        return await self._db.quick(_read, run_id)

    async def _write_run(
        self, run: dict[str, Any], version: int, events: list[dict[str, Any]]
    ) -> bool:
        written = bool(await self._db.quick(_write, run, version, [_dumps(e) for e in events]))
        if written and run["status"] in FINISHED:
            await self._db.changes.ring("runs", run["id"])
        if written and events:
            await self._db.changes.ring("events")
        return written

    async def append_event(self, run_id: str, event: dict[str, Any]) -> int:
        """Add an event to a run's stream; its sequence number."""
        seq = int(await self._db.run(_append_event, run_id, _dumps(event)))
        await self._db.changes.ring("events")
        return seq

    async def run_statuses(self, run_ids: list[str]) -> dict[str, str | None]:
        """The status of each of `run_ids` (None for a run that does not exist), one read."""
        return await self._db.quick(_statuses, run_ids)

    async def append_events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Add `(run id, event)` pairs to their runs' streams, in one transaction."""
        await self._db.quick(_append_events, [(run_id, _dumps(e)) for run_id, e in events])
        await self._db.changes.ring("events")

    async def run_events(self, run_id: str, *, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """A run's events after sequence number `after`, in order."""
        return await self._db.quick(_run_events, run_id, after)

    async def finished_counts(self) -> dict[tuple[str, str], int]:
        """How many runs finished, by (workflow, status), ever."""
        return await self._db.run(_counts)

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
        check_list_args(status, limit, since)
        runs = await self._db.run(_list, status, workflow, since, limit + 1, cursor)
        more = len(runs) > limit
        runs = runs[:limit]
        return [run_summary(run) for run in runs], sort_key(runs[-1]) if more else None

    async def prune_runs(self, *, finished_before: float, limit: int = PRUNE_BATCH) -> list[str]:
        """Remove up to `limit` runs finished before `finished_before`, with their events."""
        return list(await self._db.run(_prune, finished_before, limit))

    async def put_workflow(self, definition: dict[str, Any], now: float) -> None:
        """Store (or replace) a workflow under its id."""
        await self._db.run(_put_workflow, str(definition["id"]), _dumps(definition), now)

    async def get_workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """A stored workflow's definition, or None."""
        return await self._db.quick(_get_workflow, workflow_id)

    async def delete_workflow(self, workflow_id: str) -> bool:
        """Remove a stored workflow; False when there was none."""
        return bool(await self._db.run(_delete_workflow, workflow_id))

    async def list_workflows(self) -> list[dict[str, Any]]:
        """Every stored workflow: `{"id", "definition", "updated_at"}`, by id."""
        return await self._db.run(_list_workflows)

    async def put_connection(
        self, connection: dict[str, Any], *, expect_secret: str | None = None
    ) -> bool:
        """Store a connection (its credentials encrypted); see Records."""
        return bool(await self._db.run(_put_connection, connection, expect_secret))

    async def get_connection(self, app: str) -> dict[str, Any] | None:
        """A stored connection, or None."""
        return await self._db.quick(_get_connection, app)

    async def delete_connection(self, app: str) -> bool:
        """Remove a stored connection; False when there was none."""
        return bool(await self._db.run(_delete_connection, app))

    async def list_connections(self) -> list[dict[str, Any]]:
        """Every stored connection, by app."""
        return await self._db.run(_list_connections)

    async def get_meta(self, key: str) -> str | None:
        """A value kept under `key`, or None."""
        return await self._db.quick(_get_meta, key)

    async def put_meta(self, key: str, value: str, *, only_new: bool = False) -> bool:
        """Keep `value` under `key`; with `only_new`, only if there is none."""
        return bool(await self._db.run(_put_meta, key, value, only_new))

    async def beat(self, worker: dict[str, Any]) -> None:
        """Record a worker's heartbeat."""
        await self._db.run(_beat, worker["id"], _dumps(worker), worker["last_heartbeat"])

    async def workers(self, *, seen_since: float) -> list[dict[str, Any]]:
        """Workers whose last heartbeat is at or after `seen_since`, by id."""
        return await self._db.run(_workers, seen_since)

    def changes(self) -> Changes:
        """`runs` and `events` rung by every process that writes them (FileChanges)."""
        return self._db.changes

    async def ping(self) -> None:
        """Return when the records can be written; raise RecordsError otherwise."""
        await self._db.run(_ping)

    async def close(self) -> None:
        """Close the database; idempotent."""
        await self._db.close()
