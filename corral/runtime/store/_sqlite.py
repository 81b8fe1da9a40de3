"""The store in one SQLite file: WAL, and every read-modify-write one BEGIN IMMEDIATE
transaction."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from corral.runtime.store._base import (
    _NO_BREAKER,
    Admission,
    BreakerState,
    Claim,
    Store,
    StoreError,
    _admit,
    _Breaker,
    _record,
)

if TYPE_CHECKING:
    from os import PathLike

DB_NAME = "corral.db"
BUSY_TIMEOUT_MS = 5_000  # a write transaction lasts microseconds: 5 s waiting means it is stuck
SWEEP_INTERVAL_S = 300.0  # expired rows are invisible anyway; sweeping only bounds the file
SCHEMA_VERSION = 1

_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,          -- 'in_flight' or 'done'
    token TEXT,                   -- the owner of an in-flight claim
    lease_until REAL,
    result TEXT,                  -- JSON, once done
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE TABLE IF NOT EXISTS breakers (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    failures INTEGER NOT NULL,
    opened_at REAL,
    probe_at REAL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires_at REAL               -- NULL: kept until replaced
);
CREATE INDEX IF NOT EXISTS kv_expiry ON kv (expires_at);
CREATE TABLE IF NOT EXISTS seen (
    key TEXT NOT NULL,
    member TEXT NOT NULL,
    expires_at REAL,              -- NULL: kept for good
    PRIMARY KEY (key, member)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS seen_expiry ON seen (expires_at);
"""


@contextlib.contextmanager
def sqlite_errors(path: Path) -> Iterator[None]:
    """Translate sqlite3's errors into StoreError; the one place they are caught."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"state database {path}: {exc}") from exc


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the state database at `path` in WAL mode, in autocommit (transactions
    are explicit: `transaction`). Shared by the store and the embedded queue."""
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _journal_mode_wal(conn)
        if mode != "wal":  # e.g. a file system without shared memory
            raise StoreError(f"state database {path} cannot use WAL (journal mode {mode})")
        # Commits survive any process crash; a power loss may lose the last few (those
        # nodes run again). FULL would fsync every commit: milliseconds on every node.
        conn.execute("PRAGMA synchronous = NORMAL")
    except BaseException:
        conn.close()
        raise
    return conn


def _journal_mode_wal(conn: sqlite3.Connection) -> str:
    """Switch to WAL. SQLite answers "locked" at once here, without its busy handler,
    while other connections open the same new file: wait for them as a busy one would."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: the database's write lock is held from the first read."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _Db:
    """The SQLite connection and its transactions; used from the store's one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = connect(path)
        try:
            with self.transaction():
                version = self.conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"state database {path} has schema {version}, newer than this "
                        f"corral's {SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            self.conn.close()
            raise
        self.swept_at = -math.inf

    def transaction(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction on the store's connection."""
        return transaction(self.conn)

    @contextlib.contextmanager
    def write(self, now: float) -> Iterator[sqlite3.Connection]:
        """A write transaction that also sweeps expired rows every SWEEP_INTERVAL_S."""
        with self.transaction() as conn:
            if now - self.swept_at >= SWEEP_INTERVAL_S:
                conn.execute("DELETE FROM idempotency WHERE expires_at <= ?", (now,))
                conn.execute("DELETE FROM kv WHERE expires_at <= ?", (now,))
                conn.execute("DELETE FROM seen WHERE expires_at <= ?", (now,))
                self.swept_at = now
            yield conn

    def claim(
        self,
        key: str,
        fp: str,
        now: float,
        lease_until: float,
        expires_at: float,
        _ttl_s: float,
        token: str,
    ) -> Claim:
        with self.write(now) as conn:
            row = conn.execute(
                "SELECT fingerprint, state, lease_until, result FROM idempotency "
                "WHERE key = ? AND expires_at > ?",
                (key, now),
            ).fetchone()
            if row is not None:
                stored_fp, state, lease, result = row
                if stored_fp != fp:
                    return Claim("conflict", None, stored_fp)
                if state == "done":
                    return Claim("replay", json.loads(result), stored_fp)
                if lease > now:
                    return Claim("in_flight", None, stored_fp)
            conn.execute(
                "INSERT OR REPLACE INTO idempotency "
                "(key, fingerprint, state, token, lease_until, result, expires_at) "
                "VALUES (?, ?, 'in_flight', ?, ?, NULL, ?)",
                (key, fp, token, lease_until, expires_at),
            )
        return Claim("claimed", None, fp, token)

    def finish(self, key: str, fp: str, result: str, expires_at: float, _ttl_s: float) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO idempotency "
                "(key, fingerprint, state, token, lease_until, result, expires_at) "
                "VALUES (?, ?, 'done', NULL, NULL, ?, ?)",
                (key, fp, result, expires_at),
            )

    def release(self, key: str, token: str) -> bool:
        with self.transaction() as conn:
            cursor = conn.execute(
                "DELETE FROM idempotency WHERE key = ? AND state = 'in_flight' "
                "AND (? = '' OR token = ?)",
                (key, token, token),
            )
            return cursor.rowcount > 0

    def renew(self, key: str, now: float, lease_until: float, token: str) -> bool:
        with self.transaction() as conn:
            cursor = conn.execute(
                "UPDATE idempotency SET lease_until = ? WHERE key = ? AND state = 'in_flight' "
                "AND expires_at > ? AND (? = '' OR token = ?)",
                (lease_until, key, now, token, token),
            )
            return cursor.rowcount > 0

    def claim_and_admit(
        self, claim: tuple[Any, ...], name: str, reset_s: float
    ) -> tuple[Claim, Admission | None]:
        claimed = self.claim(*claim)
        if claimed.state != "claimed":
            return claimed, None
        return claimed, self.breaker_admit(name, claim[2], reset_s)

    def record_and_finish(
        self, finish: tuple[Any, ...], name: str, now: float, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        recorded = self.breaker_record(name, now, True, threshold)
        self.finish(*finish)
        return recorded

    def _breaker(self, conn: sqlite3.Connection, name: str) -> _Breaker:
        row = conn.execute(
            "SELECT state, failures, opened_at, probe_at FROM breakers WHERE name = ?", (name,)
        ).fetchone()
        return _NO_BREAKER if row is None else _Breaker(*row)

    def _save_breaker(self, conn: sqlite3.Connection, name: str, b: _Breaker) -> None:
        if b == _NO_BREAKER:
            conn.execute("DELETE FROM breakers WHERE name = ?", (name,))
        else:
            conn.execute(
                "INSERT OR REPLACE INTO breakers (name, state, failures, opened_at, probe_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, *b),
            )

    def breaker_admit(self, name: str, now: float, reset_s: float) -> Admission:
        # A read first: the common case (closed) changes nothing and takes no write lock,
        # which every other process on this database would wait for.
        before = self._breaker(self.conn, name)
        allowed, after = _admit(before, now, reset_s)
        if after != before:
            with self.transaction() as conn:  # decided again on what is there now
                before = self._breaker(conn, name)
                allowed, after = _admit(before, now, reset_s)
                if after != before:
                    self._save_breaker(conn, name, after)
        return allowed, before.public, after.public

    def breaker_record(
        self, name: str, now: float, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        before = self._breaker(self.conn, name)  # as breaker_admit: a success changes nothing
        after = _record(before, now, success, threshold)
        if after != before:
            with self.transaction() as conn:
                before = self._breaker(conn, name)
                after = _record(before, now, success, threshold)
                if after != before:
                    self._save_breaker(conn, name, after)
        return before.public, after.public

    def breaker_state(self, name: str) -> BreakerState:
        return self._breaker(self.conn, name).public

    def breakers(self) -> dict[str, BreakerState]:
        rows = self.conn.execute(
            "SELECT name, state, failures, opened_at, probe_at FROM breakers ORDER BY name"
        )
        return {name: _Breaker(*rest).public for name, *rest in rows}

    def reset_breaker(self, name: str) -> bool:
        with self.transaction() as conn:
            return conn.execute("DELETE FROM breakers WHERE name = ?", (name,)).rowcount > 0

    def get_json(self, key: str, now: float) -> Any | None:
        row = self.conn.execute(
            "SELECT value FROM kv WHERE key = ? AND (expires_at IS NULL OR expires_at > ?)",
            (key, now),
        ).fetchone()
        return None if row is None else json.loads(row[0])

    def put_json(self, key: str, value: str, expires_at: float | None, _ttl: float | None) -> None:
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO kv (key, value, expires_at) VALUES (?, ?, ?)",
                (key, value, expires_at),
            )

    def add_seen(
        self, key: str, members: list[str], now: float, expires_at: float | None
    ) -> list[str]:
        with self.write(now) as conn:
            known = self._known(conn, key, members, now)
            conn.execute(
                "INSERT INTO seen (key, member, expires_at) "
                "SELECT ?, value, ? FROM json_each(?) WHERE true "
                "ON CONFLICT (key, member) DO UPDATE SET expires_at = excluded.expires_at",
                (key, expires_at, json.dumps(members)),
            )
        return [member for member in members if member not in known]

    def unseen(self, key: str, members: list[str], now: float) -> list[str]:
        known = self._known(self.conn, key, members, now)
        return [member for member in members if member not in known]

    @staticmethod
    def _known(conn: sqlite3.Connection, key: str, members: list[str], now: float) -> set[str]:
        """Those of `members` in the set `key` and not expired."""
        return {
            member
            for (member,) in conn.execute(
                "SELECT member FROM seen WHERE key = ? AND (expires_at IS NULL OR "
                "expires_at > ?) AND member IN (SELECT value FROM json_each(?))",
                (key, now, json.dumps(members)),
            )
        }


class SqliteStore(Store):
    """The store in one SQLite file, shared by every thread and process that opens it.

    Calls run on one thread of the store's own, so a database locked by another process
    waits there (up to BUSY_TIMEOUT_MS), never on the event loop.
    """

    def __init__(
        self, path: str | PathLike[str], *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(clock)
        self.path = Path(path)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-store")
        try:
            self._db: _Db | None = self._thread.submit(self._call, _Db, self.path).result()
        except BaseException:
            self._thread.shutdown()
            raise

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r}{'' if self._db else ', closed'})"

    def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        with sqlite_errors(self.path):
            return function(*args)

    async def _run(self, name: str, *args: Any) -> Any:
        if self._db is None:
            raise StoreError(f"{self!r} is closed")
        method = getattr(self._db, name)
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._call, method, *args
        )

    async def _claim(self, *args: Any) -> Claim:
        return await self._run("claim", *args)

    async def _finish(self, *args: Any) -> None:
        await self._run("finish", *args)

    async def _release(self, *args: Any) -> bool:
        return await self._run("release", *args)

    async def _renew(self, *args: Any) -> bool:
        return await self._run("renew", *args)

    async def _breaker_admit(self, *args: Any) -> Admission:
        return await self._run("breaker_admit", *args)

    async def _breaker_record(self, *args: Any) -> tuple[BreakerState, BreakerState]:
        return await self._run("breaker_record", *args)

    async def _claim_and_admit(
        self, claim: tuple[Any, ...], name: str, reset_s: float
    ) -> tuple[Claim, Admission | None]:
        return await self._run("claim_and_admit", claim, name, reset_s)

    async def _record_and_finish(
        self, finish: tuple[Any, ...], name: str, now: float, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        return await self._run("record_and_finish", finish, name, now, threshold)

    async def breaker_state(self, name: str) -> BreakerState:
        """The current state of breaker `name` (closed when never used)."""
        return await self._run("breaker_state", name)

    async def breakers(self) -> dict[str, BreakerState]:
        """Every breaker that is not plainly closed, by name."""
        return await self._run("breakers")

    async def reset_breaker(self, name: str) -> bool:
        """Close breaker `name` by hand; False when it was closed."""
        return await self._run("reset_breaker", name)

    async def _get_json(self, *args: Any) -> Any | None:
        return await self._run("get_json", *args)

    async def _put_json(self, *args: Any) -> None:
        await self._run("put_json", *args)

    async def _add_seen(self, *args: Any) -> list[str]:
        return await self._run("add_seen", *args)

    async def _unseen(self, *args: Any) -> list[str]:
        return await self._run("unseen", *args)

    async def close(self) -> None:
        """Close the database and stop the store's thread; idempotent."""
        db, self._db = self._db, None
        if db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, db.conn.close)
            self._thread.shutdown()
