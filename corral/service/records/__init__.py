"""Run records, stored workflows and worker heartbeats (the record shape: `_base`).

SqliteRecords   tables in the state database in CORRAL_STATE_DIR (the default)
RedisRecords    on CORRAL_REDIS_URL, beside the BullMQ queue
"""

from corral.service.records._base import (
    FINISHED,
    RUN_STATUSES,
    Records,
    RecordsError,
    new_run,
    run_summary,
)
from corral.service.records._open import open_records
from corral.service.records._redis import RedisRecords
from corral.service.records._sqlite import SqliteRecords

__all__ = [
    "FINISHED",
    "RUN_STATUSES",
    "Records",
    "RecordsError",
    "RedisRecords",
    "SqliteRecords",
    "new_run",
    "open_records",
    "run_summary",
]
