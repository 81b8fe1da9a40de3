"""`corral worker`: leases runs off the queue and executes them through WorkflowRuntime.

A run's life in a worker:

    claim a lease ──> record `running` ──> run_workflow(run_id) ──> record the outcome ──> complete
                        │ every lease_s/3: renew the lease (lost: stop, another worker has it)
                        │ a cancel requested (heard as a `cancels` ring, else looked for every
                        │   CANCEL_POLL_S)? cancel the run's task, which kills its sandbox
                        │   execution; record `cancelled`
                        └ SIGTERM: no more claims; after the grace period, cancel what is left,
                          record it `queued` again and hand its lease back

Killed outright, a worker's leases lapse and another worker's `reclaim()` takes them back;
the run starts again under the same run id, so its finished nodes replay from the store.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from corral._exceptions import ConfigError, InvalidInput
from corral.runtime import WorkflowRun, WorkflowRuntime
from corral.service import _metrics as metrics
from corral.service._connections import connections_for
from corral.service._deployment import describe
from corral.service._keys import KeyRingError, load_key_ring
from corral.service._sandbox import CountingSandbox
from corral.service.queue import INVALID_INPUT, WORKER_LOST, Lease, QueueError, RunQueue, open_queue
from corral.service.records import FINISHED, Records, RecordsError, new_run, open_records

if TYPE_CHECKING:
    from corral.config import Settings

logger = logging.getLogger("corral.worker")

CLAIM_WAIT_S = 1.0  # a claim blocks this long at most (on a Redis that answers): a stop is seen
CANCEL_POLL_S = 0.25  # how soon a requested cancel reaches a running run
BACKOFF_MAX_S = 5.0  # a queue or records outage is retried up to this far apart
KEEP_RETRY_S = 1.0  # a run's keeper, failing to look or renew, tries again this soon
EVENTS_LINGER_S = 0.1  # events wait this long to share a write (the stream's delay)

Connections = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


def own_event(run_id: str, event: str, **fields: Any) -> dict[str, Any]:
    """An event of the worker's own (run started, handed back, …), as the stream holds it."""
    return {"event": event, "ts": round(time.time(), 3), "run": run_id, **fields}


def failed_event(run_id: str, error_type: str) -> dict[str, Any]:
    """The `run.finished` event of a run that the worker failed itself, as `error_type`."""
    return own_event(run_id, "run.finished", status="failed", error_type=error_type)


async def no_connections(definition: dict[str, Any]) -> dict[str, Any]:
    """Runs get no stored connections (a worker without a connection store)."""
    return {}


class _EventSink(logging.Handler):
    """The runtime's events (`corral.events` log lines) of the runs this worker holds,
    appended to each run's event stream in the records (GET /api/runs/ID/events).

    Events wait up to EVENTS_LINGER_S, so that those of every run in flight go in one
    write; the write that finishes a run takes that run's pending events with it (`take`).
    One write of events at a time (`writing`), so each run's stream keeps their order.
    """

    def __init__(self, worker: RunWorker) -> None:
        super().__init__(logging.INFO)
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()  # the loop's
        self.pending: collections.deque[tuple[str, dict[str, Any]]] = collections.deque()
        self.arrived = asyncio.Event()
        self.writing = asyncio.Lock()
        self.closed = False
        self.source = logging.getLogger("corral.events")
        if not self.source.isEnabledFor(logging.INFO):
            self.source.setLevel(logging.INFO)  # the service keeps every run's events
        self.source.addHandler(self)

    def _put(self, item: tuple[str, dict[str, Any]]) -> None:
        self.pending.append(item)
        self.arrived.set()

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "event", None)  # set by corral.runtime's emit
        if not isinstance(fields, dict):
            return
        run_id = fields.get("run")
        if isinstance(run_id, str) and run_id in self.worker._running.values():
            event = {**fields, "event": str(fields.get("event", "")).removeprefix("corral.")}
            if threading.get_ident() == self.thread:  # the runtime's own: no wake-up needed
                self._put((run_id, event))
            else:
                self.loop.call_soon_threadsafe(self._put, (run_id, event))

    def add(self, run_id: str, event: str, **fields: Any) -> None:
        """An event of the worker's own (run started, …), written with the next write."""
        self._put((run_id, own_event(run_id, event, **fields)))

    def take(self, run_id: str) -> list[dict[str, Any]]:
        """Remove `run_id`'s pending events, to be written with its record (hold `writing`
        until they are, or `give_back` them)."""
        mine = [event for owner, event in self.pending if owner == run_id]
        if mine:
            self.pending = collections.deque(item for item in self.pending if item[0] != run_id)
        return mine

    def give_back(self, run_id: str, events: list[dict[str, Any]]) -> None:
        """Events `take` gave that were not written: first in line again."""
        self.pending.extendleft((run_id, event) for event in reversed(events))
        if events:
            self.arrived.set()

    async def forward(self) -> None:
        """Append the pending events to the records, in one write each time, until closed."""
        while not (self.closed and not self.pending):
            await self.arrived.wait()
            self.arrived.clear()
            if not self.closed:
                await asyncio.sleep(EVENTS_LINGER_S)  # let the other runs' events come too
            async with self.writing:
                events, self.pending = list(self.pending), collections.deque()
                if not events:
                    continue
                try:
                    await self.worker.records.append_events(events)
                except RecordsError as exc:  # an event lost is not worth stopping runs for
                    logger.warning("worker %s: %d event(s) not kept: %s",
                                   self.worker.id, len(events), exc)  # fmt: skip
                except Exception:
                    logger.exception("worker %s: %d event(s) not kept", self.worker.id, len(events))

    def close(self) -> None:
        self.source.removeHandler(self)
        self.closed = True
        self.arrived.set()
        super().close()


def _error(kind: str, message: str) -> dict[str, str]:
    return {"type": kind, "message": message}


class RunWorker:
    """Executes runs from `queue`, `concurrency` at a time, recording them in `records`."""

    def __init__(
        self,
        queue: RunQueue,
        records: Records,
        runtime: WorkflowRuntime,
        *,
        concurrency: int,
        grace_s: float,
        heartbeat_s: float,
        connections: Connections = no_connections,
        worker_id: str | None = None,
        deployment: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.queue = queue
        self.records = records
        self.runtime = runtime
        self.concurrency = concurrency
        self.grace_s = grace_s
        self.heartbeat_s = heartbeat_s
        self.connections = connections
        self.clock = clock
        self.deployment = deployment  # what it sees (_deployment.describe), for `corral stack`
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.id = worker_id or f"{self.host}-{self.pid}-{uuid.uuid4().hex[:6]}"
        self._running: dict[asyncio.Task[None], str] = {}  # task -> run id
        self._stop_reasons: dict[str, str] = {}  # run id -> why its task was cancelled
        self._sink: _EventSink | None = None

    @property
    def running(self) -> int:
        """How many runs this worker holds."""
        return len(self._running)

    async def serve(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then stop within the grace period (see the module)."""
        logger.info(
            "worker %s: %d at a time from the %s queue",
            self.id,
            self.concurrency,
            self.queue.kind,
        )
        sink = self._sink = _EventSink(self)
        chores = [
            asyncio.create_task(self._every(self.heartbeat_s, self._beat, stop)),
            asyncio.create_task(self._every(self.queue.lease_s / 2, self._reclaim, stop)),
            asyncio.create_task(sink.forward()),
        ]
        try:
            await self._claim_loop(stop)
            await self._drain()
        finally:
            sink.close()
            with contextlib.suppress(TimeoutError):  # the last events: briefly
                await asyncio.wait_for(asyncio.shield(chores[-1]), 5)
            for chore in chores:
                chore.cancel()
            await asyncio.gather(*chores, return_exceptions=True)
            with contextlib.suppress(QueueError, RecordsError):
                await self._beat()

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        # A worker whose slots are all busy hears the stop too: it frees one more slot.
        stopping = asyncio.ensure_future(stop.wait())
        stopping.add_done_callback(lambda _: slots.release())
        failures = 0
        try:
            while not stop.is_set():
                await slots.acquire()
                if stop.is_set():
                    slots.release()
                    break
                try:
                    lease = await self.queue.claim(wait_s=CLAIM_WAIT_S)
                    failures = 0
                except QueueError as exc:
                    slots.release()
                    failures += 1
                    delay = min(BACKOFF_MAX_S, 0.1 * 2**failures) * random.uniform(0.5, 1)
                    logger.warning("worker %s: queue: %s; again in %.1f s", self.id, exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
                    continue
                if lease is None:
                    slots.release()
                    continue
                task = asyncio.create_task(self._execute(lease))
                self._running[task] = lease.run_id
                task.add_done_callback(lambda t: (self._running.pop(t, None), slots.release()))
        finally:
            stopping.cancel()

    async def _drain(self) -> None:
        """Let running runs finish for the grace period, then hand the rest back."""
        if not self._running:
            return
        logger.info(
            "worker %s: stopping; %d run(s) get %.0f s to finish",
            self.id,
            len(self._running),
            self.grace_s,
        )
        _, late = await asyncio.wait(set(self._running), timeout=self.grace_s)
        for task in late:
            self._stop_reasons[self._running[task]] = "shutdown"
            task.cancel()
        if late:
            await asyncio.wait(late)

    def _event(self, run_id: str, event: str, **fields: Any) -> None:
        if self._sink is not None:
            self._sink.add(run_id, event, **fields)

    async def _every(
        self, period_s: float, chore: Callable[[], Awaitable[Any]], stop: asyncio.Event
    ) -> None:
        while not stop.is_set():
            try:
                await chore()
            except (QueueError, RecordsError) as exc:
                logger.warning("worker %s: %s", self.id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), period_s)

    async def _beat(self) -> None:
        await self.records.beat(
            {
                "id": self.id,
                "host": self.host,
                "pid": self.pid,
                "running": self.running,
                "concurrency": self.concurrency,
                "queue": self.queue.kind,
                "deployment": self.deployment,
                "last_heartbeat": self.clock(),
            }
        )

    async def _reclaim(self) -> None:
        taken = await self.queue.reclaim()
        if taken:
            metrics.LEASE_RECLAIMS.inc(len(taken))
            logger.warning("worker %s: took back lapsed leases of runs %s", self.id, taken)

    # -- one run ---------------------------------------------------------------------------

    async def _execute(self, lease: Lease) -> None:
        try:
            if lease.invalid is not None:
                await self._record_invalid(lease)
                return
            if lease.lost:
                await self._record_lost(lease)
                return
            started = await self._start(lease)
            if started is None:
                await self.queue.complete(lease)
                return
            await self._run(lease, started)
        except (QueueError, RecordsError) as exc:
            # The lease lapses and another worker (or this one) takes the run up again.
            logger.error("worker %s: run %s: %s", self.id, lease.run_id, exc)
        except Exception:  # a bug: said loudly; the lease lapses and the run is tried again
            logger.exception("worker %s: run %s failed unexpectedly", self.id, lease.run_id)
        finally:
            self._stop_reasons.pop(lease.run_id, None)

    async def _start(self, lease: Lease) -> tuple[dict[str, Any], int] | None:
        """The run's record moved to `running` by this worker, and its version; None when
        there is nothing to run (it finished, was cancelled, or names no workflow)."""
        run_id = lease.run_id
        now = self.clock()

        def start(record: dict[str, Any]) -> dict[str, Any] | None:
            if record["status"] in FINISHED:
                return None  # a duplicate delivery of a finished run
            if record["cancel_requested"]:
                return {**record, "status": "cancelled", "finished_at": now,
                        "error": _error("cancelled", "cancelled before it started")}  # fmt: skip
            return {
                **record,
                "status": "running",
                "attempts": record["attempts"] + 1,
                "worker": self.id,
                "started_at": record["started_at"] or now,
            }

        started = await self.records.change_run(run_id, start)
        if started is None and await self.records.get_run(run_id) is None:
            await self._create_from_job(lease)  # queued by another producer, without a record
            started = await self.records.change_run(run_id, start)
        if started is None or started[0]["status"] != "running":
            return None
        record = started[0]
        if record["attempts"] == 1:
            metrics.QUEUE_WAIT.observe(max(0.0, now - record["created_at"]))
        self._event(run_id, "run.started", attempt=record["attempts"], worker=self.id)
        return started

    async def _create_from_job(self, lease: Lease) -> None:
        """A job enqueued without a record (a Node producer): `{"workflow", "input"}`."""
        workflow_id = lease.data.get("workflow")
        run_input = lease.data.get("input") or {}
        definition = (
            await self.records.get_workflow(workflow_id) if isinstance(workflow_id, str) else None
        )
        now = self.clock()
        if definition is None or not isinstance(run_input, dict):
            record = new_run(lease.run_id, {"id": str(workflow_id), "nodes": []}, {}, now)
            message = (
                f"the job names no stored workflow ({workflow_id!r}); enqueue "
                '{"workflow": ID, "input": {...}} for a workflow stored with PUT /api/workflows/ID'
            )
            record.update(status="failed", finished_at=now, error=_error(INVALID_INPUT, message))
            await self.records.create_run(
                record, events=[failed_event(lease.run_id, INVALID_INPUT)]
            )
        else:
            await self.records.create_run(new_run(lease.run_id, definition, run_input, now))

    async def _run(self, lease: Lease, started: tuple[dict[str, Any], int]) -> None:
        record = started[0]
        run_id = record["id"]
        began = time.monotonic()
        task = asyncio.create_task(self._workflow(record))
        keeper = asyncio.create_task(self._keep(lease, task))
        try:
            run: WorkflowRun | dict[str, str] = await task
        except asyncio.CancelledError:
            reason = self._stop_reasons.get(run_id, "shutdown")
            if reason == "cancel":
                await self._finish(
                    started, "cancelled", error=_error("cancelled", "cancelled by request"),
                    event=own_event(run_id, "run.finished", status="cancelled"),
                )  # fmt: skip
                await self.queue.complete(lease)
            elif reason == "shutdown":
                await self._hand_back(lease)
            # "lease_lost": another worker holds the run now; leave it alone
            if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            return
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        metrics.RUN_DURATION.observe(time.monotonic() - began)
        if isinstance(run, dict):  # the workflow could not run at all
            await self._finish(started, "failed", error=run)
        else:
            nodes = {
                node_id: {**node.to_dict(), "logs": node.logs, "usage": node.usage}
                for node_id, node in run.nodes.items()
            }
            failed = [n.error for n in run.nodes.values() if n.status == "failed" and n.error]
            error = failed[0] if failed else None
            await self._finish(started, run.status, nodes=nodes, error=error)
        await self.queue.complete(lease)

    async def _workflow(self, record: dict[str, Any]) -> WorkflowRun | dict[str, str]:
        """The run through the runtime, or the error that kept it from running."""
        try:
            connections = await self.connections(record["definition"])
            return await self.runtime.run_workflow(
                record["definition"], input=record["input"], connections=connections,
                run_id=record["id"],
            )  # fmt: skip
        except InvalidInput as exc:
            return exc.to_dict()
        except KeyRingError as exc:  # retry the run once every process has the keys
            return _error("credentials_unavailable", str(exc))

    async def _keep(self, lease: Lease, task: asyncio.Task[Any]) -> None:
        """Renew the lease and watch for a cancel while the run's task runs. A cancel is
        heard at once where the records ring `cancels`; else it is looked for every
        CANCEL_POLL_S. The first look, after CANCEL_POLL_S, also finds a cancel made before
        this listened."""
        changes = self.records.changes()
        cancels = asyncio.Event()
        changes.subscribe("cancels", cancels)
        renew_every = self.queue.lease_s / 3
        renewed = time.monotonic()
        wait_s = CANCEL_POLL_S
        failing = 0  # looks or renewals that failed in a row
        try:
            while not task.done():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await cancels.wait()
                cancels.clear()
                wait_s = renew_every if changes.live else CANCEL_POLL_S
                try:
                    record = await self.records.get_run(lease.run_id)
                    due = time.monotonic() - renewed >= renew_every
                    held = await self.queue.renew(lease) if due else True
                except (RecordsError, QueueError) as exc:  # an outage: soon again, not never
                    if not failing:
                        logger.warning("worker %s: run %s: %s; trying again every %.0f s",
                                       self.id, lease.run_id, exc, KEEP_RETRY_S)  # fmt: skip
                    failing += 1
                    wait_s = min(wait_s, KEEP_RETRY_S)
                    if time.monotonic() - renewed <= self.queue.lease_s:
                        continue
                    record, held = None, False  # lapsed: another worker may hold the run now
                else:
                    if failing:
                        logger.info("worker %s: run %s: answered again after %d failed tries",
                                    self.id, lease.run_id, failing)  # fmt: skip
                    failing = 0
                if record is not None and record["cancel_requested"]:
                    self._stop_reasons[lease.run_id] = "cancel"
                    task.cancel()
                    return
                if not held:
                    logger.warning(
                        "worker %s: lost the lease of run %s; stopping it", self.id, lease.run_id
                    )
                    self._stop_reasons[lease.run_id] = "lease_lost"
                    task.cancel()
                    return
                if due:
                    renewed = time.monotonic()
        finally:
            changes.unsubscribe("cancels", cancels)

    async def _finish(
        self,
        started: tuple[dict[str, Any], int],
        status: str,
        *,
        nodes: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        event: dict[str, Any] | None = None,
    ) -> None:
        now = self.clock()

        def finish(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] != "running" or current["worker"] != self.id:
                return None  # cancelled meanwhile, or another worker took it over
            return {
                **current,
                "status": status,
                "finished_at": now,
                "error": error,
                "nodes": current["nodes"] if nodes is None else nodes,
            }

        await self._write(started[0]["id"], finish, event=event, last=started)

    async def _write(
        self,
        run_id: str,
        change: Callable[[dict[str, Any]], dict[str, Any] | None],
        *,
        event: dict[str, Any] | None = None,
        last: tuple[dict[str, Any], int] | None = None,
    ) -> tuple[dict[str, Any], int] | None:
        """`change` written to the run's record (Records.change_run) together with the
        run's pending events and then `event`, so that a stream that ends with the run's
        record has them all. When the change declines, the pending events wait for the next
        write and `event` is dropped (it told of a change not made)."""
        sink = self._sink
        if sink is None:
            return await self.records.change_run(run_id, change, last=last)
        async with sink.writing:
            pending, written = sink.take(run_id), None
            events = pending if event is None else [*pending, event]
            try:
                written = await self.records.change_run(run_id, change, events=events, last=last)
            finally:
                if written is None:
                    sink.give_back(run_id, pending)
            return written

    async def _hand_back(self, lease: Lease) -> None:
        def requeue(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] != "running" or current["worker"] != self.id:
                return None
            return {**current, "status": "queued", "worker": None}

        # The event goes with the record, before another worker can take the run up.
        event = own_event(lease.run_id, "run.handed_back", worker=self.id)
        await self._write(lease.run_id, requeue, event=event)
        await self.queue.release(lease)
        logger.info("worker %s: handed run %s back to the queue", self.id, lease.run_id)

    async def _record_invalid(self, lease: Lease) -> None:
        """A job whose data could not be read (the queue has failed it already): the run
        fails as invalid_input, its record created when a producer queued it without one."""
        now = self.clock()
        error = _error(INVALID_INPUT, f"the run's queue job cannot be used: {lease.invalid}")
        finished = failed_event(lease.run_id, INVALID_INPUT)

        def reject(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] in FINISHED:
                return None
            return {**current, "status": "failed", "finished_at": now, "error": error}

        record = new_run(lease.run_id, {"id": "unknown", "nodes": []}, {}, now)
        record.update(status="failed", finished_at=now, error=error)
        if not await self.records.create_run(record, events=[finished]):  # it has a record
            await self._write(lease.run_id, reject, event=finished)
        logger.error("worker %s: run %s failed: %s", self.id, lease.run_id, lease.invalid)

    async def _record_lost(self, lease: Lease) -> None:
        now = self.clock()
        message = (
            f"the workers running it stopped answering {lease.reclaims} times "
            f"(more than CORRAL_MAX_RECLAIMS={self.queue.max_reclaims}); not tried again"
        )

        def lose(current: dict[str, Any]) -> dict[str, Any] | None:
            if current["status"] in FINISHED:
                return None
            return {**current, "status": "failed", "finished_at": now,
                    "error": _error(WORKER_LOST, message)}  # fmt: skip

        await self._write(lease.run_id, lose, event=failed_event(lease.run_id, WORKER_LOST))
        logger.error("worker %s: run %s failed as %s", self.id, lease.run_id, WORKER_LOST)


async def run_worker(
    settings: Settings, stop: asyncio.Event, *, metrics_at: tuple[str, int] | None = None
) -> None:
    """`corral worker`: the deployment's queue, records and runtime, until `stop` is set;
    with `metrics_at` (host, port; port 0 picks one), its /metrics served there."""
    ring = load_key_ring(settings)
    async with contextlib.AsyncExitStack() as stack:
        if metrics_at is not None:
            try:
                server = metrics.MetricsServer(*metrics_at)
            except OSError as exc:
                raise ConfigError(
                    f"corral: cannot serve the worker's metrics on {metrics_at[0]}:"
                    f"{metrics_at[1]} ({exc.strerror or exc}); choose another "
                    f"{metrics.METRICS_PORT_ENV} or --metrics-port"
                ) from None
            stack.callback(server.close)
            logger.info("worker: metrics on %s", server.url)
        queue = open_queue(settings)
        stack.push_async_callback(queue.close)
        records = open_records(settings)
        stack.push_async_callback(records.close)
        sandbox = CountingSandbox(settings=settings)  # every execution counted
        stack.callback(sandbox.close)
        runtime = await stack.enter_async_context(WorkflowRuntime(settings, sandbox=sandbox))
        worker = RunWorker(
            queue,
            records,
            runtime,
            concurrency=settings.worker_concurrency,
            grace_s=settings.worker_grace_s,
            heartbeat_s=settings.worker_heartbeat_s,
            connections=functools.partial(connections_for, records, ring),
            deployment=describe(settings),
        )
        await worker.serve(stop)
