"""Limits of one execution: small immutable values with env-driven defaults."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

from corral._exceptions import ConfigError
from corral.config import Settings


class _Unset:
    """The type of UNSET."""

    _instance: _Unset | None = None

    def __new__(cls) -> _Unset:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


#: "Use the deployment's default" (from the env); `None` means "no limit".
UNSET: Final = _Unset()

_NULLABLE = ("max_cpu_ms", "cpu_quota_ms", "max_memory_mb")
_SETTING_OF = {
    "max_cpu_ms": "sandbox_max_cpu_ms",
    "cpu_quota_ms": "sandbox_cpu_quota_ms",
    "max_memory_mb": "sandbox_max_memory_mb",
    "heartbeat_interval_ms": "sandbox_heartbeat_interval_ms",
    "heartbeat_timeout_ms": "sandbox_heartbeat_timeout_ms",
    "max_output_bytes": "max_output_bytes",
    "max_log_bytes": "max_log_bytes",
}
MIN_HEARTBEAT_INTERVAL_MS = 25  # below this the heartbeat itself costs real CPU


@dataclass(frozen=True)
class Limits:
    """What one execution may use. Fields left UNSET take the deployment's defaults.

    `None` means no limit (for the CPU, quota and memory limits only).
    """

    max_cpu_ms: int | _Unset | None = UNSET
    cpu_quota_ms: int | _Unset | None = UNSET
    max_memory_mb: int | _Unset | None = UNSET
    heartbeat_interval_ms: int | _Unset = UNSET
    heartbeat_timeout_ms: int | _Unset = UNSET
    max_output_bytes: int | _Unset = UNSET
    max_log_bytes: int | _Unset = UNSET

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is UNSET or (value is None and field.name in _NULLABLE):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                allowed = "a positive integer" + (" or None" if field.name in _NULLABLE else "")
                raise ConfigError(f"Limits.{field.name}={value!r} is invalid: expected {allowed}")
        interval, timeout = self.heartbeat_interval_ms, self.heartbeat_timeout_ms
        if isinstance(interval, int) and interval < MIN_HEARTBEAT_INTERVAL_MS:
            raise ConfigError(
                f"Limits.heartbeat_interval_ms={interval} is invalid: "
                f"expected at least {MIN_HEARTBEAT_INTERVAL_MS}"
            )
        if isinstance(interval, int) and isinstance(timeout, int) and timeout < 2 * interval:
            raise ConfigError(
                f"Limits.heartbeat_timeout_ms={timeout} is invalid: expected at least twice "
                f"heartbeat_interval_ms ({interval})"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """The deployment's defaults, every field set."""
        return cls(**{name: getattr(settings, setting) for name, setting in _SETTING_OF.items()})

    def set_fields(self) -> dict[str, Any]:
        """The fields that are not UNSET."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not UNSET
        }

    def resolve(self) -> ResolvedLimits:
        """These limits with every field decided; ConfigError names a field left UNSET."""
        unset = [name for name, value in vars(self).items() if value is UNSET]
        if unset:
            raise ConfigError(f"Limits has no value for {', '.join(unset)}")
        return ResolvedLimits(**vars(self))

    def merged(self, override: Limits | None) -> Limits:
        """These limits with every field set in `override` replaced."""
        if override is None:
            return self
        return dataclasses.replace(self, **override.set_fields())


@dataclass(frozen=True)
class ResolvedLimits:
    """Limits with every field decided: what a backend enforces. None means no limit."""

    max_cpu_ms: int | None
    cpu_quota_ms: int | None
    max_memory_mb: int | None
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    max_output_bytes: int
    max_log_bytes: int

    @property
    def max_memory_bytes(self) -> int | None:
        """The memory limit in bytes."""
        return None if self.max_memory_mb is None else self.max_memory_mb << 20
