"""The run queue on Redis through the Python `bullmq` package (queue `corral-runs`).

Jobs are BullMQ's own, so a Node BullMQ producer can enqueue runs too: job id
`run-<run id>`, data plain JSON, `attempts: 1` (corral's runtime owns retries). Workers
fetch jobs by hand (BullMQ's "manual processing"): a claim is moveToActive with our token,
a renewal extendLock, a take-back of lapsed leases BullMQ's stalled-jobs check, with the
lock duration, the stalled interval and the stalled count set from the queue's options.
bullmq stays inside this module: nothing else imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
import redis.asyncio
from bullmq import Job, Queue, UnrecoverableError, Worker
from bullmq.redis_connection import loadScript
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from corral.runtime.store._redis import redis_socket
from corral.service.queue._base import (
    INVALID_INPUT,
    WORKER_LOST,
    Lease,
    QueueError,
    RunQueue,
    check_lease_options,
    parse_job_data,
)

QUEUE_NAME = "corral-runs"
JOB_NAME = "run"
JOB_PREFIX = "run-"
# A claim blocks on Redis (BZPOPMIN) for at most this long at a time.
MAX_BLOCK_S = 5
MAX_HELD = 4096  # jobs of leases kept for finishing them (a lost lease's is never asked for)
CLOSE_TIMEOUT_S = 5.0  # bullmq's Worker.close() waits without a limit; ours does not
# A dropped connection is retried briefly; a server that is gone surfaces as QueueError
# within a second instead of bullmq's default of retrying for minutes.
_RETRY = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.2), retries=2)
_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")
# Waiting in BullMQ's terms: runs no worker holds yet.
_WAITING_STATES = ("wait", "paused", "delayed", "prioritized")
_JOB_OPTIONS = {"attempts": 1, "removeOnComplete": True, "removeOnFail": True}
# The keys of BullMQ's addStandardJob script, in its order (bullmq's Scripts.addStandardJob).
_ADD_KEYS = ["wait", "paused", "meta", "id", "completed", "delayed", "active", "events", "marker"]


def _mask(url: str) -> str:
    return _PASSWORD.sub(r"\1***@", url)


def job_id(run_id: str) -> str:
    """The BullMQ job id of a run."""
    return JOB_PREFIX + run_id


class BullmqQueue(RunQueue):
    """The run queue on the Redis at `url`, shared by every worker on every machine.

    Use one instance from one event loop (redis.asyncio binds its connections to it).
    """

    kind = "bullmq"

    def __init__(
        self, url: str, *, lease_s: float, max_reclaims: int, prefix: str = "bull"
    ) -> None:
        check_lease_options(lease_s, max_reclaims)
        self.url = url
        self.lease_s = float(lease_s)
        self.max_reclaims = max_reclaims
        self._lease_ms = max(1, math.ceil(self.lease_s * 1000))
        try:
            self._client = redis.asyncio.Redis.from_url(
                url,
                decode_responses=True,  # bullmq's scripts and Job.fromJSON expect str
                retry=_RETRY,
                **redis_socket(url),  # no time-out per command: the kernel's, as the store's
            )
        except ValueError as exc:
            raise QueueError(f"Redis at {_mask(url)}: {exc}") from None
        options = {"connection": self._client, "prefix": prefix, "skipVersionCheck": True}
        self._queue = Queue(QUEUE_NAME, options)
        self._worker = Worker(
            QUEUE_NAME,
            None,  # no processor: jobs are fetched by hand
            {
                **options,
                "autorun": False,
                "lockDuration": self._lease_ms,
                "stalledInterval": self._lease_ms,
                "maxStalledCount": max_reclaims,
                "drainDelay": 1,
            },
        )
        self._to_wait = self._client.register_script(loadScript("moveJobFromActiveToWait-9.lua"))
        self._closed = False
        # The job of each lease this queue handed out, by token: finishing it needs no read.
        self._held: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"BullmqQueue({_mask(self.url)!r}{', closed' if self._closed else ''})"

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """Translate redis' errors into QueueError; the one place they are caught."""
        if self._closed:
            raise QueueError(f"{self!r} is closed")
        try:
            yield
        except redis.RedisError as exc:
            raise QueueError(f"Redis at {_mask(self.url)}: {exc}") from exc

    async def enqueue(self, run_id: str, data: dict[str, Any]) -> bool:
        """Queue a run; False (and nothing changes) when it is already waiting or leased."""
        jid = job_id(run_id)
        scripts = self._queue.scripts
        add = scripts.commands["addStandardJob"]
        job = Job(self._queue, JOB_NAME, data, {**_JOB_OPTIONS, "jobId": jid})
        keys = scripts.getKeys(_ADD_KEYS)
        args = [*scripts.addJobArgs(job), job.timestamp]
        with self._errors():
            # BullMQ's add keeps one job per id but answers the id either way: whether the
            # job was there is asked in the same MULTI as the add (one round trip, nothing
            # in between), so of several enqueues of one run exactly one says it added it.
            for _ in range(2):
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.exists(scripts.toKey(jid))
                    pipe.evalsha(add.sha, len(keys), *keys, *args)
                    try:
                        existed, answer = await pipe.execute()
                    except redis.exceptions.NoScriptError:
                        await self._client.script_load(add.script)  # first use on this Redis
                        continue
                if isinstance(answer, int) and answer < 0:
                    raise QueueError(f"BullMQ refused job {jid!r} (code {answer})")
                return not existed
        raise QueueError(f"Redis at {_mask(self.url)} would not load BullMQ's addStandardJob")

    async def claim(self, *, wait_s: float = 0.0) -> Lease | None:
        """Lease the oldest waiting run, waiting up to `wait_s` seconds for one."""
        deadline = time.monotonic() + wait_s
        with self._errors():
            while True:
                token = f"{uuid.uuid4().hex}:1"
                job, invalid = await self._move_to_active(token)
                if job is not None:
                    if invalid is not None:
                        lease = await self._fail_invalid(job, token, invalid)
                        if lease is not None:
                            return lease
                        continue
                    lease = await self._lease(job, token)
                    if lease is not None:
                        return lease
                    continue
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._worker.opts["drainDelay"] = min(MAX_BLOCK_S, max(1, math.ceil(left)))
                self._worker.blockUntil = 0
                await self._worker.waitForJob()

    async def _move_to_active(self, token: str) -> tuple[Any, str | None]:
        """The next job moved to active under `token` (None: none waits), and why its data
        cannot be used (None: it can). A job whose data or options are not JSON is still
        read, with empty data, so that it can be failed rather than fail every claim."""
        worker = self._worker
        result = await worker.backend.moveToActive(token, worker.opts)
        raw, found_id, limit_until, delay_until = result if result else (None, None, 0, 0)
        invalid = None
        if raw:
            _, invalid = parse_job_data(raw.get("data"))
            if invalid is None:
                try:
                    json.loads(raw.get("opts") or "{}")
                except ValueError as exc:
                    invalid = f"the job's options are not valid JSON ({exc})"
            if invalid is not None:
                raw = {**raw, "data": "{}", "opts": "{}"}
        job = await worker.nextJobFromJobData(raw, found_id, limit_until, delay_until, token)
        return job, invalid

    async def _fail_invalid(self, job: Any, token: str, reason: str) -> Lease | None:
        """Fail a job whose data cannot be used, once; the lease that says so to the
        worker (which records it on the run), or None for a job that is not a run."""
        job.opts.update(_JOB_OPTIONS)
        await job.moveToFailed(UnrecoverableError(f"{INVALID_INPUT}: {reason}"), token)
        if not job.id.startswith(JOB_PREFIX):
            return None
        return Lease(job.id[len(JOB_PREFIX) :], {}, token, job.stalledCounter, invalid=reason)

    async def _lease(self, job: Any, token: str) -> Lease | None:
        """The lease on a job just moved to active; None for a job that is not a run."""
        if not job.id.startswith(JOB_PREFIX) or not isinstance(job.data, dict):
            job.opts.update(_JOB_OPTIONS)
            reason = f"not a corral run: job id must be {JOB_PREFIX}<run id>, data an object"
            await job.moveToFailed(UnrecoverableError(reason), token)
            return None
        run_id = job.id[len(JOB_PREFIX) :]
        lost = bool(job.deferredFailure)
        if lost:
            job.opts.update(_JOB_OPTIONS)
            await job.moveToFailed(UnrecoverableError(WORKER_LOST), token)
        if not lost:
            if len(self._held) >= MAX_HELD:  # leases lost without a word: start afresh
                self._held.clear()
            self._held[token] = job
        return Lease(run_id, job.data, token, job.stalledCounter, lost)

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by `lease_s` from now; False when it is no longer ours."""
        with self._errors():
            renewed = await self._worker.backend.extendLock(
                job_id(lease.run_id), lease.token, self._lease_ms
            )
        return bool(renewed)

    async def _finish(self, lease: Lease, reason: str | None) -> bool:
        with self._errors():
            job = self._held.pop(lease.token, None) or await self._queue.getJob(
                job_id(lease.run_id)
            )
            if job is None:
                return False
            job.opts.update(_JOB_OPTIONS)  # a Node producer's job may not ask for removal
            try:
                if reason is None:
                    await job.moveToCompleted(None, lease.token)
                else:
                    await job.moveToFailed(UnrecoverableError(reason), lease.token)
            except TypeError:  # bullmq's answer to a missing or foreign lock
                return False
        return True

    async def complete(self, lease: Lease) -> bool:
        """The run is done: remove it; False when no longer ours."""
        return await self._finish(lease, None)

    async def fail(self, lease: Lease, message: str) -> bool:
        """The run could not be processed: remove it; False when no longer ours."""
        return await self._finish(lease, message)

    async def release(self, lease: Lease) -> bool:
        """Hand the run back to wait for another worker; False when no longer ours."""
        keys = self._worker.scripts.getKeys(
            ["active", "wait", "stalled", "paused", "meta", "limiter", "prioritized", "marker"]
        )
        keys.append(self._worker.scripts.keys["events"])
        self._held.pop(lease.token, None)
        job_key = self._worker.scripts.toKey(job_id(lease.run_id))
        with self._errors():
            answer = await self._to_wait(
                keys=keys, args=[job_id(lease.run_id), lease.token, job_key]
            )
        return int(answer) >= 0

    async def reclaim(self) -> list[str]:
        """Take back lapsed leases (BullMQ's stalled-jobs check, at most once per lease_s
        across all workers; a lapsed lease is taken back by the second check that sees it)."""
        with self._errors():
            stalled = await self._worker.backend.moveStalledJobsToWait(
                self.max_reclaims, self._lease_ms
            )
        return [j[len(JOB_PREFIX) :] for j in stalled if j.startswith(JOB_PREFIX)]

    async def remove(self, run_id: str) -> bool:
        """Remove a waiting run; False when it is not waiting."""
        with self._errors():
            # getJobState names the wait list "waiting"
            state = await self._queue.getJobState(job_id(run_id))
            if state not in {"waiting", *_WAITING_STATES}:
                return False
            return bool(await self._queue.remove(job_id(run_id)))

    async def counts(self) -> dict[str, int]:
        """How many runs are `waiting` and `active`."""
        with self._errors():
            counts = await self._queue.getJobCounts(*_WAITING_STATES, "active")
        return {
            "waiting": sum(int(counts.get(state, 0)) for state in _WAITING_STATES),
            "active": int(counts.get("active", 0)),
        }

    async def ping(self) -> None:
        """Return when Redis answers; raise QueueError otherwise."""
        with self._errors():
            await self._client.ping()

    async def close(self) -> None:
        """Close the connections, within CLOSE_TIMEOUT_S; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self._worker.close(), CLOSE_TIMEOUT_S)
        except (TimeoutError, redis.RedisError):
            await self._worker.close(force=True)
        finally:
            await self._client.aclose()
