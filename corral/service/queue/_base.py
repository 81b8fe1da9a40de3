"""The run queue's interface: runs wait, a worker leases one, renews the lease while it
works, and completes, fails or hands it back with the lease's token."""

from __future__ import annotations

import abc
import json
import math
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from corral._exceptions import ConfigError

#: The error type of a run whose lease lapsed more than `max_reclaims` times: the workers
#: that held it died (or hung) every time, so it is failed rather than tried forever.
WORKER_LOST = "worker_lost"


class QueueError(Exception):
    """The run queue did not answer (database locked or unreadable, Redis unreachable)."""


@dataclass(frozen=True)
class Lease:
    """A run a worker holds: only `token` may renew, complete, fail or hand it back."""

    run_id: str
    data: dict[str, Any]
    token: str
    reclaims: int  # how often a lapsed lease on this run was taken back before this one
    lost: bool = False  # past max_reclaims: already failed as worker_lost; do not run it
    # Data that is not a JSON object: the job is already out of the queue (failed once);
    # this says why, for the run's record (`invalid_input`). Do not run it.
    invalid: str | None = None


#: The error type recorded on a run whose job data could not be read.
INVALID_INPUT = "invalid_input"


def parse_job_data(raw: str | bytes | None) -> tuple[dict[str, Any], str | None]:
    """A job's data as the dict a run needs, or `({}, why not)` for data that is not valid
    JSON or not a JSON object (a producer's bug: failed once, never retried)."""
    try:
        data = json.loads(raw if raw is not None else "")
    except (ValueError, TypeError) as exc:
        shown = raw if isinstance(raw, str) else repr(raw)
        excerpt = shown[:80] + ("…" if len(shown) > 80 else "")
        return {}, f"the job's data is not valid JSON ({exc}): {excerpt!r}"
    if not isinstance(data, dict):
        return {}, f"the job's data must be a JSON object, got {type(data).__name__}"
    return data, None


def check_lease_options(lease_s: float, max_reclaims: int) -> None:
    """Raise ConfigError when a queue's lease options are out of range."""
    if not (isinstance(lease_s, int | float) and math.isfinite(lease_s) and lease_s > 0):
        raise ConfigError(f"lease_s must be a positive number of seconds, got {lease_s!r}")
    if not (isinstance(max_reclaims, int) and max_reclaims >= 0):
        raise ConfigError(f"max_reclaims must be a whole number, 0 or more, got {max_reclaims!r}")


class RunQueue(abc.ABC):
    """Runs waiting for a worker, each at most once in the queue, delivered at least once.

    A run is identified by its run id; its data is plain JSON (a dict). A claim leases a
    run for `lease_s` seconds; the holder renews it while it works. A lease that lapses
    (its worker died) is taken back by `reclaim()`, which any worker calls periodically;
    after `max_reclaims` such take-backs the next claim fails it as `worker_lost` and
    returns it with `lost` set.
    """

    kind: str  # "sqlite" or "bullmq", for operators (/readyz, `corral stack`)
    lease_s: float
    max_reclaims: int

    @abc.abstractmethod
    async def enqueue(self, run_id: str, data: dict[str, Any]) -> bool:
        """Queue a run; False (and nothing changes) when it is already waiting or leased."""

    @abc.abstractmethod
    async def claim(self, *, wait_s: float = 0.0) -> Lease | None:
        """Lease the oldest waiting run, waiting up to `wait_s` seconds for one; None when
        none came."""

    @abc.abstractmethod
    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by `lease_s` from now; False when it is no longer ours."""

    @abc.abstractmethod
    async def complete(self, lease: Lease) -> bool:
        """The run is done (whatever its outcome): remove it; False when no longer ours."""

    @abc.abstractmethod
    async def fail(self, lease: Lease, message: str) -> bool:
        """The run could not be processed: remove it; False when no longer ours."""

    @abc.abstractmethod
    async def release(self, lease: Lease) -> bool:
        """Hand the run back to wait for another worker, not counted as a reclaim (a worker
        that stops); False when no longer ours."""

    @abc.abstractmethod
    async def reclaim(self) -> list[str]:
        """Take back lapsed leases so that the runs wait again; the run ids taken back."""

    @abc.abstractmethod
    async def remove(self, run_id: str) -> bool:
        """Remove a waiting run (cancelled before it started); False when it is not waiting."""

    @abc.abstractmethod
    async def counts(self) -> dict[str, int]:
        """How many runs are `waiting` and `active` (leased)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return when the queue answers; raise QueueError otherwise."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads; idempotent."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
