"""The store on a Redis server: every operation one Lua script or one command."""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from corral._exceptions import ConfigError
from corral.runtime.store._base import (
    CLOSED,
    Admission,
    BreakerState,
    Claim,
    Store,
    StoreError,
    _mask,
)

REDIS_PREFIX = "corral:"
REDIS_TIMEOUT_S = 5.0  # a store call answers in well under a millisecond; 5 s means it is gone
REDIS_CONNECT_TIMEOUT_S = 2.0
# corral's asyncio clients set no per-command time-out (redis-py's socket_timeout): redis-py
# times each command's send with a task of its own, a fifth of the ~40 us a command costs
# the client (bench/service.py's runs make a dozen each). The kernel watches the connection
# instead: data Redis has not acknowledged within REDIS_TIMEOUT_S (TCP_USER_TIMEOUT), or an
# idle connection whose keepalive probes go unanswered, ends it, and redis-py retries. A
# Redis that acknowledges but does not answer (stopped, or behind a proxy that hangs) is
# waited for: /readyz gives its checks a time-out of their own, and a service process's stop
# is bounded (cli/_service.py).
_KEEPALIVE = {
    socket.TCP_KEEPIDLE: 10,
    socket.TCP_KEEPINTVL: 5,
    socket.TCP_KEEPCNT: 2,
    socket.TCP_USER_TIMEOUT: int(REDIS_TIMEOUT_S * 1000),
}
# A dropped pooled connection is retried; a server that is gone surfaces within a second as
# StoreError rather than stalling every node (redis-py's default retries for ~10 s).
_REDIS_RETRY = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)


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


def _function(name: str, script: str) -> str:
    """`script` as a Lua function `name(KEYS, ARGV)`, to call from another script."""
    return f"local function {name}(KEYS, ARGV)\n{script}\nend\n"


# A call's first step: the claim, and the breaker's admission only when it claimed.
# KEYS: the record, the breaker; ARGV: _CLAIM_LUA's six, then _ADMIT_LUA's two.
_CLAIM_AND_ADMIT_LUA = (
    _function("claim", _CLAIM_LUA)
    + _function("admit", _ADMIT_LUA)
    + """
local c = claim({KEYS[1]}, {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]})
if c[1] ~= 'claimed' then return {c} end
return {c, admit({KEYS[2]}, {ARGV[7], ARGV[8]})}
"""
)

# A successful call's last step: the breaker's record of the success, then the finish.
# KEYS: the breaker, the record; ARGV: _RECORD_LUA's first and third, then _FINISH_LUA's.
_RECORD_AND_FINISH_LUA = (
    _function("record", _RECORD_LUA)
    + _function("finish", _FINISH_LUA)
    + """
local r = record({KEYS[1]}, {ARGV[1], '1', ARGV[2]})
finish({KEYS[2]}, {ARGV[3], ARGV[4], ARGV[5], ARGV[6]})
return r
"""
)

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


def _claim(reply: list[Any], token: str) -> Claim:
    """_CLAIM_LUA's reply."""
    state, result, stored_fp = reply
    if state == "replay":
        return Claim("replay", json.loads(result), stored_fp)
    return Claim(state, None, stored_fp, token if state == "claimed" else None)


def _admission(reply: list[Any]) -> Admission:
    """_ADMIT_LUA's reply."""
    return bool(reply[0]), _breaker_state(*reply[1:4]), _breaker_state(*reply[4:7])


def _breaker_states(reply: list[Any]) -> tuple[BreakerState, BreakerState]:
    """_RECORD_LUA's reply."""
    return _breaker_state(*reply[0:3]), _breaker_state(*reply[3:6])


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
            retry=_REDIS_RETRY,
            **redis_socket(url),
        )
        register = self._redis.register_script
        self._claim_script = register(_CLAIM_LUA)
        self._finish_script = register(_FINISH_LUA)
        self._release_script = register(_RELEASE_LUA)
        self._renew_script = register(_RENEW_LUA)
        self._admit_script = register(_ADMIT_LUA)
        self._record_script = register(_RECORD_LUA)
        self._claim_and_admit_script = register(_CLAIM_AND_ADMIT_LUA)
        self._record_and_finish_script = register(_RECORD_AND_FINISH_LUA)
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
            reply = await self._claim_script(
                keys=[self._key("idem", key)],
                args=[fp, repr(now), repr(lease_until), repr(expires_at), _ms(ttl_s), token],
            )
        return _claim(reply, token)

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

    async def _breaker_admit(self, name: str, now: float, reset_s: float) -> Admission:
        with self._errors():
            reply = await self._admit_script(
                keys=[self._key("breaker", name)], args=[repr(now), repr(reset_s)]
            )
        return _admission(reply)

    async def _breaker_record(
        self, name: str, now: float, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        with self._errors():
            reply = await self._record_script(
                keys=[self._key("breaker", name)],
                args=[repr(now), "1" if success else "0", threshold],
            )
        return _breaker_states(reply)

    async def _claim_and_admit(
        self, claim: tuple[Any, ...], name: str, reset_s: float
    ) -> tuple[Claim, Admission | None]:
        key, fp, now, lease_until, expires_at, ttl_s, token = claim
        with self._errors():
            reply = await self._claim_and_admit_script(
                keys=[self._key("idem", key), self._key("breaker", name)],
                args=[fp, repr(now), repr(lease_until), repr(expires_at), _ms(ttl_s), token,
                      repr(now), repr(reset_s)],
            )  # fmt: skip
        return _claim(reply[0], token), _admission(reply[1]) if len(reply) > 1 else None

    async def _record_and_finish(
        self, finish: tuple[Any, ...], name: str, now: float, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        key, fp, result, expires_at, ttl_s = finish
        with self._errors():
            reply = await self._record_and_finish_script(
                keys=[self._key("breaker", name), self._key("idem", key)],
                args=[repr(now), threshold, fp, result, repr(expires_at), _ms(ttl_s)],
            )
        return _breaker_states(reply)

    async def breaker_state(self, name: str) -> BreakerState:
        """The current state of breaker `name` (closed when never used)."""
        with self._errors() as client:
            state, failures, opened_at = await client.hmget(
                self._key("breaker", name), ["state", "failures", "opened_at"]
            )
        if state is None:
            return CLOSED
        return _breaker_state(state, failures, opened_at)

    async def breakers(self) -> dict[str, BreakerState]:
        """Every breaker that is not plainly closed, by name."""
        start = len(self._key("breaker", ""))
        found: dict[str, BreakerState] = {}
        with self._errors() as client:
            async for key in client.scan_iter(match=self._key("breaker", "*"), count=500):
                state, failures, opened_at = await client.hmget(
                    key, ["state", "failures", "opened_at"]
                )
                if state is not None:
                    found[key[start:]] = _breaker_state(state, failures, opened_at)
        return dict(sorted(found.items()))

    async def reset_breaker(self, name: str) -> bool:
        """Close breaker `name` by hand; False when it was closed."""
        with self._errors() as client:
            return bool(await client.delete(self._key("breaker", name)))

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


def redis_socket(url: str) -> dict[str, Any]:
    """The socket options of corral's asyncio Redis clients of `url` (see _KEEPALIVE)."""
    options: dict[str, Any] = {
        "socket_timeout": None,  # redis-py's default is 5 s
        "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
    }
    if urlsplit(url).scheme.lower() != "unix":  # a server that dies closes a local socket
        options.update(socket_keepalive=True, socket_keepalive_options=_KEEPALIVE)
    return options


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
