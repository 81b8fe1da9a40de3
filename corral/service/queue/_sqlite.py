"""The embedded run queue: a table with leases in the state database (CORRAL_STATE_DIR).

Every transition is one BEGIN IMMEDIATE transaction; a claim is one UPDATE … RETURNING
that sets the lease token and expiry, so two workers never lease the same run. Renew,
complete, fail and release match the token, so a worker whose lease was taken back can
never touch the run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from corral.runtime.store._sqlite import transaction
from corral.service._sqlite import SqliteThread
from corral.service.queue._base import (
    Lease,
    QueueError,
    RunQueue,
    check_lease_options,
    parse_job_data,
)

# A claim that waits is woken by every process's enqueue (the `queue` topic, FileChanges)
# and looks again at least every POLL_MAX_S; where rings cannot be heard, it polls from
# POLL_MIN_S, doubling, and only an enqueue in this process wakes it at once.
# A look is a read (WAL: it never waits for a writer nor holds one up); only a look that
# sees a waiting run takes the write lock to lease it.
DB_NAME = "queue.db"  # in CORRAL_STATE_DIR
POLL_MIN_S = 0.002
POLL_MAX_S = 0.05  # idle: 20 cheap reads a second; a run waits at most this long

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_queue (
    seq INTEGER PRIMARY KEY,      -- enqueue order
    run_id TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL,           -- JSON
    state TEXT NOT NULL,          -- 'waiting' or 'active' (finished runs are removed)
    token TEXT,                   -- the lease holder's, while active
    lease_until REAL,
    reclaims INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS run_queue_state ON run_queue (state, seq);
"""


def _enqueue(conn: sqlite3.Connection, run_id: str, data: str, now: float) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "INSERT INTO run_queue (run_id, data, state, enqueued_at) "
            "VALUES (?, ?, 'waiting', ?) ON CONFLICT (run_id) DO NOTHING",
            (run_id, data, now),
        )
        return cursor.rowcount > 0


def _any_waiting(conn: sqlite3.Connection) -> bool:
    return (
        conn.execute("SELECT 1 FROM run_queue WHERE state = 'waiting' LIMIT 1").fetchone()
        is not None
    )


def _claim(
    conn: sqlite3.Connection, token: str, lease_until: float, max_reclaims: int
) -> Lease | None:
    with transaction(conn):
        row = conn.execute(
            "UPDATE run_queue SET state = 'active', token = ?, lease_until = ? "
            "WHERE seq = (SELECT seq FROM run_queue WHERE state = 'waiting' "
            "ORDER BY seq LIMIT 1) RETURNING run_id, data, reclaims",
            (token, lease_until),
        ).fetchone()
        if row is None:
            return None
        run_id, raw, reclaims = row
        data, invalid = parse_job_data(raw)
        lost = reclaims > max_reclaims
        if lost or invalid:  # out of the queue in the claim's own transaction: failed once
            conn.execute("DELETE FROM run_queue WHERE run_id = ?", (run_id,))
    return Lease(run_id, data, token, reclaims, lost and not invalid, invalid)


def _renew(
    conn: sqlite3.Connection, run_id: str, token: str, lease_until: float, now: float
) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE run_queue SET lease_until = ? WHERE run_id = ? AND state = 'active' "
            "AND token = ? AND lease_until > ?",
            (lease_until, run_id, token, now),
        )
        return cursor.rowcount > 0


def _finish(conn: sqlite3.Connection, run_id: str, token: str) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "DELETE FROM run_queue WHERE run_id = ? AND state = 'active' AND token = ?",
            (run_id, token),
        )
        return cursor.rowcount > 0


def _release(conn: sqlite3.Connection, run_id: str, token: str) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE run_queue SET state = 'waiting', token = NULL, lease_until = NULL "
            "WHERE run_id = ? AND state = 'active' AND token = ?",
            (run_id, token),
        )
        return cursor.rowcount > 0


def _reclaim(conn: sqlite3.Connection, now: float) -> list[str]:
    with transaction(conn):
        rows = conn.execute(
            "UPDATE run_queue SET state = 'waiting', token = NULL, lease_until = NULL, "
            "reclaims = reclaims + 1 WHERE state = 'active' AND lease_until <= ? "
            "RETURNING run_id",
            (now,),
        ).fetchall()
    return [run_id for (run_id,) in rows]


def _remove(conn: sqlite3.Connection, run_id: str) -> bool:
    with transaction(conn):
        cursor = conn.execute(
            "DELETE FROM run_queue WHERE run_id = ? AND state = 'waiting'", (run_id,)
        )
        return cursor.rowcount > 0


def _counts(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {"waiting": 0, "active": 0}
    for state, count in conn.execute("SELECT state, count(*) FROM run_queue GROUP BY state"):
        counts[state] = count
    return counts


def _ping(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1 FROM run_queue LIMIT 1").fetchall()


class SqliteQueue(RunQueue):
    """The run queue in the SQLite state database at `path`, shared by every process that
    opens it. Calls run on one thread of the queue's own, never on the event loop."""

    kind = "sqlite"

    def __init__(
        self,
        path: str | Path,
        *,
        lease_s: float,
        max_reclaims: int,
        clock: Callable[[], float] = time.time,
        legacy: Path | None = None,
    ) -> None:
        check_lease_options(lease_s, max_reclaims)
        self.path = Path(path)
        self.lease_s = float(lease_s)
        self.max_reclaims = max_reclaims
        self.clock = clock
        self._wakeup = asyncio.Event()
        self._db = SqliteThread(self.path, _SCHEMA, QueueError, "run queue", legacy=legacy)

    def __repr__(self) -> str:
        return f"SqliteQueue({str(self.path)!r}{'' if self._db.conn else ', closed'})"

    async def enqueue(self, run_id: str, data: dict[str, Any]) -> bool:
        """Queue a run; False (and nothing changes) when it is already waiting or leased."""
        encoded = json.dumps(data, separators=(",", ":"))
        added = await self._db.quick(_enqueue, run_id, encoded, self.clock())
        if added:
            self._wakeup.set()
            await self._db.changes.ring("queue")
        return bool(added)

    async def claim(self, *, wait_s: float = 0.0) -> Lease | None:
        """Lease the oldest waiting run, waiting up to `wait_s` seconds for one."""
        deadline = time.monotonic() + wait_s
        changes = self._db.changes
        changes.subscribe("queue", self._wakeup)  # any process's enqueue rings it
        poll = POLL_MAX_S if changes.live else POLL_MIN_S
        while True:
            self._wakeup.clear()
            lease = None
            if await self._db.quick(_any_waiting):  # a look that takes no lock
                token = uuid.uuid4().hex
                lease = await self._db.quick(
                    _claim, token, self.clock() + self.lease_s, self.max_reclaims
                )
            left = deadline - time.monotonic()
            if lease is not None or left <= 0:
                return lease
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(poll, left))
            poll = min(poll * 2, POLL_MAX_S)

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by `lease_s` from now; False when it is no longer ours."""
        now = self.clock()
        return bool(
            await self._db.quick(_renew, lease.run_id, lease.token, now + self.lease_s, now)
        )

    async def complete(self, lease: Lease) -> bool:
        """The run is done: remove it; False when no longer ours."""
        return bool(await self._db.quick(_finish, lease.run_id, lease.token))

    async def fail(self, lease: Lease, message: str) -> bool:
        """The run could not be processed: remove it; False when no longer ours."""
        return bool(await self._db.quick(_finish, lease.run_id, lease.token))

    async def release(self, lease: Lease) -> bool:
        """Hand the run back to wait for another worker; False when no longer ours."""
        released = bool(await self._db.quick(_release, lease.run_id, lease.token))
        self._wakeup.set()
        await self._db.changes.ring("queue")
        return released

    async def reclaim(self) -> list[str]:
        """Take back lapsed leases so that the runs wait again; the run ids taken back."""
        taken = list(await self._db.run(_reclaim, self.clock()))
        if taken:
            await self._db.changes.ring("queue")
        return taken

    async def remove(self, run_id: str) -> bool:
        """Remove a waiting run; False when it is not waiting."""
        return bool(await self._db.quick(_remove, run_id))

    async def counts(self) -> dict[str, int]:
        """How many runs are `waiting` and `active`."""
        return dict(await self._db.run(_counts))

    async def ping(self) -> None:
        """Return when the queue answers; raise QueueError otherwise."""
        await self._db.run(_ping)

    async def close(self) -> None:
        """Close the database and stop the queue's thread; idempotent."""
        await self._db.close()
