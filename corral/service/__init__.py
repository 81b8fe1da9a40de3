"""The service: the run queue, run records, the worker, the HTTP API (issue 18)."""

from corral.service.queue import WORKER_LOST, Lease, QueueError, RunQueue, SqliteQueue, open_queue

__all__ = ["WORKER_LOST", "Lease", "QueueError", "RunQueue", "SqliteQueue", "open_queue"]
