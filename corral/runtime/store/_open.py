"""Which store a deployment uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from corral._exceptions import ConfigError
from corral.runtime.store._base import Store, StoreError
from corral.runtime.store._sqlite import DB_NAME, SqliteStore

if TYPE_CHECKING:
    from corral.config import Settings


def open_store(settings: Settings, *, clock: Callable[[], float] = time.time) -> Store:
    """The deployment's store: Redis when CORRAL_REDIS_URL is set, else SQLite in CORRAL_STATE_DIR.

    Raises ConfigError, in one line naming the variable, when the store cannot be used.
    """
    if settings.redis_url:
        from corral.runtime.store._redis import RedisStore, _check_redis

        _check_redis(settings.redis_url)
        return RedisStore(settings.redis_url, clock=clock)
    state_dir = Path(settings.state_dir)
    where = f"corral: CORRAL_STATE_DIR={str(state_dir)!r} is unusable"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"{where}: {reason}; point it at a writable directory") from None
    try:
        return SqliteStore(state_dir / DB_NAME, clock=clock)
    except StoreError as exc:
        raise ConfigError(f"{where}: {exc}; point it at a writable directory") from None
