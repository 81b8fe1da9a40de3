"""One connection to the state database (CORRAL_STATE_DIR/corral.db) on a thread of its
own: what the embedded queue and records share. A database locked by another process is
waited for on that thread, never on the event loop.

Point reads (`read`) skip the hop to that thread: WAL readers never wait for a writer,
so they run on the event loop on a second, query-only connection, in microseconds; one
that finds the database busy all the same (a checkpoint, a recovery) is done on the
thread instead. Each hop costs two wake-ups, which on a busy machine cost milliseconds.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from corral.runtime.store import StoreError
from corral.runtime.store._sqlite import connect, transaction

_T = TypeVar("_T")

READ_BUSY_TIMEOUT_MS = 20  # a point read on the loop waits this long, then goes to the thread


class SqliteThread:
    """`schema` is applied once, in one transaction; `error` is raised (from the sqlite3
    error) by every call that fails, with `what` and the path in its message."""

    def __init__(self, path: Path, schema: str, error: type[Exception], what: str) -> None:
        self.path = path
        self._error = error
        self._what = what
        self._reader: sqlite3.Connection | None = None  # the loop's, opened on first read
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

    async def read(self, function: Callable[..., _T], *args: Any) -> _T:
        """`function(conn, *args)`, a read of a few rows, on the event loop's own query-only
        connection; on the database's thread when the database is busy."""
        if self.conn is None:
            raise self._error(f"{self._what} in {self.path} is closed")
        try:
            if self._reader is None:
                reader = sqlite3.connect(
                    self.path, timeout=READ_BUSY_TIMEOUT_MS / 1000, isolation_level=None
                )
                reader.execute("PRAGMA query_only = 1")
                self._reader = reader
            return function(self._reader, *args)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise self._error(f"{self._what} in {self.path}: {exc}") from exc
        except (sqlite3.Error, StoreError) as exc:
            raise self._error(f"{self._what} in {self.path}: {exc}") from exc
        return await self.run(function, *args)

    async def close(self) -> None:
        """Close the connections and stop the thread; idempotent."""
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        conn, self.conn = self.conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, conn.close)
            self._thread.shutdown()
