"""The service (DESIGN §10): the run queue, run records, the worker, the scheduler, the
HTTP API (`corral.service.api`) and the stack.

    queue/      RunQueue: embedded SQLite with leases, or BullMQ on Redis
    records/    run records, stored workflows and connections, heartbeats, run events
    _worker     RunWorker (`corral worker`)        _scheduler   Scheduler (`corral scheduler`)
    _stack      Stack (`corral stack`)             _keys        credentials at rest
    _runs       submit, cancel, retry              _metrics     Prometheus metrics
"""

from corral.service._keys import KeyRing, KeyRingError, load_key_ring
from corral.service._runs import RunConflict, cancel_run, retry_run, submit_run
from corral.service.queue import WORKER_LOST, Lease, QueueError, RunQueue, SqliteQueue, open_queue
from corral.service.records import Records, RecordsError, open_records

__all__ = [
    "WORKER_LOST",
    "KeyRing",
    "KeyRingError",
    "Lease",
    "QueueError",
    "Records",
    "RecordsError",
    "RunConflict",
    "RunQueue",
    "SqliteQueue",
    "cancel_run",
    "load_key_ring",
    "open_queue",
    "open_records",
    "retry_run",
    "submit_run",
]
