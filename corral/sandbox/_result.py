"""What a successful execution returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LogEntry:
    """One line the code logged (`log()`) or printed."""

    level: str
    message: str

    def to_dict(self) -> dict[str, str]:
        """The `{"level", "message"}` object of the JSON contract."""
        return {"level": self.level, "message": self.message}


@dataclass(frozen=True)
class Usage:
    """What an execution used: wall time, CPU time (user + sys), peak memory, and the
    requests it sent through `http` (not in the JSON contract's `usage`)."""

    wall_ms: float
    cpu_ms: float
    peak_memory_bytes: int | None
    http_requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The `usage` object of the JSON contract."""
        return {
            "wall_ms": round(self.wall_ms, 3),
            "cpu_ms": round(self.cpu_ms, 3),
            "peak_memory_bytes": self.peak_memory_bytes,
        }


@dataclass(frozen=True)
class ExecutionResult:
    """The output of an execution and what it logged and used.

    `isolation` says how the limits were enforced: `cgroup-v1`, `cgroup-v2`,
    or `degraded: <why>` when cgroups were unavailable (rlimits and polling).
    """

    output: Any
    logs: list[LogEntry]
    executor: str
    usage: Usage
    isolation: str

    def to_dict(self) -> dict[str, Any]:
        """The `corral run --json` object of a successful execution."""
        return {
            "ok": True,
            "output": self.output,
            "logs": [entry.to_dict() for entry in self.logs],
            "executor": self.executor,
            "usage": self.usage.to_dict(),
            "error": None,
            "isolation": self.isolation,
        }
