"""corral: a sandboxed code-execution runtime for workflow connectors."""

from corral._exceptions import (
    Aborted,
    CircuitOpen,
    CodeError,
    ConfigError,
    CpuLimitExceeded,
    ExecutionTimeout,
    HeartbeatTimeout,
    HttpError,
    IdempotencyConflict,
    InvalidInput,
    LimitExceeded,
    MemoryLimitExceeded,
    NotSupported,
    OutputLimitExceeded,
    PolicyViolation,
    SandboxCrash,
    SandboxError,
)
from corral.config import FLAGS
from corral.sandbox import UNSET, ExecutionResult, Limits, LogEntry, NodeSandbox, Usage

__version__ = "0.1.0"

#: Names of the runtime, imported on first use: `import corral` stays light for the
#: sandbox alone (the runtime brings jsonschema, redis and prometheus-client).
_RUNTIME = ("CircuitBreakerPolicy", "RetryManager", "RetryPolicy", "WorkflowRuntime")


def __getattr__(name: str) -> object:
    if name in _RUNTIME:
        import corral.runtime

        return getattr(corral.runtime, name)
    raise AttributeError(f"module 'corral' has no attribute {name!r}")


__all__ = [
    "FLAGS",
    "UNSET",
    "Aborted",
    "CircuitBreakerPolicy",
    "CircuitOpen",
    "CodeError",
    "ConfigError",
    "CpuLimitExceeded",
    "ExecutionResult",
    "ExecutionTimeout",
    "HeartbeatTimeout",
    "HttpError",
    "IdempotencyConflict",
    "InvalidInput",
    "LimitExceeded",
    "Limits",
    "LogEntry",
    "MemoryLimitExceeded",
    "NodeSandbox",
    "NotSupported",
    "OutputLimitExceeded",
    "PolicyViolation",
    "RetryManager",
    "RetryPolicy",
    "SandboxCrash",
    "SandboxError",
    "Usage",
    "WorkflowRuntime",
]
