"""The runtime: workflows through RetryManager (retries, circuit breakers, idempotent
replays) over a state store shared by every process (SQLite, or Redis); polling triggers;
the capabilities registry."""

from corral.runtime._registry import capabilities
from corral.runtime._retry import (
    CircuitBreakerPolicy,
    RetryManager,
    RetryOutcome,
    RetryPolicy,
)
from corral.runtime._triggers import TriggerItem, TriggerPoll, TriggerPoller
from corral.runtime._workflow import NodeRun, WorkflowRun, WorkflowRuntime
from corral.runtime.store import (
    BreakerState,
    Claim,
    RedisStore,
    SqliteStore,
    Store,
    StoreError,
    open_store,
)

__all__ = [
    "BreakerState",
    "CircuitBreakerPolicy",
    "Claim",
    "NodeRun",
    "RedisStore",
    "RetryManager",
    "RetryOutcome",
    "RetryPolicy",
    "SqliteStore",
    "Store",
    "StoreError",
    "TriggerItem",
    "TriggerPoll",
    "TriggerPoller",
    "WorkflowRun",
    "WorkflowRuntime",
    "capabilities",
    "open_store",
]
