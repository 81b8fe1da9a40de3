"""What a service process sees: which queue and records it uses. `corral stack` compares
its children's views with its own before it declares itself ready."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from corral.config import Settings

_PASSWORD = re.compile(r"(://[^:/@]*:)[^/]*@")


def describe(settings: Settings) -> str:
    """`sqlite:<absolute state dir>`, or the Redis URL without its password."""
    if settings.redis_url:
        return _PASSWORD.sub(r"\1***@", settings.redis_url)
    return f"sqlite:{Path(settings.state_dir).resolve()}"
