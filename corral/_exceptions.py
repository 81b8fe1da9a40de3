"""Every error corral raises, in one shallow tree.

    SandboxError                 an execution did not produce a result
    ├── LimitExceeded            the code ran into a limit and was stopped
    │   ├── ExecutionTimeout     "timeout"            wall-clock time-out
    │   ├── CpuLimitExceeded     "cpu_limit"          CPU time (user + sys)
    │   ├── MemoryLimitExceeded  "memory_limit"       memory of the execution
    │   ├── HeartbeatTimeout     "heartbeat_timeout"  the sandbox stopped proving it is alive
    │   └── OutputLimitExceeded  "output_limit"       output or logs too large
    ├── PolicyViolation          "policy_violation"   the code touched something it may not
    ├── CodeError                "code_error"         the code failed on its own
    ├── InvalidInput             "invalid_input"      the request was wrong; nothing ran
    ├── Aborted                  "aborted"            the sandbox was closed or the host stopped
    ├── SandboxCrash             "sandbox_crash"      the sandbox died without an answer
    ├── HttpError                "http_error"         an HTTP error (or no response) left uncaught
    ├── CircuitOpen              "circuit_open"       the connector's breaker is open: not run
    ├── NotSupported             "not_supported"      no bespoke handler and no fallback allowed
    └── IdempotencyConflict      "idempotency_conflict"  a key reused with other params

    ConfigError                  a setting or argument is invalid, or the API is misused

Every `SandboxError` carries its stable `.type` string, a message, the logs
captured before it happened and the usage so far.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from corral.sandbox._result import LogEntry, Usage

__all__ = [
    "Aborted",
    "CircuitOpen",
    "CodeError",
    "ConfigError",
    "CpuLimitExceeded",
    "ExecutionTimeout",
    "HeartbeatTimeout",
    "HttpError",
    "IdempotencyConflict",
    "InvalidInput",
    "LimitExceeded",
    "MemoryLimitExceeded",
    "NotSupported",
    "OutputLimitExceeded",
    "PolicyViolation",
    "SandboxCrash",
    "SandboxError",
    "error_for_type",
]


class ConfigError(Exception):
    """A setting is invalid; the message is one line naming it and what is allowed."""


class SandboxError(Exception):
    """Base of every failed execution."""

    type: ClassVar[str] = "sandbox_error"

    def __init__(
        self,
        message: str,
        *,
        logs: list[LogEntry] | None = None,
        usage: Usage | None = None,
        executor: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.logs: list[LogEntry] = list(logs or [])
        self.usage = usage
        self.executor = executor

    def to_dict(self) -> dict[str, Any]:
        """The `{"type", "message"}` object of the JSON contract."""
        return {"type": self.type, "message": self.message}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(type={self.type!r}, message={self.message!r})"


class LimitExceeded(SandboxError):
    """The execution ran into one of its limits and was stopped."""


class ExecutionTimeout(LimitExceeded):
    """The wall-clock time-out passed."""

    type = "timeout"


class CpuLimitExceeded(LimitExceeded):
    """The execution used more CPU time than allowed."""

    type = "cpu_limit"


class MemoryLimitExceeded(LimitExceeded):
    """The execution used more memory than allowed."""

    type = "memory_limit"


class HeartbeatTimeout(LimitExceeded):
    """The sandbox went silent for longer than the heartbeat time-out (hung)."""

    type = "heartbeat_timeout"


class OutputLimitExceeded(LimitExceeded):
    """The output or the logs grew past their cap."""

    type = "output_limit"


class PolicyViolation(SandboxError):
    """The code used something the sandbox policy forbids."""

    type = "policy_violation"


class CodeError(SandboxError):
    """The code failed on its own: a syntax error or an uncaught exception."""

    type = "code_error"


class InvalidInput(SandboxError):
    """The request was invalid (bad params, missing entry point); nothing ran."""

    type = "invalid_input"


class Aborted(SandboxError):
    """The execution was cut short by closing the sandbox or stopping the host."""

    type = "aborted"


class SandboxCrash(SandboxError):
    """The sandbox process died without giving an answer."""

    type = "sandbox_crash"


class HttpError(SandboxError):
    """The code left an HTTP error uncaught: `raise_for_status()` (`status` is the HTTP
    status, which the retry policy treats as such: a 503 is retried, a 404 is not) or a
    request that got no response (`status` None: a connection error, retried)."""

    type = "http_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message, **details)
        self.status = status
        self.retry_after_s = retry_after_s  # from the response's Retry-After, if any

    def to_dict(self) -> dict[str, Any]:
        """`{"type", "message", "status"}`."""
        return {**super().to_dict(), "status": self.status}


class CircuitOpen(SandboxError):
    """The circuit breaker of the connector/node pair is open: the call failed fast."""

    type = "circuit_open"


class NotSupported(SandboxError):
    """The function has no bespoke handler, and the generic fallback is not allowed."""

    type = "not_supported"


class IdempotencyConflict(SandboxError):
    """The idempotency key was used before with different params; nothing ran."""

    type = "idempotency_conflict"


_BY_TYPE: dict[str, type[SandboxError]] = {
    cls.type: cls
    for cls in (
        ExecutionTimeout,
        CpuLimitExceeded,
        MemoryLimitExceeded,
        HeartbeatTimeout,
        OutputLimitExceeded,
        PolicyViolation,
        CodeError,
        InvalidInput,
        Aborted,
        SandboxCrash,
        HttpError,
        CircuitOpen,
        NotSupported,
        IdempotencyConflict,
    )
}


def error_for_type(error_type: str) -> type[SandboxError]:
    """The exception class of a stable error type string."""
    return _BY_TYPE[error_type]
