"""The capabilities registry: which connector functions this deployment can run, and how.

Host side (DESIGN §9). The built-in operations are the functions with a
bespoke handler in the catalog. With GENERIC_EXECUTOR_ENABLED on, every
action and trigger with HTTP metadata (`method` and `endpoint`) is
runtime-ready too: through the generic path when it has no handler, and with
the generic path as its fallback when it has one. An app none of whose
functions can run (no handler, flag off) is not listed.

    {"github": {"actions": {"create_issue": {"runtimes": ["python"],
                                             "executor": "bespoke", "fallback": "generic"}},
                "triggers": {"new_issue": {"runtimes": ["python"],
                                           "executor": "generic", "fallback": None}}}}
"""

from __future__ import annotations

from typing import Any

from corral.config import FLAGS, Flags
from corral.executors import ConnectorFramework, Operation


def capabilities(framework: ConnectorFramework, *, flags: Flags = FLAGS) -> dict[str, Any]:
    """The registry map, apps sorted by id and functions in definition order."""
    generic = flags.GENERIC_EXECUTOR_ENABLED
    registry: dict[str, Any] = {}
    for app in framework.apps():
        connector = framework.connector(app)
        listed: dict[str, dict[str, Any]] = {"actions": {}, "triggers": {}}
        for kind, operations in (("actions", connector.actions), ("triggers", connector.triggers)):
            for operation in operations.values():
                bespoke = connector.handler(operation.id) is not None
                entry = _entry(operation, bespoke, generic)
                if entry is not None:
                    listed[kind][operation.id] = entry
        if any(listed.values()):
            registry[app] = listed
    return registry


def _entry(operation: Operation, bespoke: bool, generic: bool) -> dict[str, Any] | None:
    """How `operation` runs, or None when nothing here can run it."""
    http_ready = generic and operation.has_http_metadata
    if bespoke:
        executor, fallback = "bespoke", "generic" if http_ready else None
    elif http_ready:
        executor, fallback = "generic", None
    else:
        return None
    return {"runtimes": list(operation.runtimes), "executor": executor, "fallback": fallback}
