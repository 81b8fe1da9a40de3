"""Run records, workflows and heartbeats on Redis (CORRAL_REDIS_URL).

A run is a hash (doc, v, status, workflow) plus a member of one sorted set ordered by
sort key (all scores 0, ordered by the member's bytes), which lists runs newest first.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from corral.runtime.store._base import _mask
from corral.runtime.store._redis import REDIS_PREFIX, redis_socket
from corral.service._changes import RING_RECORD_MAX, Changes, RedisChanges
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
from corral.service.records._sqlite import WORKER_RETENTION_S

LIST_BATCH = 200  # index members read at a time while filtering a list
_RETRY = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)

# The two run scripts name KEYS[1..5] alike (`_run_keys`): the run's hash, the finished
# counts, the `runs` channel, the run's event stream and the `events` channel. The `runs`
# channel tells other processes that a run finished (RedisChanges); it is published only
# then, naming the run (the run id argument, else '') and carrying its record when that is
# at most RING_RECORD_MAX bytes long (`finished_ring`). The count is of (workflow, status)
# pairs, joined by a newline (neither holds one: ids are checked). Both start with
# _RING_LUA and end with _APPEND_EVENTS_LUA: the events, the arguments after the five fixed
# ones, are appended to the run's stream in the same write, then the `events` channel is
# published.
_RING_LUA = f"""
local function ring(run_id, doc)
  if #doc <= {RING_RECORD_MAX} then return run_id .. string.char(10) .. doc end
  return run_id
end
"""
_APPEND_EVENTS_LUA = """
if #ARGV > 5 then
  redis.call('RPUSH', KEYS[4], unpack(ARGV, 6))
  redis.call('PUBLISH', KEYS[5], '1')
end
return 1
"""

# KEYS[6] is the index of runs; ARGV: doc, status, workflow, sort key, the run id when
# finished, then the events.
_CREATE_LUA = (
    _RING_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'v', 1, 'doc', ARGV[1], 'status', ARGV[2], 'workflow', ARGV[3])
redis.call('ZADD', KEYS[6], 0, ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HINCRBY', KEYS[2], ARGV[3] .. string.char(10) .. ARGV[2], 1)
  redis.call('PUBLISH', KEYS[3], ring(ARGV[5], ARGV[1]))
end
"""
    + _APPEND_EVENTS_LUA
)

# ARGV: the version written over, doc, status, workflow, the run id when finished, then the
# events.
_WRITE_LUA = (
    _RING_LUA
    + """
local r = redis.call('HMGET', KEYS[1], 'v', 'status')
if r[1] ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'v', tonumber(ARGV[1]) + 1, 'doc', ARGV[2], 'status', ARGV[3])
if ARGV[5] ~= '' then
  if r[2] ~= ARGV[3] then
    redis.call('HINCRBY', KEYS[2], ARGV[4] .. string.char(10) .. ARGV[3], 1)
  end
  redis.call('PUBLISH', KEYS[3], ring(ARGV[5], ARGV[2]))
end
"""
    + _APPEND_EVENTS_LUA
)


# KEYS[1]: the index; ARGV[1]: the cutoff; ARGV[2]: the key prefix; ARGV[3]: how many to
# remove at most; ARGV[4..]: index members. A run goes (hash, events, index entry) only if
# it is still finished before the cutoff when the script runs: a retry in between keeps it.
_PRUNE_LUA = """
local removed = {}
for i = 4, #ARGV do
  if #removed >= tonumber(ARGV[3]) then break end
  local member = ARGV[i]
  local id = string.sub(member, string.find(member, ':', 1, true) + 1)
  local key = ARGV[2] .. 'run:' .. id
  local status = redis.call('HGET', key, 'status')
  if status == 'succeeded' or status == 'failed' or status == 'cancelled' then
    local doc = cjson.decode(redis.call('HGET', key, 'doc'))
    local finished = doc['finished_at']
    if type(finished) == 'number' and finished < tonumber(ARGV[1]) then
      redis.call('DEL', key, ARGV[2] .. 'events:' .. id)
      redis.call('ZREM', KEYS[1], member)
      table.insert(removed, id)
    end
  elseif not status then
    redis.call('ZREM', KEYS[1], member)
  end
end
return removed
"""

# A connection is a hash (secret, doc); a rotation writes only over the secret it read.
_PUT_CONNECTION_LUA = """
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'secret') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'secret', ARGV[1], 'doc', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class RedisRecords(Records):
    """The records on the Redis at `url`, under `prefix`. Use one instance from one loop."""

    kind = "redis"

    def __init__(self, url: str, *, prefix: str = REDIS_PREFIX) -> None:
        self.url = url
        self.prefix = prefix
        self._index = f"{prefix}runs"
        self._workflows = f"{prefix}workflows"
        self._workers = f"{prefix}workers"
        self._counts = f"{prefix}run_counts"
        self._apps = f"{prefix}connections"
        self._meta = f"{prefix}meta"
        try:
            self._redis: redis.asyncio.Redis | None = redis.asyncio.Redis.from_url(
                url,
                decode_responses=True,
                retry=_RETRY,
                **redis_socket(url),
            )
        except ValueError as exc:
            raise RecordsError(f"Redis at {_mask(url)}: {exc}") from None
        self._create = self._redis.register_script(_CREATE_LUA)
        self._write = self._redis.register_script(_WRITE_LUA)
        self._put_connection = self._redis.register_script(_PUT_CONNECTION_LUA)
        self._prune = self._redis.register_script(_PRUNE_LUA)
        self._changes = RedisChanges(self._redis, f"{prefix}changes:")

    def __repr__(self) -> str:
        closed = "" if self._redis else ", closed"
        return f"RedisRecords({_mask(self.url)!r}, prefix={self.prefix!r}{closed})"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[redis.asyncio.Redis]:
        """The client, with redis' errors translated into RecordsError (the one place)."""
        if self._redis is None:
            raise RecordsError(f"{self!r} is closed")
        try:
            yield self._redis
        except redis.RedisError as exc:
            raise RecordsError(f"Redis at {_mask(self.url)}: {exc}") from exc

    def _run_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    async def create_run(
        self, run: dict[str, Any], *, events: list[dict[str, Any]] | None = None
    ) -> bool:
        """Store a new run record, with `events` as the start of its stream, in one write;
        False (nothing changes) when its id is taken."""
        finished = run["id"] if run["status"] in FINISHED else ""
        args = [_dumps(run), run["status"], run["workflow"], sort_key(run), finished]
        with self._errors():
            created = await self._create(
                keys=[*self._run_keys(run["id"]), self._index],
                args=args + [_dumps(e) for e in events or []],
            )
        return bool(created)

    async def _read_run(self, run_id: str) -> tuple[dict[str, Any], int] | None:
        with self._errors() as client:
            doc, version = await client.hmget(self._run_key(run_id), ["doc", "v"])
        return None if doc is None else (json.loads(doc), int(version))

    async def _write_run(
        self, run: dict[str, Any], version: int, events: list[dict[str, Any]]
    ) -> bool:
        finished = run["id"] if run["status"] in FINISHED else ""
        args = [version, _dumps(run), run["status"], run["workflow"], finished]
        with self._errors():
            written = await self._write(
                keys=self._run_keys(run["id"]), args=args + [_dumps(e) for e in events]
            )
        return bool(written)

    def _run_keys(self, run_id: str) -> list[str]:
        """The keys every write of a run's record names (the run scripts' KEYS[1..5])."""
        return [self._run_key(run_id), self._counts, self._changes.channel("runs"),
                self._events_key(run_id), self._changes.channel("events")]  # fmt: skip

    def _events_key(self, run_id: str) -> str:
        return f"{self.prefix}events:{run_id}"

    async def append_event(self, run_id: str, event: dict[str, Any]) -> int:
        """Add an event to a run's stream; its sequence number."""
        with self._errors() as client:
            async with client.pipeline(transaction=False) as pipe:
                pipe.rpush(self._events_key(run_id), _dumps(event))
                pipe.publish(self._changes.channel("events"), "1")
                seq, _ = await pipe.execute()
        return int(seq)

    async def run_statuses(self, run_ids: list[str]) -> dict[str, str | None]:
        """The status of each of `run_ids` (None for a run that does not exist), one trip."""
        with self._errors() as client:
            async with client.pipeline(transaction=False) as pipe:
                for run_id in run_ids:
                    pipe.hget(self._run_key(run_id), "status")
                statuses = await pipe.execute()
        return dict(zip(run_ids, statuses, strict=True))

    async def append_events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Add `(run id, event)` pairs to their runs' streams, in one round trip."""
        with self._errors() as client:
            async with client.pipeline(transaction=False) as pipe:
                for run_id, event in events:
                    pipe.rpush(self._events_key(run_id), _dumps(event))
                pipe.publish(self._changes.channel("events"), "1")
                await pipe.execute()

    async def run_events(self, run_id: str, *, after: int = 0) -> list[tuple[int, dict[str, Any]]]:
        """A run's events after sequence number `after`, in order."""
        with self._errors() as client:
            found = await client.lrange(self._events_key(run_id), after, -1)
        return [(after + n + 1, json.loads(doc)) for n, doc in enumerate(found)]

    async def finished_counts(self) -> dict[tuple[str, str], int]:
        """How many runs finished, by (workflow, status), ever."""
        with self._errors() as client:
            counts = await client.hgetall(self._counts)
        return {tuple(key.split("\n", 1)): int(n) for key, n in counts.items()}  # type: ignore[misc]

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
        upper = "+" if cursor is None else f"({cursor}"
        lower = "-" if since is None else f"[{since_key(since)}"
        found: list[dict[str, Any]] = []
        with self._errors() as client:
            while len(found) <= limit:
                members = await client.zrevrangebylex(
                    self._index, upper, lower, start=0, num=LIST_BATCH
                )
                if not members:
                    break
                async with client.pipeline(transaction=False) as pipe:
                    for member in members:
                        pipe.hmget(self._run_key(member.split(":", 1)[1]), ["doc"])
                    docs = await pipe.execute()
                for (doc,) in docs:
                    if doc is None:
                        continue
                    run = json.loads(doc)
                    if (status is None or run["status"] == status) and (
                        workflow is None or run["workflow"] == workflow
                    ):
                        found.append(run)
                upper = f"({members[-1]}"
        more = len(found) > limit
        found = found[:limit]
        return [run_summary(run) for run in found], sort_key(found[-1]) if more else None

    async def prune_runs(self, *, finished_before: float, limit: int = PRUNE_BATCH) -> list[str]:
        """Remove up to `limit` runs finished before `finished_before`, with their events."""
        removed: list[str] = []
        upper = f"({since_key(finished_before)}"
        lower = "-"
        with self._errors() as client:
            while len(removed) < limit:
                members = await client.zrangebylex(
                    self._index, lower, upper, start=0, num=LIST_BATCH
                )
                if not members:
                    break
                removed += await self._prune(
                    keys=[self._index],
                    args=[finished_before, self.prefix, limit - len(removed), *members],
                )
                lower = f"({members[-1]}"
        return removed

    async def put_workflow(self, definition: dict[str, Any], now: float) -> None:
        """Store (or replace) a workflow under its id."""
        entry = _dumps({"definition": definition, "updated_at": now})
        with self._errors() as client:
            await client.hset(self._workflows, str(definition["id"]), entry)

    async def get_workflow(self, workflow_id: str) -> dict[str, Any] | None:
        """A stored workflow's definition, or None."""
        with self._errors() as client:
            entry = await client.hget(self._workflows, workflow_id)
        return None if entry is None else json.loads(entry)["definition"]

    async def delete_workflow(self, workflow_id: str) -> bool:
        """Remove a stored workflow; False when there was none."""
        with self._errors() as client:
            return bool(await client.hdel(self._workflows, workflow_id))

    async def list_workflows(self) -> list[dict[str, Any]]:
        """Every stored workflow: `{"id", "definition", "updated_at"}`, by id."""
        with self._errors() as client:
            entries = await client.hgetall(self._workflows)
        return [{"id": wid, **json.loads(entries[wid])} for wid in sorted(entries)]

    def _connection_key(self, app: str) -> str:
        return f"{self.prefix}connection:{app}"

    async def put_connection(
        self, connection: dict[str, Any], *, expect_secret: str | None = None
    ) -> bool:
        """Store a connection (its credentials encrypted); see Records."""
        app = connection["app"]
        with self._errors():
            written = await self._put_connection(
                keys=[self._connection_key(app), self._apps],
                args=[connection["secret"], _dumps(connection), expect_secret or "", app],
            )
        return bool(written)

    async def get_connection(self, app: str) -> dict[str, Any] | None:
        """A stored connection, or None."""
        with self._errors() as client:
            doc = await client.hget(self._connection_key(app), "doc")
        return None if doc is None else json.loads(doc)

    async def delete_connection(self, app: str) -> bool:
        """Remove a stored connection; False when there was none."""
        with self._errors() as client:
            await client.srem(self._apps, app)
            return bool(await client.delete(self._connection_key(app)))

    async def list_connections(self) -> list[dict[str, Any]]:
        """Every stored connection, by app."""
        with self._errors() as client:
            apps = sorted(await client.smembers(self._apps))
            found = [await client.hget(self._connection_key(app), "doc") for app in apps]
        return [json.loads(doc) for doc in found if doc is not None]

    async def get_meta(self, key: str) -> str | None:
        """A value kept under `key`, or None."""
        with self._errors() as client:
            return await client.hget(self._meta, key)

    async def put_meta(self, key: str, value: str, *, only_new: bool = False) -> bool:
        """Keep `value` under `key`; with `only_new`, only if there is none."""
        with self._errors() as client:
            if only_new:
                return bool(await client.hsetnx(self._meta, key, value))
            await client.hset(self._meta, key, value)
            return True

    async def beat(self, worker: dict[str, Any]) -> None:
        """Record a worker's heartbeat (and drop those silent for a day)."""
        with self._errors() as client:
            await client.hset(self._workers, worker["id"], _dumps(worker))
            entries = await client.hgetall(self._workers)
            old = worker["last_heartbeat"] - WORKER_RETENTION_S
            stale = [w for w, doc in entries.items() if json.loads(doc)["last_heartbeat"] < old]
            if stale:
                await client.hdel(self._workers, *stale)

    async def workers(self, *, seen_since: float) -> list[dict[str, Any]]:
        """Workers whose last heartbeat is at or after `seen_since`, by id."""
        with self._errors() as client:
            entries = await client.hgetall(self._workers)
        docs = [json.loads(entries[w]) for w in sorted(entries)]
        return [doc for doc in docs if doc["last_heartbeat"] >= seen_since]

    def changes(self) -> Changes:
        """`runs` and `events`, published by every process's writes (RedisChanges)."""
        return self._changes

    async def ping(self) -> None:
        """Return when Redis takes a write; raise RecordsError otherwise."""
        with self._errors() as client:
            await client.set(f"{self.prefix}records:ping", "1", px=1000)

    async def close(self) -> None:
        """Close the connections; idempotent."""
        client, self._redis = self._redis, None
        if client is not None:
            await self._changes.close()
            await client.aclose()
