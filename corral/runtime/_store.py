"""The runtime's state store: idempotency records, circuit breakers and small keyed state.

One interface, `Store`, with two implementations that every process of a deployment shares:

    SqliteStore   corral.db in CORRAL_STATE_DIR, the default: WAL, and every
                  read-modify-write one BEGIN IMMEDIATE transaction
    RedisStore    CORRAL_REDIS_URL: every operation one Lua script or one command

`open_store(settings)` picks one. Deadlines are absolute times in seconds from the store's
clock (`time.time` unless one is given), so processes sharing a store must share a clock
(NTP); tests pass a clock they can move.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import math
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Self, TypeVar

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from corral._exceptions import ConfigError

if TYPE_CHECKING:
    from os import PathLike

    from corral.config import Settings

__all__ = [
    "DEFAULT_LEASE_S",
    "BreakerState",
    "Claim",
    "RedisStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "open_store",
]

#: How long a claim is held before another worker may take it over as abandoned. A node's
#: default retry budget (3 attempts x 15 s time-out, backoff up to 2 x 10 s) fits inside;
#: nodes that may run longer `renew` their lease.
DEFAULT_LEASE_S = 120.0
DB_NAME = "corral.db"
BUSY_TIMEOUT_MS = 5_000  # a write transaction lasts microseconds: 5 s waiting means it is stuck
SWEEP_INTERVAL_S = 300.0  # expired rows are invisible anyway; sweeping only bounds the file
SCHEMA_VERSION = 1
REDIS_PREFIX = "corral:"
REDIS_TIMEOUT_S = 5.0  # a store call answers in well under a millisecond; 5 s means it is gone
REDIS_CONNECT_TIMEOUT_S = 2.0
# A dropped pooled connection is retried; a server that is gone surfaces within a second as
# StoreError rather than stalling every node (redis-py's default retries for ~10 s).
_REDIS_RETRY = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)

_T = TypeVar("_T")
_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")


class StoreError(Exception):
    """The state store failed to answer (database locked or unreadable, Redis unreachable)."""


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming an idempotency key."""

    state: Literal["claimed", "replay", "in_flight", "conflict"]
    result: dict[str, Any] | None = None  # "replay": the stored result record
    fingerprint: str | None = None  # the stored fingerprint ("conflict" messages)
    token: str | None = None  # "claimed": the owner token for renew/release


@dataclass(frozen=True)
class BreakerState:
    """The shared state of one circuit breaker."""

    state: Literal["closed", "open", "half_open"]
    failures: int
    opened_at: float | None


CLOSED = BreakerState("closed", 0, None)


def _positive(name: str, value: float) -> None:
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if not (valid and math.isfinite(value) and value > 0):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")


def _mask(url: str) -> str:
    """A Redis URL with its password replaced by *** (also when the URL is malformed)."""
    return _PASSWORD.sub(r"\1***@", url)


class Store(abc.ABC):
    """Idempotency records, circuit breakers and small keyed state shared by every process."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock

    # -- idempotency --------------------------------------------------------------------

    async def claim(
        self, key: str, fingerprint: str, *, lease_s: float = DEFAULT_LEASE_S, ttl_s: int
    ) -> Claim:
        """Claim `key` for one run, or say why not.

        No live record: an in-flight one is created with a lease -> "claimed". A finished
        record with this fingerprint -> "replay" with its result. Any record with another
        fingerprint -> "conflict". An in-flight record -> "in_flight" until its lease
        lapses (its worker died), then it is taken over -> "claimed".
        """
        _positive("lease_s", lease_s)
        _positive("ttl_s", ttl_s)
        now = self.clock()
        return await self._claim(
            key, fingerprint, now, now + lease_s, now + ttl_s, ttl_s, uuid.uuid4().hex
        )

    async def finish(
        self, key: str, fingerprint: str, result: dict[str, Any], *, ttl_s: int
    ) -> None:
        """Store the result of a claimed run; it replays for `ttl_s` seconds."""
        _positive("ttl_s", ttl_s)
        encoded = json.dumps(result, separators=(",", ":"))
        await self._finish(key, fingerprint, encoded, self.clock() + ttl_s, ttl_s)

    async def release(self, key: str, *, token: str | None = None) -> bool:
        """Forget an in-flight record (the run failed for good) so a later run may try again.

        With `token`, only while that claim still owns it. A finished record is never
        forgotten. True when a record was removed.
        """
        return await self._release(key, token or "")

    async def renew(self, key: str, *, lease_s: float, token: str | None = None) -> bool:
        """Extend an in-flight lease to `lease_s` from now; False when it is no longer ours."""
        _positive("lease_s", lease_s)
        now = self.clock()
        return await self._renew(key, now, now + lease_s, token or "")

    # -- circuit breakers ---------------------------------------------------------------

    async def breaker_admit(
        self, name: str, *, reset_ms: int
    ) -> tuple[bool, BreakerState, BreakerState]:
        """(allowed, before, after) for one call through breaker `name`.

        Closed admits. Open refuses until `reset_ms` after it opened, then turns half-open
        and admits exactly one probe. Half-open refuses while the probe is out; a probe out
        for `reset_ms` or longer is deemed lost (its process died) and a new one is admitted.
        """
        _positive("reset_ms", reset_ms)
        return await self._breaker_admit(name, self.clock(), reset_ms / 1000)

    async def breaker_record(
        self, name: str, *, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        """(before, after) recording one call's outcome.

        Success closes the breaker and clears its failures. A failure counts; it re-opens a
        half-open breaker and opens a closed one at `threshold` consecutive failures.
        """
        _positive("threshold", threshold)
        return await self._breaker_record(name, self.clock(), success, threshold)

    @abc.abstractmethod
    async def breaker_state(self, name: str) -> BreakerState:
        """The current state of breaker `name` (closed when never used)."""

    # -- small keyed state --------------------------------------------------------------

    async def get_json(self, key: str) -> Any | None:
        """The value put under `key`, or None when absent or expired."""
        return await self._get_json(key, self.clock())

    async def put_json(self, key: str, value: Any, *, ttl_s: int | None = None) -> None:
        """Keep a JSON value under `key`, for `ttl_s` seconds or (None) until replaced."""
        if ttl_s is not None:
            _positive("ttl_s", ttl_s)
        encoded = json.dumps(value, separators=(",", ":"))
        now = self.clock()
        await self._put_json(key, encoded, None if ttl_s is None else now + ttl_s, ttl_s)

    async def add_seen(
        self, key: str, members: list[str], *, ttl_s: int | None = None
    ) -> list[str]:
        """Add members to the set `key`; return, atomically, those not seen before.

        Each member is remembered `ttl_s` seconds after it was last added (None: for good).
        The result keeps the order of `members`, each new member once.
        """
        if ttl_s is not None:
            _positive("ttl_s", ttl_s)
        if not members:
            return []
        now = self.clock()
        unique = list(dict.fromkeys(members))
        return await self._add_seen(key, unique, now, None if ttl_s is None else now + ttl_s)

    async def unseen(self, key: str, members: list[str]) -> list[str]:
        """Those of `members` not (or no longer) in the set `key`, in order, each once; adds
        nothing (`add_seen` records them)."""
        if not members:
            return []
        return await self._unseen(key, list(dict.fromkeys(members)), self.clock())

    # -- lifetime -----------------------------------------------------------------------

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the connection; idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- what an implementation provides (times already read from the clock) -----------

    @abc.abstractmethod
    async def _claim(
        self,
        key: str,
        fp: str,
        now: float,
        lease_until: float,
        expires_at: float,
        ttl_s: float,
        token: str,
    ) -> Claim: ...

    @abc.abstractmethod
    async def _finish(
        self, key: str, fp: str, result: str, expires_at: float, ttl_s: float
    ) -> None: ...

    @abc.abstractmethod
    async def _release(self, key: str, token: str) -> bool: ...

    @abc.abstractmethod
    async def _renew(self, key: str, now: float, lease_until: float, token: str) -> bool: ...

    @abc.abstractmethod
    async def _breaker_admit(
        self, name: str, now: float, reset_s: float
    ) -> tuple[bool, BreakerState, BreakerState]: ...

    @abc.abstractmethod
    async def _breaker_record(
        self, name: str, now: float, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]: ...

    @abc.abstractmethod
    async def _get_json(self, key: str, now: float) -> Any | None: ...

    @abc.abstractmethod
    async def _put_json(
        self, key: str, value: str, expires_at: float | None, ttl_s: float | None
    ) -> None: ...

    @abc.abstractmethod
    async def _add_seen(
        self, key: str, members: list[str], now: float, expires_at: float | None
    ) -> list[str]: ...

    @abc.abstractmethod
    async def _unseen(self, key: str, members: list[str], now: float) -> list[str]: ...


# ---------------------------------------------------------------------------------------
# Breaker transitions. SQLite applies these in its transaction; the Redis scripts below
# mirror them line by line (the shared test suite pins that both agree).


class _Breaker(NamedTuple):
    state: Literal["closed", "open", "half_open"]
    failures: int
    opened_at: float | None
    probe_at: float | None  # when the half-open probe was admitted

    @property
    def public(self) -> BreakerState:
        return BreakerState(self.state, self.failures, self.opened_at)


_NO_BREAKER = _Breaker("closed", 0, None, None)


def _admit(b: _Breaker, now: float, reset_s: float) -> tuple[bool, _Breaker]:
    if b.state == "closed":
        return True, b
    if b.state == "open":
        assert b.opened_at is not None
        if now < b.opened_at + reset_s:
            return False, b
        return True, b._replace(state="half_open", probe_at=now)
    assert b.probe_at is not None
    if now < b.probe_at + reset_s:
        return False, b
    return True, b._replace(probe_at=now)  # the probe is lost: admit another


def _record(b: _Breaker, now: float, success: bool, threshold: int) -> _Breaker:
    if success:
        return _NO_BREAKER
    failures = b.failures + 1
    if b.state == "half_open" or (b.state == "closed" and failures >= threshold):
        return _Breaker("open", failures, now, None)
    return b._replace(failures=failures)  # open stays open from when it opened


# ---------------------------------------------------------------------------------------
# SQLite

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
def _sqlite_errors(path: Path) -> Iterator[None]:
    """Translate sqlite3's errors into StoreError; the one place they are caught."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StoreError(f"state database {path}: {exc}") from exc


class _Db:
    """The SQLite connection and its transactions; used from the store's one thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = self._journal_mode_wal()
            if mode != "wal":  # e.g. a file system without shared memory
                raise StoreError(f"state database {path} cannot use WAL (journal mode {mode})")
            # Commits survive any process crash; a power loss may lose the last few (those
            # nodes run again). FULL would fsync every commit: milliseconds on every node.
            self.conn.execute("PRAGMA synchronous = NORMAL")
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

    def _journal_mode_wal(self) -> str:
        """Switch to WAL. SQLite answers "locked" at once here, without its busy handler,
        while other connections open the same new file: wait for them as a busy one would."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = 0.001
        while True:
            try:
                return str(self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: the database's write lock is held from the first read."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

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

    def breaker_admit(
        self, name: str, now: float, reset_s: float
    ) -> tuple[bool, BreakerState, BreakerState]:
        with self.transaction() as conn:
            before = self._breaker(conn, name)
            allowed, after = _admit(before, now, reset_s)
            if after != before:
                self._save_breaker(conn, name, after)
        return allowed, before.public, after.public

    def breaker_record(
        self, name: str, now: float, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        with self.transaction() as conn:
            before = self._breaker(conn, name)
            after = _record(before, now, success, threshold)
            if after != before:
                self._save_breaker(conn, name, after)
        return before.public, after.public

    def breaker_state(self, name: str) -> BreakerState:
        return self._breaker(self.conn, name).public

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
        with _sqlite_errors(self.path):
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

    async def _breaker_admit(self, *args: Any) -> tuple[bool, BreakerState, BreakerState]:
        return await self._run("breaker_admit", *args)

    async def _breaker_record(self, *args: Any) -> tuple[BreakerState, BreakerState]:
        return await self._run("breaker_record", *args)

    async def breaker_state(self, name: str) -> BreakerState:
        """The current state of breaker `name` (closed when never used)."""
        return await self._run("breaker_state", name)

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


# ---------------------------------------------------------------------------------------
# Redis: one hash per record; times arrive as ARGV strings written by Python (repr of a
# float), so Lua compares times and never formats one it computed.

_CLAIM_LUA = """
local r = redis.call('HMGET', KEYS[1], 'fp', 'state', 'token', 'lease', 'exp', 'result')
local now = tonumber(ARGV[2])
if r[1] and tonumber(r[5]) > now then
  if r[1] ~= ARGV[1] then return {'conflict', false, r[1]} end
  if r[2] == 'done' then return {'replay', r[6], r[1]} end
  -- our own token: this call was retried after its reply was lost, the claim is ours
  if tonumber(r[4]) > now and r[3] ~= ARGV[6] then return {'in_flight', false, r[1]} end
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'in_flight', 'token', ARGV[6],
           'lease', ARGV[3], 'exp', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return {'claimed', false, ARGV[1]}
"""

_FINISH_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'state', 'done', 'result', ARGV[2], 'exp', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
"""

_RELEASE_LUA = """
local r = redis.call('HMGET', KEYS[1], 'state', 'token')
if r[1] == 'in_flight' and (ARGV[1] == '' or r[2] == ARGV[1]) then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RENEW_LUA = """
local r = redis.call('HMGET', KEYS[1], 'state', 'token', 'exp')
if r[1] == 'in_flight' and tonumber(r[3]) > tonumber(ARGV[1])
   and (ARGV[3] == '' or r[2] == ARGV[3]) then
  redis.call('HSET', KEYS[1], 'lease', ARGV[2])
  return 1
end
return 0
"""

# Mirrors _admit. Returns allowed, then state, failures, opened_at before and after.
_ADMIT_LUA = """
local r = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at', 'probe_at')
local state, failures, opened = r[1] or 'closed', r[2] or '0', r[3]
local now, reset = tonumber(ARGV[1]), tonumber(ARGV[2])
if state == 'closed' then
  return {1, state, failures, opened, state, failures, opened}
end
if state == 'open' then
  if now < tonumber(opened) + reset then
    return {0, state, failures, opened, state, failures, opened}
  end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_at', ARGV[1])
  return {1, state, failures, opened, 'half_open', failures, opened}
end
if now < tonumber(r[4]) + reset then
  return {0, state, failures, opened, state, failures, opened}
end
redis.call('HSET', KEYS[1], 'probe_at', ARGV[1])
return {1, state, failures, opened, state, failures, opened}
"""

# Mirrors _record. Returns state, failures, opened_at before and after.
_RECORD_LUA = """
local r = redis.call('HMGET', KEYS[1], 'state', 'failures', 'opened_at')
local state, failures, opened = r[1] or 'closed', tonumber(r[2] or '0'), r[3]
if ARGV[2] == '1' then
  redis.call('DEL', KEYS[1])
  return {state, failures, opened, 'closed', 0, false}
end
local after = failures + 1
if state == 'half_open' or (state == 'closed' and after >= tonumber(ARGV[3])) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'failures', after, 'opened_at', ARGV[1])
  redis.call('HDEL', KEYS[1], 'probe_at')
  return {state, failures, opened, 'open', after, ARGV[1]}
end
redis.call('HSET', KEYS[1], 'state', state, 'failures', after)
return {state, failures, opened, state, after, opened}
"""

_PUT_LUA = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'value', ARGV[1])
if ARGV[2] then
  redis.call('HSET', KEYS[1], 'exp', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
"""

# A sorted set scored by each member's expiry ('inf': kept for good).
_ADD_SEEN_LUA = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local new = {}
for i = 3, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then new[#new + 1] = ARGV[i] end
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[i])
end
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2]
if last == 'inf' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIRE', KEYS[1], math.ceil((tonumber(last) - now) * 1000))
end
return new
"""


def _ms(seconds: float) -> int:
    """A Redis expiry in whole milliseconds, never zero."""
    return max(1, math.ceil(seconds * 1000))


def _optional_float(value: str | None) -> float | None:
    return None if value is None else float(value)


def _breaker_state(state: str, failures: Any, opened_at: str | None) -> BreakerState:
    return BreakerState(state, int(failures), _optional_float(opened_at))  # type: ignore[arg-type]


class RedisStore(Store):
    """The store on a Redis server, shared by every process that uses the same prefix.

    Use one instance from one event loop (redis.asyncio binds its connections to it).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = REDIS_PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self.url = url
        self.prefix = prefix
        self._redis: redis.asyncio.Redis | None = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            retry=_REDIS_RETRY,
        )
        register = self._redis.register_script
        self._claim_script = register(_CLAIM_LUA)
        self._finish_script = register(_FINISH_LUA)
        self._release_script = register(_RELEASE_LUA)
        self._renew_script = register(_RENEW_LUA)
        self._admit_script = register(_ADMIT_LUA)
        self._record_script = register(_RECORD_LUA)
        self._add_seen_script = register(_ADD_SEEN_LUA)
        self._put_script = register(_PUT_LUA)

    def __repr__(self) -> str:
        closed = "" if self._redis else ", closed"
        return f"RedisStore({_mask(self.url)!r}, prefix={self.prefix!r}{closed})"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[redis.asyncio.Redis]:
        """The client, with redis' errors translated into StoreError (the one place)."""
        if self._redis is None:
            raise StoreError(f"{self!r} is closed")
        try:
            yield self._redis
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {_mask(self.url)}: {exc}") from exc

    def _key(self, kind: str, key: str) -> str:
        return f"{self.prefix}{kind}:{key}"

    async def _claim(
        self,
        key: str,
        fp: str,
        now: float,
        lease_until: float,
        expires_at: float,
        ttl_s: float,
        token: str,
    ) -> Claim:
        with self._errors():
            state, result, stored_fp = await self._claim_script(
                keys=[self._key("idem", key)],
                args=[fp, repr(now), repr(lease_until), repr(expires_at), _ms(ttl_s), token],
            )
        if state == "replay":
            return Claim("replay", json.loads(result), stored_fp)
        return Claim(state, None, stored_fp, token if state == "claimed" else None)

    async def _finish(
        self, key: str, fp: str, result: str, expires_at: float, ttl_s: float
    ) -> None:
        with self._errors():
            await self._finish_script(
                keys=[self._key("idem", key)], args=[fp, result, repr(expires_at), _ms(ttl_s)]
            )

    async def _release(self, key: str, token: str) -> bool:
        with self._errors():
            return bool(await self._release_script(keys=[self._key("idem", key)], args=[token]))

    async def _renew(self, key: str, now: float, lease_until: float, token: str) -> bool:
        with self._errors():
            renewed = await self._renew_script(
                keys=[self._key("idem", key)], args=[repr(now), repr(lease_until), token]
            )
        return bool(renewed)

    async def _breaker_admit(
        self, name: str, now: float, reset_s: float
    ) -> tuple[bool, BreakerState, BreakerState]:
        with self._errors():
            reply = await self._admit_script(
                keys=[self._key("breaker", name)], args=[repr(now), repr(reset_s)]
            )
        return bool(reply[0]), _breaker_state(*reply[1:4]), _breaker_state(*reply[4:7])

    async def _breaker_record(
        self, name: str, now: float, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        with self._errors():
            reply = await self._record_script(
                keys=[self._key("breaker", name)],
                args=[repr(now), "1" if success else "0", threshold],
            )
        return _breaker_state(*reply[0:3]), _breaker_state(*reply[3:6])

    async def breaker_state(self, name: str) -> BreakerState:
        """The current state of breaker `name` (closed when never used)."""
        with self._errors() as client:
            state, failures, opened_at = await client.hmget(
                self._key("breaker", name), ["state", "failures", "opened_at"]
            )
        if state is None:
            return CLOSED
        return _breaker_state(state, failures, opened_at)

    async def _get_json(self, key: str, now: float) -> Any | None:
        with self._errors() as client:
            value, expires_at = await client.hmget(self._key("kv", key), ["value", "exp"])
        if value is None or (expires_at is not None and float(expires_at) <= now):
            return None
        return json.loads(value)

    async def _put_json(
        self, key: str, value: str, expires_at: float | None, ttl_s: float | None
    ) -> None:
        expiry = [] if expires_at is None or ttl_s is None else [repr(expires_at), _ms(ttl_s)]
        with self._errors():
            await self._put_script(keys=[self._key("kv", key)], args=[value, *expiry])

    async def _add_seen(
        self, key: str, members: list[str], now: float, expires_at: float | None
    ) -> list[str]:
        score = "inf" if expires_at is None else repr(expires_at)
        with self._errors():
            return list(
                await self._add_seen_script(
                    keys=[self._key("seen", key)], args=[repr(now), score, *members]
                )
            )

    async def _unseen(self, key: str, members: list[str], now: float) -> list[str]:
        with self._errors() as client:
            scores = await client.zmscore(self._key("seen", key), members)
        pairs = zip(members, scores, strict=True)
        return [member for member, score in pairs if score is None or score <= now]

    async def close(self) -> None:
        """Close the connections; idempotent."""
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()


# ---------------------------------------------------------------------------------------


def _check_redis(url: str) -> None:
    """Raise ConfigError in one line when the Redis at `url` does not answer a PING."""
    where = f"corral: CORRAL_REDIS_URL={_mask(url)!r} is unusable"
    try:
        client = redis.Redis.from_url(
            url,
            socket_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            retry=None,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}; expected a redis:// or rediss:// URL") from None
    try:
        client.ping()
    except redis.RedisError as exc:
        reason = " ".join(str(exc).split())
        raise ConfigError(
            f"{where}: Redis does not answer ({reason}); start it or unset CORRAL_REDIS_URL "
            "to keep state in SQLite under CORRAL_STATE_DIR"
        ) from None
    finally:
        client.close()


def open_store(settings: Settings, *, clock: Callable[[], float] = time.time) -> Store:
    """The deployment's store: Redis when CORRAL_REDIS_URL is set, else SQLite in CORRAL_STATE_DIR.

    Raises ConfigError, in one line naming the variable, when the store cannot be used.
    """
    if settings.redis_url:
        _check_redis(settings.redis_url)
        return RedisStore(settings.redis_url, clock=clock)
    state_dir = Path(settings.state_dir)
    where = f"corral: CORRAL_STATE_DIR={str(state_dir)!r} is unusable"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{where}: {reason}; point it at a writable directory") from None
    try:
        return SqliteStore(state_dir / DB_NAME, clock=clock)
    except StoreError as exc:
        raise ConfigError(f"{where}: {exc}; point it at a writable directory") from None
