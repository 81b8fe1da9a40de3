"""Feature flags: read from the environment, overridable at run time, always resettable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from corral.config._settings import get_settings


class Flags:
    """Feature switches; an override set here wins over the env var until `reset()`."""

    _NAMES = ("GENERIC_EXECUTOR_ENABLED",)

    def __init__(self) -> None:
        self._overrides: dict[str, bool] = {}

    @property
    def GENERIC_EXECUTOR_ENABLED(self) -> bool:
        """Allow the fallback to GenericExecutor (env: GENERIC_EXECUTOR_ENABLED)."""
        override = self._overrides.get("GENERIC_EXECUTOR_ENABLED")
        return get_settings().generic_executor_enabled if override is None else override

    @GENERIC_EXECUTOR_ENABLED.setter
    def GENERIC_EXECUTOR_ENABLED(self, value: bool) -> None:
        self._overrides["GENERIC_EXECUTOR_ENABLED"] = bool(value)

    def reset(self) -> None:
        """Drop every override: the env vars decide again."""
        self._overrides.clear()

    @contextlib.contextmanager
    def override(self, **flags: bool) -> Iterator[Flags]:
        """Set flags for the duration of a `with` block, then restore them."""
        unknown = set(flags) - set(self._NAMES)
        if unknown:
            raise AttributeError(f"unknown flag(s): {', '.join(sorted(unknown))}")
        saved = dict(self._overrides)
        self._overrides.update({name: bool(value) for name, value in flags.items()})
        try:
            yield self
        finally:
            self._overrides = saved

    def __repr__(self) -> str:
        return f"Flags(GENERIC_EXECUTOR_ENABLED={self.GENERIC_EXECUTOR_ENABLED})"


FLAGS = Flags()
