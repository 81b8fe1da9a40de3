"""The sandbox: NodeSandbox, its limits and results, and the backends behind it."""

from corral.sandbox._limits import UNSET, Limits
from corral.sandbox._result import ExecutionResult, LogEntry, Usage
from corral.sandbox._sandbox import DEFAULT_TIMEOUT_MS, NodeSandbox

__all__ = [
    "DEFAULT_TIMEOUT_MS",
    "UNSET",
    "ExecutionResult",
    "Limits",
    "LogEntry",
    "NodeSandbox",
    "Usage",
]
