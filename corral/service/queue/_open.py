"""Which run queue a deployment uses."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from corral._exceptions import ConfigError
from corral.runtime.store._sqlite import DB_NAME as LEGACY_DB_NAME
from corral.service.queue._base import QueueError, RunQueue
from corral.service.queue._sqlite import DB_NAME, SqliteQueue

if TYPE_CHECKING:
    from corral.config import Settings


def open_queue(settings: Settings) -> RunQueue:
    """The deployment's run queue: BullMQ on CORRAL_REDIS_URL when set, else the embedded
    SQLite queue in CORRAL_STATE_DIR. Raises ConfigError, naming the variable, when it
    cannot be used."""
    options = {"lease_s": settings.lease_s, "max_reclaims": settings.max_reclaims}
    if settings.redis_url:
        try:
            from corral.service.queue._bullmq import BullmqQueue
        except ImportError as exc:
            raise ConfigError(
                f"corral: CORRAL_REDIS_URL is set but the Redis queue needs {exc.name!r}: "
                "pip install 'corral[redis]', or unset CORRAL_REDIS_URL for the embedded queue"
            ) from None
        try:
            return BullmqQueue(settings.redis_url, **options)
        except QueueError as exc:
            raise ConfigError(f"corral: CORRAL_REDIS_URL is unusable: {exc}") from None
    state_dir = Path(settings.state_dir)
    where = f"corral: CORRAL_STATE_DIR={str(state_dir)!r} is unusable"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        # Before it had a file of its own, this was kept in the runtime store's database:
        # a new file takes what that held.
        return SqliteQueue(state_dir / DB_NAME, legacy=state_dir / LEGACY_DB_NAME, **options)
    except (OSError, QueueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{where}: {reason}; point it at a writable directory") from None
