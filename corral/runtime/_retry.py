"""RetryManager: the retry policy, the circuit breaker and idempotent replays (DESIGN §7).

Host side. `execute_with_retry` claims the node's idempotency key (a
finished key replays its stored result without running; a key held by
another live run waits for it; the same key with other params is
`idempotency_conflict`), then attempts the call under the breaker of its
connector/node pair, whose state lives in the store so that every process
shares it, retrying what is worth retrying with exponential backoff and full
jitter. Each failed attempt, retry, breaker transition and replay is an event.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

from corral._exceptions import (
    CircuitOpen,
    HttpError,
    IdempotencyConflict,
    InvalidInput,
    SandboxError,
)
from corral.config import Settings
from corral.runtime import _events as events
from corral.runtime.store import DEFAULT_LEASE_S, Admission, BreakerState, Store

#: Retried whatever the policy says about others: the failure is likely to pass.
RETRYABLE_TYPES = frozenset({"timeout", "heartbeat_timeout", "sandbox_crash", "aborted"})
RETRYABLE_STATUSES = frozenset({408, 429})  # and every 5xx; a connection error has no status
#: Failures that tell of the upstream's health: only these count toward opening a breaker.
#: (The code's own errors, policy refusals, limits and 4xx answers do not: a caller could
#: otherwise open a breaker others depend on with failures of its own making.)
UPSTREAM_FAILURES = frozenset({"timeout", "heartbeat_timeout", "sandbox_crash"})
_IN_FLIGHT_POLL_S = (0.05, 1.0)  # waiting for another run that holds the key: first, longest
#: Bounds of what a node's own "retry" may ask: a run must end in reasonable time.
MAX_ATTEMPTS, MAX_INTERVAL_MS, MAX_COEFFICIENT = 20, 300_000, 10


@dataclass(frozen=True)
class RetryPolicy:
    """How a node is retried. Bounded defaults: 3 attempts, 200 ms doubling up to 10 s."""

    max_attempts: int = 3
    initial_interval_ms: int = 200
    backoff_coefficient: float = 2.0
    max_interval_ms: int = 10_000
    non_retryable: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """CORRAL_RETRY_MAX_ATTEMPTS, CORRAL_RETRY_INITIAL_MS and CORRAL_RETRY_MAX_MS."""
        return cls(
            max_attempts=settings.retry_max_attempts,
            initial_interval_ms=settings.retry_initial_ms,
            max_interval_ms=settings.retry_max_ms,
        )

    def with_overrides(self, overrides: Any, where: str = "retry") -> RetryPolicy:
        """A copy with a node's `"retry"` object applied; InvalidInput naming a bad field."""
        return _overridden(self, overrides, where)

    def __post_init__(self) -> None:
        _whole("max_attempts", self.max_attempts, 1, MAX_ATTEMPTS)
        _whole("initial_interval_ms", self.initial_interval_ms, 0, MAX_INTERVAL_MS)
        _whole("max_interval_ms", self.max_interval_ms, 0, MAX_INTERVAL_MS)
        coefficient = self.backoff_coefficient
        if (
            isinstance(coefficient, bool)
            or not isinstance(coefficient, int | float)
            or not (1 <= coefficient <= MAX_COEFFICIENT)
        ):
            raise ValueError(f"backoff_coefficient must be a number from 1 to {MAX_COEFFICIENT}")
        if not all(isinstance(name, str) for name in self.non_retryable):
            raise ValueError("non_retryable must be a list of error types")
        object.__setattr__(self, "non_retryable", frozenset(self.non_retryable))

    def retryable(self, error: SandboxError) -> bool:
        """Whether `error` is worth another attempt (DESIGN §7)."""
        if error.type in self.non_retryable:
            return False
        if isinstance(error, HttpError):
            return (
                error.status is None or error.status in RETRYABLE_STATUSES or (error.status >= 500)
            )
        return error.type in RETRYABLE_TYPES

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform between 0 and the capped exponential interval of `attempt`."""
        ceiling = min(
            self.max_interval_ms,
            self.initial_interval_ms * self.backoff_coefficient ** (attempt - 1),
        )
        return rng.uniform(0, ceiling) / 1000


@dataclass(frozen=True)
class CircuitBreakerPolicy:
    """When a connector/node pair's breaker opens (consecutive failures) and for how long."""

    failure_threshold: int = 5
    reset_ms: int = 30_000

    @classmethod
    def from_settings(cls, settings: Settings) -> CircuitBreakerPolicy:
        """CORRAL_BREAKER_FAILURE_THRESHOLD and CORRAL_BREAKER_RESET_MS."""
        return cls(settings.breaker_failure_threshold, settings.breaker_reset_ms)

    def with_overrides(self, overrides: Any, where: str = "breaker") -> CircuitBreakerPolicy:
        """A copy with a node's `"breaker"` object applied; InvalidInput naming a bad field."""
        return _overridden(self, overrides, where)

    def __post_init__(self) -> None:
        _whole("failure_threshold", self.failure_threshold, 1, 1000)
        _whole("reset_ms", self.reset_ms, 1, MAX_INTERVAL_MS * 12)


def _whole(name: str, value: Any, low: int, high: int) -> None:
    """A whole number from `low` to `high`, or ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, not {value!r}")


def _overridden(policy: Any, overrides: Any, where: str) -> Any:
    if overrides is None:
        return policy
    if not isinstance(overrides, dict):
        raise InvalidInput(f"{where}: must be an object")
    known = {f.name: f.type for f in fields(policy)}
    unknown = set(overrides) - set(known)
    if unknown:
        raise InvalidInput(
            f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )
    try:
        values = {
            name: frozenset(value) if name == "non_retryable" else value
            for name, value in overrides.items()
        }
        return replace(policy, **values)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: {exc}") from None


@dataclass(frozen=True)
class RetryOutcome:
    """What execute_with_retry ended with: the stored record or the error, and how."""

    record: dict[str, Any] | None  # {"output", "executor", "fallback_reason", "execution_ms"}
    error: SandboxError | None
    attempts: int
    replayed: bool
    circuit_state: str

    @property
    def ok(self) -> bool:
        """Whether the node succeeded (ran or replayed)."""
        return self.error is None


class RetryManager:
    """Runs a node's call with idempotency, its breaker and its retry policy."""

    def __init__(
        self,
        store: Store,
        *,
        idempotency_ttl_s: int = 86_400,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
        claim_lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        self.store = store
        self.idempotency_ttl_s = idempotency_ttl_s
        # How long a node's claim outlives a process that died holding it; renewed every
        # third of it while the node runs or waits to retry.
        self.claim_lease_s = claim_lease_s
        self._sleep = sleep
        self._rng = rng or random.Random()

    async def execute_with_retry(
        self,
        call: Callable[[], Awaitable[dict[str, Any]]],
        *,
        connector: str,
        node: str,
        key: str,
        fingerprint: str,
        policy: RetryPolicy,
        breaker: CircuitBreakerPolicy,
        context: dict[str, Any] | None = None,
        destination: str = "",
        function: str = "",
    ) -> RetryOutcome:
        """Run `call` (which returns the record to store) at most once per `key`.

        The breaker is the connector/node pair's, for `destination` (where the calls go:
        callers of another deployment of the API do not share it). `context` adds fields
        (run id, ...) to every event. Metrics are labelled by connector and `function` (the
        connector's action; `node` when not given), never by a workflow's node id.
        """
        about = {"connector": connector, "node": node, "function": function or node,
                 **(context or {})}  # fmt: skip
        labels = (connector, about["function"])
        name = f"{connector}/{node}" + (f"@{destination}" if destination else "")
        try:
            replayed, token, admission = await self._claim(key, fingerprint, about, name, breaker)
        except IdempotencyConflict as conflict:
            state = await self.store.breaker_state(name)
            events.emit("node.conflict", **about, key=key)
            return RetryOutcome(None, conflict, 0, False, state.state)
        if replayed is not None:
            state = await self.store.breaker_state(name)
            return RetryOutcome(replayed, None, 0, True, state.state)
        attempt, state = 0, "closed"
        try:
            while True:
                attempt += 1
                if attempt > 1:  # a long node keeps its claim
                    await self.store.renew(key, lease_s=self.claim_lease_s, token=token)
                    admission = await self.store.breaker_admit(name, reset_ms=breaker.reset_ms)
                assert admission is not None  # the claim's, for the first attempt
                admitted, before, after = admission
                self._transition(about, before, after)
                state = after.state
                if not admitted:
                    retry_at = (after.opened_at or time.time()) + breaker.reset_ms / 1000
                    error = CircuitOpen(
                        f"the circuit breaker of {name} is {after.state.replace('_', '-')} after "
                        f"{after.failures} consecutive failures; it lets a probe through in "
                        f"{max(0.0, retry_at - time.time()):.1f} s"
                    )
                    events.ATTEMPTS.labels(*labels, error.type).inc()
                    events.emit("node.circuit_open", **about, attempt=attempt, error=error.message)
                    await self.store.release(key, token=token)
                    return RetryOutcome(None, error, attempt, False, state)
                renewal = asyncio.ensure_future(self._keep_claim(key, token))
                try:
                    record = await call()
                except SandboxError as error:
                    state = await self._failed(name, about, error, breaker)
                    delay = self._next_delay(policy, attempt, error)
                    events.ATTEMPTS.labels(*labels, error.type).inc()
                    events.emit(
                        "node.attempt_failed", **about, attempt=attempt, error_type=error.type,
                        error=error.message[:500], status=getattr(error, "status", None),
                        next_delay_s=None if delay is None else round(delay, 3),
                    )  # fmt: skip
                    if delay is None:
                        await self.store.release(key, token=token)
                        return RetryOutcome(None, error, attempt, False, state)
                    events.RETRIES.labels(*labels, error.type).inc()
                    events.emit("node.retry", **about, attempt=attempt + 1, delay_s=round(delay, 3))
                    await self._sleep(delay)
                    continue
                finally:
                    renewal.cancel()  # (it also kept the claim through the wait above)
                before, after = await self.store.record_and_finish(
                    key, fingerprint, record, ttl_s=self.idempotency_ttl_s, breaker=name,
                    threshold=breaker.failure_threshold,
                )  # fmt: skip
                self._transition(about, before, after)
                events.ATTEMPTS.labels(*labels, "ok").inc()
                return RetryOutcome(record, None, attempt, False, after.state)
        except BaseException:
            await asyncio.shield(self.store.release(key, token=token))  # another run may try
            raise

    async def _keep_claim(self, key: str, token: str | None) -> None:
        """Renew the claim while an attempt runs, so no other run takes the key meanwhile."""
        while True:
            await asyncio.sleep(self.claim_lease_s / 3)
            await self.store.renew(key, lease_s=self.claim_lease_s, token=token)

    async def _claim(
        self,
        key: str,
        fingerprint: str,
        about: dict[str, Any],
        name: str,
        breaker: CircuitBreakerPolicy,
    ) -> tuple[dict[str, Any] | None, str | None, Admission | None]:
        """(None, this run's claim token, breaker `name`'s admission of the first attempt)
        once it holds `key`; (the stored record, None, None) when it is a replay."""
        wait = _IN_FLIGHT_POLL_S[0]
        while True:
            claim, admission = await self.store.claim_and_admit(
                key, fingerprint, lease_s=self.claim_lease_s, ttl_s=self.idempotency_ttl_s,
                breaker=name, reset_ms=breaker.reset_ms,
            )  # fmt: skip
            if claim.state == "claimed":
                return None, claim.token, admission
            if claim.state == "replay":
                assert claim.result is not None
                events.REPLAYS.labels(about["connector"], about["function"]).inc()
                events.emit("node.replay", **about, key=key)
                return claim.result, None, None
            if claim.state == "conflict":
                raise IdempotencyConflict(
                    f"the idempotency key {key!r} was used before with other params: "
                    "give this call its own key, or the same params"
                )
            await self._sleep(wait)  # another run holds it: wait for its result
            wait = min(wait * 2, _IN_FLIGHT_POLL_S[1])

    async def _failed(
        self, name: str, about: dict[str, Any], error: SandboxError, breaker: CircuitBreakerPolicy
    ) -> str:
        status = getattr(error, "status", None)
        upstream = error.type in UPSTREAM_FAILURES or (
            isinstance(error, HttpError)
            and (status is None or status in RETRYABLE_STATUSES or status >= 500)
        )
        if not upstream:
            return (await self.store.breaker_state(name)).state
        before, after = await self.store.breaker_record(
            name, success=False, threshold=breaker.failure_threshold
        )
        self._transition(about, before, after)
        return after.state

    def _next_delay(self, policy: RetryPolicy, attempt: int, error: SandboxError) -> float | None:
        """The wait before the next attempt; None when there is none."""
        if attempt >= policy.max_attempts or not policy.retryable(error):
            return None
        delay = policy.delay_s(attempt, self._rng)
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is not None:
            if retry_after * 1000 > policy.max_interval_ms:
                return None  # the server asks for longer than the policy waits: give up now
            delay = max(delay, retry_after)
        return delay

    @staticmethod
    def _transition(about: dict[str, Any], before: BreakerState, after: BreakerState) -> None:
        if before.state != after.state:
            events.BREAKER_TRANSITIONS.labels(
                about["connector"], about["function"], before.state, after.state
            ).inc()
            events.emit(
                "breaker.transition", **about, from_state=before.state, to_state=after.state,
                failures=after.failures,
            )  # fmt: skip
