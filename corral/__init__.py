"""corral: a sandboxed code-execution runtime for workflow connectors."""

from corral._exceptions import (
    Aborted,
    CodeError,
    ConfigError,
    CpuLimitExceeded,
    ExecutionTimeout,
    HeartbeatTimeout,
    HttpError,
    InvalidInput,
    LimitExceeded,
    MemoryLimitExceeded,
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
    "CodeError",
    "ConfigError",
    "CpuLimitExceeded",
    "ExecutionResult",
    "ExecutionTimeout",
    "HeartbeatTimeout",
    "HttpError",
    "InvalidInput",
    "LimitExceeded",
    "Limits",
    "LogEntry",
    "MemoryLimitExceeded",
    "NodeSandbox",
    "OutputLimitExceeded",
    "PolicyViolation",
    "SandboxCrash",
    "SandboxError",
    "Usage",
]
