"""One connection to a state database on a thread of its own: what the embedded queue
(CORRAL_STATE_DIR/queue.db) and records (records.db) share. Each has a file of its own, apart
from the runtime store's corral.db, so that none of them waits for another's writes. A
database locked by another process is waited for on that thread, never on the event loop.

`changes` rings and hears the topics of the state (corral.service._changes), so that the
other processes on this state dir wake at once instead of polling it.

Point reads and short writes (`quick`) skip the hop to that thread: they run on the event
loop on a second connection that never waits (busy_timeout 0) and never checkpoints, in
microseconds (WAL: a reader never waits for a writer; a commit does not fsync); one that
finds the database locked goes to the thread, which waits. Each hop costs two wake-ups,
which on a busy machine cost milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from corral.runtime.store import StoreError
from corral.runtime.store._sqlite import connect, transaction
from corral.service._changes import FileChanges

_T = TypeVar("_T")

# The loop's connection never checkpoints (that fsyncs); every this many of its calls, a
# passive checkpoint runs on the thread, so the WAL stays bounded.
CHECKPOINT_EVERY = 500


class SqliteThread:
    """`schema` is applied once, in one transaction; `error` is raised (from the sqlite3
    error) by every call that fails, with `what` and the path in its message. `legacy` is
    the database that held these tables before they had a file of their own (the state
    dir's corral.db): when this database is new, their rows are copied in, in the same
    transaction as the schema, so that an upgrade loses nothing."""

    def __init__(
        self,
        path: Path,
        schema: str,
        error: type[Exception],
        what: str,
        *,
        legacy: Path | None = None,
    ) -> None:
        self.path = path
        self._legacy = legacy
        self._error = error
        self._what = what
        self._inline: sqlite3.Connection | None = None  # the loop's, opened on first use
        self._inline_thread: int | None = None
        self._quick_calls = 0
        self.changes = FileChanges(path.parent / "changes")
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="corral-db")
        try:
            self.conn: sqlite3.Connection | None = self._thread.submit(
                self._call, self._open, schema
            ).result()
        except BaseException:
            self._thread.shutdown()
            raise

    def _open(self, schema: str) -> sqlite3.Connection:
        conn = connect(self.path)
        try:
            with transaction(conn):
                for statement in schema.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                copied = False
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    if self._legacy is not None and self._legacy.exists():
                        _copy_tables(conn, self._legacy)
                        copied = True
                    conn.execute("PRAGMA user_version = 1")
            if copied:  # attached until the transaction ended
                conn.execute("DETACH DATABASE legacy")
        except BaseException:
            conn.close()
            raise
        return conn

    def _call(self, function: Callable[..., _T], *args: Any) -> _T:
        try:
            return function(*args)
        except (sqlite3.Error, StoreError) as exc:
            raise self._error(f"{self._what} in {self.path}: {exc}") from exc

    async def run(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(conn, *args)` on the database's thread."""
        conn = self.conn
        if conn is None:
            raise self._error(f"{self._what} in {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, self._call, function, conn, *args
        )

    async def quick(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(conn, *args)`, a read of a few rows or a short write transaction, on the
        event loop's own connection when the database is free at once (no waiting, and no
        checkpoint: those stay on the thread); on the database's thread otherwise."""
        if self.conn is None:
            raise self._error(f"{self._what} in {self.path} is closed")
        if self._inline_thread not in (None, threading.get_ident()):
            return await self.run(function, *args)  # another loop's thread: not its connection
        try:
            if self._inline is None:
                self._inline_thread = threading.get_ident()
                inline = sqlite3.connect(self.path, timeout=0, isolation_level=None)
                inline.execute("PRAGMA busy_timeout = 0")
                inline.execute("PRAGMA wal_autocheckpoint = 0")
                inline.execute("PRAGMA synchronous = NORMAL")
                self._inline = inline
            self._quick_calls += 1
            if self._quick_calls % CHECKPOINT_EVERY == 0:  # the thread checkpoints instead
                self._thread.submit(self._checkpoint)
            return function(self._inline, *args)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise self._error(f"{self._what} in {self.path}: {exc}") from exc
        except (sqlite3.Error, StoreError) as exc:
            raise self._error(f"{self._what} in {self.path}: {exc}") from exc
        return await self.run(function, *args)

    def _checkpoint(self) -> None:
        conn = self.conn
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    async def close(self) -> None:
        """Close the connections and stop the thread; idempotent."""
        await self.changes.close()
        inline, self._inline = self._inline, None
        if inline is not None:
            with contextlib.suppress(sqlite3.ProgrammingError):  # closed from another thread
                inline.close()
        conn, self.conn = self.conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
            self._thread.shutdown()


def _copy_tables(conn: sqlite3.Connection, legacy: Path) -> None:
    """Copy into `conn`'s tables the rows of the same tables in `legacy`, column by name
    (inside the caller's transaction; `legacy` stays attached until it ends)."""
    conn.execute("ATTACH DATABASE ? AS legacy", (str(legacy),))
    tables = [row[0] for row in conn.execute(
        "SELECT name FROM main.sqlite_master WHERE type = 'table' "
        "AND name IN (SELECT name FROM legacy.sqlite_master WHERE type = 'table')"
    )]  # fmt: skip
    for table in tables:
        ours = [row[1] for row in conn.execute(f'PRAGMA main.table_info("{table}")')]
        theirs = {row[1] for row in conn.execute(f'PRAGMA legacy.table_info("{table}")')}
        columns = ", ".join(f'"{name}"' for name in ours if name in theirs)
        conn.execute(
            f'INSERT OR IGNORE INTO main."{table}" ({columns}) '
            f'SELECT {columns} FROM legacy."{table}"'
        )
