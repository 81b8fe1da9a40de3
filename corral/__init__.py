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

__version__ = "0.1.0"

#: Where each name that is not an exception lives. They are imported on first use (PEP 562),
#: so that `import corral` costs next to nothing: settings bring pydantic, the sandbox
#: asyncio, the runtime jsonschema, redis and prometheus-client.
_LAZY = {
    "FLAGS": "corral.config",
    **dict.fromkeys(
        ("UNSET", "ExecutionResult", "Limits", "LogEntry", "NodeSandbox", "Usage"),
        "corral.sandbox",
    ),
    **dict.fromkeys(
        ("CircuitBreakerPolicy", "RetryManager", "RetryPolicy", "WorkflowRuntime"),
        "corral.runtime",
    ),
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next read is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
