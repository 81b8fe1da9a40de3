"""Which records a deployment uses: on Redis beside the queue, or in the state database."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from corral._exceptions import ConfigError
from corral.runtime.store._sqlite import DB_NAME as LEGACY_DB_NAME
from corral.service.records._base import Records, RecordsError
from corral.service.records._redis import RedisRecords
from corral.service.records._sqlite import DB_NAME, SqliteRecords

if TYPE_CHECKING:
    from corral.config import Settings


def open_records(settings: Settings) -> Records:
    """Redis when CORRAL_REDIS_URL is set, else SQLite in CORRAL_STATE_DIR; ConfigError,
    naming the variable, when they cannot be used."""
    if settings.redis_url:
        try:
            return RedisRecords(settings.redis_url)
        except RecordsError as exc:
            raise ConfigError(f"corral: CORRAL_REDIS_URL is unusable: {exc}") from None
    state_dir = Path(settings.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        # Before it had a file of its own, this was kept in the runtime store's database:
        # a new file takes what that held.
        return SqliteRecords(state_dir / DB_NAME, legacy=state_dir / LEGACY_DB_NAME)
    except (OSError, RecordsError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"corral: CORRAL_STATE_DIR={str(state_dir)!r} is unusable: {reason}; "
            "point it at a writable directory"
        ) from None
