"""The run queue: one interface, `RunQueue`, two implementations.

    SqliteQueue   the embedded default: a table with leases in CORRAL_STATE_DIR/queue.db
    BullmqQueue   CORRAL_REDIS_URL: BullMQ's queue `corral-runs` (the `corral[redis]` extra),
                  shared with workers on other machines and with Node producers

`open_queue(settings)` picks one. Delivery is at least once: a run whose worker died is
taken back and run again (its finished nodes replay from the store).
"""

from corral.service.queue._base import (
    INVALID_INPUT,
    WORKER_LOST,
    Lease,
    QueueError,
    RunQueue,
)
from corral.service.queue._open import open_queue
from corral.service.queue._sqlite import SqliteQueue

__all__ = [
    "INVALID_INPUT",
    "WORKER_LOST",
    "Lease",
    "QueueError",
    "RunQueue",
    "SqliteQueue",
    "open_queue",
]
