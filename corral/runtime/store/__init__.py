"""The runtime's state store: idempotency records, circuit breakers and small keyed state.

One interface, `Store`, with two implementations that every process of a deployment shares:

    SqliteStore   corral.db in CORRAL_STATE_DIR, the default: WAL, and every
                  read-modify-write one BEGIN IMMEDIATE transaction (_sqlite.py)
    RedisStore    CORRAL_REDIS_URL: every operation one Lua script or one command (_redis.py)

`open_store(settings)` picks one. Deadlines are absolute times in seconds from the store's
clock (`time.time` unless one is given), so processes sharing a store must share a clock
(NTP); tests pass a clock they can move.
"""

from corral.runtime.store._base import (
    DEFAULT_LEASE_S,
    Admission,
    BreakerState,
    Claim,
    Store,
    StoreError,
)
from corral.runtime.store._open import open_store
from corral.runtime.store._redis import RedisStore
from corral.runtime.store._sqlite import SqliteStore

__all__ = [
    "DEFAULT_LEASE_S",
    "Admission",
    "BreakerState",
    "Claim",
    "RedisStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "open_store",
]
