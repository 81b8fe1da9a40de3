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

__all__ = [
    "FLAGS",
    "UNSET",
    "Aborted",
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
    "SandboxCrash",
    "SandboxError",
    "Usage",
]
