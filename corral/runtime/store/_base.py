"""The store's interface, its records and the circuit-breaker transitions both
implementations apply."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import math
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, NamedTuple, Self

from corral._exceptions import ConfigError

#: How long a claim is held before another worker may take it over as abandoned. A node's
#: default retry budget (3 attempts x 15 s time-out, backoff up to 2 x 10 s) fits inside;
#: nodes that may run longer `renew` their lease.
DEFAULT_LEASE_S = 120.0

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

#: A breaker's answer to one call: (allowed, state before, state after).
Admission = tuple[bool, BreakerState, BreakerState]


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

    async def breaker_admit(self, name: str, *, reset_ms: int) -> Admission:
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

    # -- a call's first and last steps, each one round trip ------------------------------

    async def claim_and_admit(
        self,
        key: str,
        fingerprint: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        ttl_s: int,
        breaker: str,
        reset_ms: int,
    ) -> tuple[Claim, Admission | None]:
        """`claim`, then `breaker_admit` of `breaker` only when the key was claimed (else
        None), in one round trip to the store: what a call's first attempt asks. When it
        fails (or is cancelled), a claim it may have made is released."""
        _positive("lease_s", lease_s)
        _positive("ttl_s", ttl_s)
        _positive("reset_ms", reset_ms)
        now, token = self.clock(), uuid.uuid4().hex
        claim = (key, fingerprint, now, now + lease_s, now + ttl_s, ttl_s, token)
        try:
            return await self._claim_and_admit(claim, breaker, reset_ms / 1000)
        except BaseException:
            # The claim may be written and the admission not: give back the key (only if
            # this call holds it), or other runs would wait for its lease to lapse.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._release(key, token))
            raise

    async def record_and_finish(
        self,
        key: str,
        fingerprint: str,
        result: dict[str, Any],
        *,
        ttl_s: int,
        breaker: str,
        threshold: int,
    ) -> tuple[BreakerState, BreakerState]:
        """`breaker_record` of a success of `breaker`, then `finish` of the claimed `key`,
        in one round trip to the store: what a call that succeeded ends with."""
        _positive("ttl_s", ttl_s)
        _positive("threshold", threshold)
        encoded = json.dumps(result, separators=(",", ":"))
        now = self.clock()
        finish = (key, fingerprint, encoded, now + ttl_s, ttl_s)
        return await self._record_and_finish(finish, breaker, now, threshold)

    @abc.abstractmethod
    async def breaker_state(self, name: str) -> BreakerState:
        """The current state of breaker `name` (closed when never used)."""

    @abc.abstractmethod
    async def breakers(self) -> dict[str, BreakerState]:
        """Every breaker that is not plainly closed (open, half-open, or counting failures),
        by name."""

    @abc.abstractmethod
    async def reset_breaker(self, name: str) -> bool:
        """Close breaker `name` by hand and clear its failures; False when it was closed."""

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
    async def _breaker_admit(self, name: str, now: float, reset_s: float) -> Admission: ...

    @abc.abstractmethod
    async def _breaker_record(
        self, name: str, now: float, success: bool, threshold: int
    ) -> tuple[BreakerState, BreakerState]: ...

    @abc.abstractmethod
    async def _claim_and_admit(
        self, claim: tuple[Any, ...], name: str, reset_s: float
    ) -> tuple[Claim, Admission | None]:
        """`_claim(*claim)`, then `_breaker_admit(name, now, reset_s)` only when it claimed,
        in one round trip (`claim` holds `_claim`'s arguments, `now` the third)."""

    @abc.abstractmethod
    async def _record_and_finish(
        self, finish: tuple[Any, ...], name: str, now: float, threshold: int
    ) -> tuple[BreakerState, BreakerState]:
        """`_breaker_record` of a success, then `_finish(*finish)`, in one round trip."""

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
