"""`corral scheduler`: polls stored workflows' triggers and fires their timers, enqueueing
one run per new item or occurrence, never twice.

    leader     one scheduler acts at a time: it holds a lease in the store (the runtime's
               claim/renew/release), renewed every third of CORRAL_LEASE_S; a scheduler that
               dies loses it within CORRAL_LEASE_S and another takes over
    identity   each item's run id derives from the workflow and the item's dedupe key, each
               occurrence's from the workflow and its time; a run record is created once per
               id, so an item or occurrence handed on twice (two leaders for a moment, a
               restart between enqueue and commit) still runs once
    timers     `"schedule": {"cron": EXPR, "timezone": TZ}` or `{"interval_s": N}`; the first
               sight of a schedule is its baseline; missed occurrences within
               CORRAL_SCHEDULE_CATCHUP_S fire once each, older ones are counted as missed;
               an occurrence that finds the workflow's previous scheduled run still queued
               or running is skipped and counted
    sweep      a run recorded `queued` whose job never reached the queue (its producer died
               in between) is queued again
    retention  every PRUNE_EVERY_S, runs finished more than CORRAL_RUN_RETENTION_DAYS (30;
               0 keeps them forever) ago are removed with their events; queued and running
               runs stay, whatever their age
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import socket
import time
import zoneinfo
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from croniter import croniter
from prometheus_client import Counter

from corral._exceptions import SandboxError
from corral.runtime import WorkflowRuntime
from corral.runtime._canonical import canonical_digest
from corral.runtime.store import Store, StoreError
from corral.service._connections import connections_for
from corral.service._keys import KeyRing, KeyRingError
from corral.service._runs import RunConflict, submit_run
from corral.service.queue import QueueError, RunQueue
from corral.service.records import Records, RecordsError
from corral.service.records._base import PRUNE_BATCH

if TYPE_CHECKING:
    from corral.config import Settings

logger = logging.getLogger("corral.scheduler")

TICK_S = 1.0  # how often the leader looks at the workflows (timers fire within a tick)
SWEEP_AFTER_S = 10.0  # a queued record this old without a job is queued again
LEADER_KEY = "scheduler:leader"
LEADER_META = "scheduler_leader"  # who leads, for operators and `corral stack`
PRUNE_EVERY_S = 600.0  # the leader removes runs past their retention this often
PRUNE_MAX_BATCHES = 20  # per prune: a backlog of old runs goes over several prunes
RETENTION_ENV = "CORRAL_RUN_RETENTION_DAYS"
MAX_OCCURRENCES = 1000  # per tick: a one-second cron after a long outage stays bounded

FIRED = Counter("corral_schedule_runs", "Runs the scheduler enqueued, by source.", ["source"])
SKIPPED = Counter(
    "corral_schedule_skipped",
    "Occurrences not fired, by reason (still_running, missed).",
    ["reason"],
)


PRUNED = Counter("corral_runs_pruned", "Finished runs removed after CORRAL_RUN_RETENTION_DAYS.")


def run_retention_s(settings: Settings) -> float | None:
    """How long finished runs are kept, in seconds (CORRAL_RUN_RETENTION_DAYS); None:
    forever (0)."""
    days = settings.run_retention_days
    return days * 86_400.0 if days else None


class ScheduleError(ValueError):
    """A workflow's `schedule` is not one the scheduler can fire."""


def check_schedule(schedule: Any) -> None:
    """Raise ScheduleError for a schedule that is neither a cron with a time zone nor an
    interval (the API checks a workflow with it before storing it)."""
    if not isinstance(schedule, dict):
        raise ScheduleError('`schedule` must be {"cron": …, "timezone": …} or {"interval_s": …}')
    if "interval_s" in schedule:
        interval = schedule["interval_s"]
        if isinstance(interval, bool) or not isinstance(interval, int) or interval <= 0:
            raise ScheduleError("`schedule.interval_s` must be a positive whole number")
        return
    expression = schedule.get("cron")
    if not isinstance(expression, str) or not croniter.is_valid(expression):
        raise ScheduleError(f"`schedule.cron` {expression!r} is not a cron expression")
    try:
        zoneinfo.ZoneInfo(str(schedule.get("timezone", "UTC")))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            f"`schedule.timezone` {schedule.get('timezone')!r} is unknown"
        ) from None


def occurrences(schedule: dict[str, Any], after: float, until: float) -> list[float]:
    """The schedule's times in (after, until], oldest first, at most MAX_OCCURRENCES."""
    if "interval_s" in schedule:
        step = float(schedule["interval_s"])
        first = (after // step + 1) * step
        count = max(0, min(MAX_OCCURRENCES, int((until - first) // step) + 1))
        return [first + n * step for n in range(count)]
    zone = zoneinfo.ZoneInfo(str(schedule.get("timezone", "UTC")))
    times = croniter(schedule["cron"], datetime.datetime.fromtimestamp(after, zone))
    found: list[float] = []
    while len(found) < MAX_OCCURRENCES:
        at = times.get_next(float)
        if at > until:
            break
        found.append(at)
    return found


def item_run_id(workflow_id: str, key: str) -> str:
    """The run id of a trigger item: the same item always maps to the same run."""
    return f"t-{canonical_digest([workflow_id, key])[:32]}"


def occurrence_run_id(workflow_id: str, at: float) -> str:
    """The run id of a timer occurrence."""
    return f"s-{canonical_digest(workflow_id)[:16]}-{round(at)}"


class Scheduler:
    """Fires the stored workflows' triggers and timers while it leads."""

    def __init__(
        self,
        records: Records,
        queue: RunQueue,
        store: Store,
        runtime: WorkflowRuntime,
        ring: KeyRing,
        *,
        lease_s: float,
        catchup_s: float,
        retention_s: float | None = 30 * 86_400.0,
        deployment: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.records = records
        self.queue = queue
        self.store = store
        self.runtime = runtime
        self.ring = ring
        self.lease_s = lease_s
        self.catchup_s = catchup_s
        self.retention_s = retention_s
        self.clock = clock
        self.deployment = deployment
        self._token: str | None = None
        self._renewed = 0.0
        self._swept = 0.0
        self._pruned = 0.0

    async def serve(self, stop: asyncio.Event) -> None:
        """Lead (when no one else does) and tick until `stop` is set; then step down."""
        try:
            while not stop.is_set():
                try:
                    if await self._lead():
                        await self.tick(stop)
                except (StoreError, RecordsError, QueueError) as exc:
                    logger.warning("scheduler: %s; again in %.0f s", exc, TICK_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), TICK_S)
        finally:
            if self._token is not None:
                with contextlib.suppress(StoreError):
                    await self.store.release(LEADER_KEY, token=self._token)

    async def _lead(self) -> bool:
        """Whether this scheduler leads now (taking or renewing the lease)."""
        now = time.monotonic()
        if self._token is not None:
            if now - self._renewed < self.lease_s / 3:
                return True
            if await self.store.renew(LEADER_KEY, lease_s=self.lease_s, token=self._token):
                self._renewed = now
                return True
        led, self._token = self._token is not None, None
        # The record outlives many leases; a lapsed lease, not its expiry, hands it over.
        claim = await self.store.claim(LEADER_KEY, "leader", lease_s=self.lease_s, ttl_s=86_400)
        if claim.state != "claimed":
            if led:
                logger.warning("scheduler: another scheduler leads now")
            return False
        self._token, self._renewed = claim.token, now
        if not led:
            logger.info("scheduler: leading")
            leader = {"pid": os.getpid(), "host": socket.gethostname(), "since": self.clock(),
                      "deployment": self.deployment}  # fmt: skip
            await self.records.put_meta(LEADER_META, json.dumps(leader))
        return True

    async def tick(self, stop: asyncio.Event | None = None) -> None:
        """One look at every stored workflow (the leader's); cut short once `stop` is set
        (a trigger's poll may take a node's time-out: the process's stop is bounded)."""
        now = self.clock()
        for entry in await self.records.list_workflows():
            if stop is not None and stop.is_set():
                return
            definition = entry["definition"]
            if isinstance(definition.get("schedule"), dict):
                await self._timer(definition, now)
            if isinstance(definition.get("trigger"), dict):
                await self._trigger(definition, now)
        if now - self._swept >= SWEEP_AFTER_S:
            await self._sweep(now)
            self._swept = now
        if self.retention_s is not None and now - self._pruned >= PRUNE_EVERY_S:
            await self._prune(now - self.retention_s)
            self._pruned = now

    async def _prune(self, cutoff: float) -> None:
        """Remove runs that finished before `cutoff`, a bounded number of batches a time."""
        removed = 0
        for _ in range(PRUNE_MAX_BATCHES):
            batch = await self.records.prune_runs(finished_before=cutoff)
            removed += len(batch)
            if len(batch) < PRUNE_BATCH:
                break
        if removed:
            PRUNED.inc(removed)
            kept = datetime.timedelta(seconds=round(self.retention_s or 0))
            logger.info("scheduler: removed %d run(s) finished over %s ago (%s)",
                        removed, kept, RETENTION_ENV)  # fmt: skip

    async def _timer(self, definition: dict[str, Any], now: float) -> None:
        workflow_id = definition["id"]
        schedule = definition["schedule"]
        try:
            check_schedule(schedule)
        except ScheduleError as exc:
            logger.warning("scheduler: workflow %r: %s", workflow_id, exc)
            return
        key = f"schedule:{workflow_id}"
        state = await self.store.get_json(key)
        spec = canonical_digest(schedule)
        if state is None or state.get("spec") != spec:  # new or changed: its baseline
            await self.store.put_json(key, {"spec": spec, "last": now, "run": None})
            return
        due = occurrences(schedule, state["last"], now)
        if not due:
            return
        last_run = state.get("run")
        for at in due:
            if at < now - self.catchup_s:
                SKIPPED.labels("missed").inc()
                continue
            if last_run is not None:
                previous = await self.records.get_run(last_run)
                if previous is not None and previous["status"] in ("queued", "running"):
                    SKIPPED.labels("still_running").inc()
                    logger.info("scheduler: %r at %s skipped: %s still runs",
                                workflow_id, at, last_run)  # fmt: skip
                    continue
            run_id = occurrence_run_id(workflow_id, at)
            if await self._submit(definition, {"scheduled_at": at}, run_id):
                FIRED.labels("schedule").inc()
            last_run = run_id
        await self.store.put_json(key, {"spec": spec, "last": due[-1], "run": last_run})

    async def _trigger(self, definition: dict[str, Any], now: float) -> None:
        workflow_id = definition["id"]
        trigger = definition["trigger"]
        interval = trigger.get("interval_s", 60)
        due_key = f"trigger-due:{workflow_id}"
        due = await self.store.get_json(due_key)
        if due is not None and due > now:
            return
        await self.store.put_json(due_key, now + float(interval))
        app = trigger.get("app")
        try:
            connections = await connections_for(self.records, self.ring, {"nodes": [{"app": app}]})
            poller = await self.runtime.trigger_poller()
            poll = await poller.poll(
                str(app), str(trigger.get("trigger")), trigger.get("params") or {},
                connections.get(str(app)), state=workflow_id,
            )  # fmt: skip
        except (SandboxError, KeyRingError) as exc:
            logger.warning("scheduler: the trigger of %r failed: %s", workflow_id, exc)
            return
        for item in poll.new:
            run_id = item_run_id(workflow_id, item.key)
            if await self._submit(definition, {"item": item.value, "key": item.key}, run_id):
                FIRED.labels("trigger").inc()
        await poller.commit(poll)

    async def _submit(
        self, definition: dict[str, Any], run_input: dict[str, Any], run_id: str
    ) -> bool:
        try:
            await submit_run(self.records, self.queue, definition, run_input, run_id=run_id)
        except RunConflict:
            return False  # this item or occurrence was handed on before
        logger.info("scheduler: queued run %s of %r", run_id, definition["id"])
        return True

    async def _sweep(self, now: float) -> None:
        runs, _ = await self.records.list_runs(status="queued", limit=500)
        for summary in runs:
            if summary["created_at"] < now - SWEEP_AFTER_S and await self.queue.enqueue(
                summary["id"], {"run_id": summary["id"], "workflow": summary["workflow"]}
            ):
                logger.warning("scheduler: run %s was recorded but not queued; queued it",
                               summary["id"])  # fmt: skip


async def run_scheduler(settings: Settings, stop: asyncio.Event) -> None:
    """`corral scheduler`: the deployment's records, queue, store and runtime until `stop`."""
    from corral.runtime import open_store
    from corral.service._deployment import describe
    from corral.service._keys import load_key_ring
    from corral.service._sandbox import CountingSandbox
    from corral.service.queue import open_queue
    from corral.service.records import open_records

    ring = load_key_ring(settings)
    async with contextlib.AsyncExitStack() as stack:
        queue = open_queue(settings)
        stack.push_async_callback(queue.close)
        records = open_records(settings)
        stack.push_async_callback(records.close)
        store = open_store(settings)
        sandbox = CountingSandbox(settings=settings)  # trigger polls count as executions
        stack.callback(sandbox.close)
        runtime = WorkflowRuntime(settings, store=store, sandbox=sandbox)
        stack.push_async_callback(runtime.aclose)
        scheduler = Scheduler(
            records, queue, store, runtime, ring,
            lease_s=settings.lease_s, catchup_s=settings.schedule_catchup_s,
            retention_s=run_retention_s(settings), deployment=describe(settings),
        )  # fmt: skip
        await scheduler.serve(stop)
