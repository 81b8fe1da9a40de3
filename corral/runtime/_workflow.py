"""WorkflowRuntime: a workflow's nodes, in dependency order, each through RetryManager.

Host side (DESIGN §7). The whole workflow is checked before anything runs:
apps and functions exist, `dependsOn` names nodes and has no cycle, every
`{{ nodes.ID.… }}` template names a node the node depends on, every
`{{ input.… }}` template resolves, node policies are valid. Then nodes run
as soon as what they depend on succeeded (independent nodes concurrently);
the dependants of a failed node do not run. Each node's idempotency key is
derived from the run id and the node id (or given), and its fingerprint from
the app, function and resolved params: re-running a run id replays the nodes
that finished, and a re-run with other params is `idempotency_conflict`.
"""

from __future__ import annotations

import asyncio
import graphlib
import hashlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from corral._exceptions import InvalidInput
from corral.config import FLAGS, Flags, Settings, get_settings
from corral.executors import (
    ConnectorFramework,
    IntegrationManager,
    missing_credentials,
    normalise_app_id,
)
from corral.runtime import _events as events
from corral.runtime._canonical import canonical_digest
from corral.runtime._retry import CircuitBreakerPolicy, RetryManager, RetryPolicy
from corral.runtime._triggers import TriggerPoller
from corral.runtime.store import Store, open_store
from corral.sandbox import NodeSandbox

_TEMPLATE = re.compile(r"\{\{([^{}]*)\}\}")  # linear: the expression is stripped after
MAX_NODES = 500  # a workflow is a handful of calls; this bounds checking and running it
MAX_NODE_TIMEOUT_MS = 600_000  # one attempt of one node: ten minutes
_NODE_ID = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*\Z")
_NODE_FIELDS = frozenset(
    {"id", "app", "function", "params", "dependsOn", "retry", "breaker", "idempotency_key",
     "timeout_ms", "name"}
)  # fmt: skip


@dataclass
class NodeRun:
    """One node of a run: its status, output, metadata (DESIGN §7) and error."""

    id: str
    status: str = "pending"  # succeeded | failed | skipped
    output: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    # The last attempt's log lines (secrets redacted) and usage; not in the CLI's object
    # (`to_dict`), shown by the service's run records.
    logs: list[dict[str, str]] = field(default_factory=list)
    usage: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """`{"status", "output", "metadata", "error"}`."""
        return {
            "status": self.status,
            "output": self.output,
            "metadata": self.metadata,
            "error": self.error,
        }


@dataclass
class WorkflowRun:
    """A run of a workflow: `status` is "succeeded" or "failed"; `nodes` by id."""

    id: str
    workflow_id: str
    status: str
    nodes: dict[str, NodeRun]

    def to_dict(self) -> dict[str, Any]:
        """The `corral workflow run --json` object."""
        return {
            "id": self.id,
            "workflow": self.workflow_id,
            "status": self.status,
            "nodes": {node_id: node.to_dict() for node_id, node in self.nodes.items()},
        }


@dataclass(frozen=True)
class _Node:
    id: str
    app: str
    function: str
    params: Any
    depends_on: tuple[str, ...]
    retry: RetryPolicy
    breaker: CircuitBreakerPolicy
    idempotency_key: str | None
    timeout_ms: int | None


class WorkflowRuntime:
    """Runs workflows: catalog, store, sandbox and flags from the environment unless given."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        framework: ConnectorFramework | None = None,
        store: Store | None = None,
        sandbox: NodeSandbox | None = None,
        flags: Flags = FLAGS,
        retry_manager: RetryManager | None = None,
    ) -> None:
        self.settings = settings if settings is not None else get_settings()
        self.framework = framework or ConnectorFramework.from_settings(self.settings)
        self._own_sandbox = sandbox is None
        self._sandbox = sandbox
        self._flags = flags
        self._integrations: IntegrationManager | None = None
        self._store = store
        self._retry_manager = retry_manager
        self.retry_policy = RetryPolicy.from_settings(self.settings)
        self.breaker_policy = CircuitBreakerPolicy.from_settings(self.settings)

    async def _retries(self) -> RetryManager:
        if self._retry_manager is None:
            if self._store is None:
                self._store = open_store(self.settings)
            self._retry_manager = RetryManager(
                self._store,
                idempotency_ttl_s=self.settings.idempotency_ttl_s,
                claim_lease_s=self.settings.lease_s,
            )
        return self._retry_manager

    @property
    def integrations(self) -> IntegrationManager:
        """The IntegrationManager over this runtime's sandbox (made on first use)."""
        if self._integrations is None:
            if self._sandbox is None:
                self._sandbox = NodeSandbox(settings=self.settings)
            self._integrations = IntegrationManager(
                self.framework, self._sandbox, flags=self._flags
            )
        return self._integrations

    async def trigger_poller(self) -> TriggerPoller:
        """A TriggerPoller over this runtime's catalog, sandbox, flags and store."""
        retries = await self._retries()
        return TriggerPoller(
            self.integrations, retries.store, seen_ttl_s=self.settings.trigger_seen_ttl_s
        )

    async def aclose(self) -> None:
        """Close the store and the sandbox this runtime made."""
        if self._store is not None:
            await self._store.close()
        if self._own_sandbox and self._sandbox is not None:
            self._sandbox.close()

    async def __aenter__(self) -> WorkflowRuntime:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def run_workflow(
        self,
        workflow: dict[str, Any],
        input: dict[str, Any] | None = None,
        connections: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> WorkflowRun:
        """Run every node; InvalidInput (nothing run) when the workflow or input is wrong."""
        workflow_id, nodes = self.check(workflow, input or {})
        connections = _checked_connections(connections)
        self._check_connections(workflow_id, nodes, connections)
        run_id = run_id or uuid.uuid4().hex
        if not isinstance(run_id, str) or not run_id.strip() or len(run_id) > 200:
            raise InvalidInput("run_id must be a non-empty string of at most 200 characters")
        retries = await self._retries()
        run = WorkflowRun(run_id, workflow_id, "running", {n.id: NodeRun(n.id) for n in nodes})
        order = graphlib.TopologicalSorter({n.id: n.depends_on for n in nodes})
        order.prepare()
        by_id = {n.id: n for n in nodes}
        running: dict[asyncio.Task[None], str] = {}
        try:
            while order.is_active():
                for node_id in order.get_ready():
                    node = by_id[node_id]
                    failed = [d for d in node.depends_on if run.nodes[d].status != "succeeded"]
                    if failed:
                        run.nodes[node_id].status = "skipped"
                        run.nodes[node_id].error = {
                            "type": "aborted",
                            "message": f"not run: {failed[0]!r}, which it depends on, "
                            f"{run.nodes[failed[0]].status}",
                        }
                        order.done(node_id)
                        continue
                    task = asyncio.ensure_future(
                        self._run_node(retries, run, node, input or {}, connections)
                    )
                    running[task] = node_id
                if not running:
                    continue
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
                    order.done(running.pop(task))
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)
        failed_any = any(node.status != "succeeded" for node in run.nodes.values())
        run.status = "failed" if failed_any else "succeeded"
        events.emit("run.finished", run=run_id, workflow=workflow_id, status=run.status)
        return run

    async def _run_node(
        self,
        retries: RetryManager,
        run: WorkflowRun,
        node: _Node,
        run_input: dict[str, Any],
        connections: dict[str, Any],
    ) -> None:
        result = run.nodes[node.id]
        started = time.monotonic()
        events.emit("node.started", run=run.id, node=node.id, connector=node.app)
        try:
            await self._node_body(retries, run, node, run_input, connections, result, started)
        finally:
            events.emit(
                "node.finished", run=run.id, node=node.id, connector=node.app,
                status=result.status, error_type=(result.error or {}).get("type"),
            )  # fmt: skip

    async def _node_body(
        self,
        retries: RetryManager,
        run: WorkflowRun,
        node: _Node,
        run_input: dict[str, Any],
        connections: dict[str, Any],
        result: NodeRun,
        started: float,
    ) -> None:
        key = node.idempotency_key or _derived_key(run.id, node.id)
        metadata: dict[str, Any] = {
            "executor": None, "fallback_reason": None, "execution_ms": 0.0, "attempts": 0,
            "idempotency_key": key, "replayed": False, "circuit_state": "closed",
        }  # fmt: skip
        result.metadata = metadata
        try:
            params = _render(node.params, run_input, run, where=f"node {node.id!r}")
            if node.idempotency_key is not None:
                key = metadata["idempotency_key"] = str(
                    _render(node.idempotency_key, run_input, run, where=f"node {node.id!r}")
                )
        except InvalidInput as exc:
            result.status, result.error = "failed", exc.to_dict()
            return
        app = normalise_app_id(node.app)
        connection = connections.get(app)
        where_to = (connection or {}).get("baseUrl")
        # Who is called, and as whom, is part of what a replay must match.
        identity = canonical_digest([where_to, (connection or {}).get("credentials")])
        fingerprint = canonical_digest([app, node.function, params, identity])

        async def call() -> dict[str, Any]:
            attempt_started = time.monotonic()
            done = await self.integrations.execute(
                app, node.function, params, connection, timeout_ms=node.timeout_ms
            )
            elapsed = time.monotonic() - attempt_started
            events.DURATION.labels(app, node.function, done.executor).observe(elapsed)
            if done.executor == "generic":
                events.FALLBACKS.labels(app, node.function).inc()
                events.emit(
                    "node.fallback", run=run.id, connector=app, node=node.id,
                    reason=done.fallback_reason,
                )  # fmt: skip
            return {
                "output": done.output,
                "executor": done.executor,
                "fallback_reason": done.fallback_reason,
                "execution_ms": round(elapsed * 1000, 3),
                "logs": [entry.to_dict() for entry in done.execution.logs],
                "usage": done.execution.usage.to_dict(),
            }

        outcome = await retries.execute_with_retry(
            call, connector=app, node=node.id, function=node.function, key=key,
            fingerprint=fingerprint,
            policy=node.retry, breaker=node.breaker, context={"run": run.id},
            destination=canonical_digest(where_to)[:12] if where_to else "",
        )  # fmt: skip
        metadata.update(attempts=outcome.attempts, replayed=outcome.replayed)
        metadata["circuit_state"] = outcome.circuit_state
        if outcome.record is not None:
            record = outcome.record
            metadata["executor"] = record.get("executor")
            metadata["fallback_reason"] = record.get("fallback_reason")
            result.output = record.get("output")
            result.logs, result.usage = record.get("logs") or [], record.get("usage")
            result.status = "succeeded"
        else:
            assert outcome.error is not None
            result.status, result.error = "failed", outcome.error.to_dict()
            result.logs = [entry.to_dict() for entry in outcome.error.logs or []]
            usage = outcome.error.usage
            result.usage = usage.to_dict() if usage is not None else None
        metadata["execution_ms"] = round((time.monotonic() - started) * 1000, 3)
        if outcome.replayed:
            metadata["execution_ms"] = (outcome.record or {}).get("execution_ms", 0.0)

    def _check_connections(
        self, workflow_id: str, nodes: list[_Node], connections: dict[str, Any]
    ) -> None:
        """InvalidInput for a connection no node uses (a typo such as `githubb`) and for
        credentials a node's app needs (its definition's `auth`) that its connection lacks."""
        used = sorted({normalise_app_id(node.app) for node in nodes})
        for app in connections:
            if app not in used:
                raise InvalidInput(
                    f"connections: no node of workflow {workflow_id!r} uses the app {app!r}; "
                    f"it uses {', '.join(used)}"
                )
        for app in used:
            connection = connections.get(app) or {}
            problem = missing_credentials(
                self.integrations.framework.connector(app).auth, connection.get("credentials")
            )
            if problem is not None:
                raise InvalidInput(f"connections: the {app} connection {problem}")

    def check(self, workflow: Any, run_input: Any) -> tuple[str, list[_Node]]:
        """The workflow's id and nodes, checked; InvalidInput naming the first culprit."""
        if not isinstance(workflow, dict):
            raise InvalidInput("the workflow must be a JSON object with `id` and `nodes`")
        workflow_id = str(workflow.get("id") or "workflow")
        raw_nodes = workflow.get("nodes")
        if not isinstance(raw_nodes, list) or not 0 < len(raw_nodes) <= MAX_NODES:
            raise InvalidInput(
                f"workflow {workflow_id!r}: `nodes` must be a list of 1 to {MAX_NODES} nodes"
            )
        if not isinstance(run_input, dict):
            raise InvalidInput("the input must be a JSON object")
        nodes = [self._node(workflow_id, index, raw) for index, raw in enumerate(raw_nodes)]
        seen: set[str] = set()
        for node in nodes:
            if node.id in seen:
                raise InvalidInput(f"workflow {workflow_id!r}: node id {node.id!r} is used twice")
            seen.add(node.id)
        graph = {node.id: node.depends_on for node in nodes}
        for node in nodes:
            for dependency in node.depends_on:
                if dependency not in graph:
                    raise InvalidInput(
                        f"workflow {workflow_id!r}: node {node.id!r} depends on {dependency!r}, "
                        "which is not a node of this workflow"
                    )
        try:
            tuple(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            cycle = " -> ".join(exc.args[1])
            message = f"workflow {workflow_id!r}: dependsOn has a cycle: {cycle}"
            raise InvalidInput(message) from None
        for node in nodes:
            _check_templates(workflow_id, node, graph, run_input)
        return workflow_id, nodes

    def _node(self, workflow_id: str, index: int, raw: Any) -> _Node:
        where = f"workflow {workflow_id!r}: nodes[{index}]"
        if not isinstance(raw, dict):
            raise InvalidInput(f"{where}: must be an object")
        node_id = raw.get("id")
        if not isinstance(node_id, str) or not _NODE_ID.match(node_id):
            raise InvalidInput(f"{where}: `id` must be a name such as 'create_issue'")
        where = f"workflow {workflow_id!r}: node {node_id!r}"
        unknown = set(raw) - _NODE_FIELDS
        if unknown:
            raise InvalidInput(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        app, function = raw.get("app"), raw.get("function")
        if not isinstance(app, str) or not isinstance(function, str):
            raise InvalidInput(f"{where}: `app` and `function` must be strings")
        try:
            self.framework.connector(app).operation(function)
        except InvalidInput as exc:
            raise InvalidInput(f"{where}: {exc.message}") from None
        params = raw.get("params", {})
        if not isinstance(params, dict):
            raise InvalidInput(f"{where}: `params` must be an object")
        depends_on = raw.get("dependsOn", [])
        if not isinstance(depends_on, list) or not all(isinstance(d, str) for d in depends_on):
            raise InvalidInput(f"{where}: `dependsOn` must be a list of node ids")
        timeout_ms = raw.get("timeout_ms")
        if timeout_ms is not None and (
            type(timeout_ms) is not int or not 0 < timeout_ms <= MAX_NODE_TIMEOUT_MS
        ):
            raise InvalidInput(
                f"{where}: `timeout_ms` must be a whole number from 1 to {MAX_NODE_TIMEOUT_MS}"
            )
        key = raw.get("idempotency_key")
        if key is not None and not isinstance(key, str):
            raise InvalidInput(f"{where}: `idempotency_key` must be a string")
        return _Node(
            id=node_id,
            app=app,
            function=function,
            params=params,
            depends_on=tuple(dict.fromkeys(depends_on)),
            retry=self.retry_policy.with_overrides(raw.get("retry"), f"{where}: retry"),
            breaker=self.breaker_policy.with_overrides(raw.get("breaker"), f"{where}: breaker"),
            idempotency_key=key,
            timeout_ms=timeout_ms,
        )


def _checked_connections(connections: Any) -> dict[str, Any]:
    if connections is None:
        return {}
    if not isinstance(connections, dict) or not all(
        isinstance(value, dict) for value in connections.values()
    ):
        raise InvalidInput(
            'connections must be an object of app -> {"baseUrl": ..., "credentials": {...}}'
        )
    return {normalise_app_id(app): value for app, value in connections.items()}


def _derived_key(run_id: str, node_id: str) -> str:
    return hashlib.sha256(f"{run_id}\0{node_id}".encode()).hexdigest()[:32]


def _references(value: Any) -> list[str]:
    """The expressions of every template in `value` (strings inside lists and dicts)."""
    found: list[str] = []
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            found.extend(match.group(1).strip() for match in _TEMPLATE.finditer(item))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return found


def _ancestors(graph: dict[str, tuple[str, ...]], node_id: str) -> set[str]:
    seen: set[str] = set()
    pending = list(graph[node_id])
    while pending:
        current = pending.pop()
        if current not in seen:
            seen.add(current)
            pending.extend(graph[current])
    return seen


def _check_templates(
    workflow_id: str, node: _Node, graph: dict[str, tuple[str, ...]], run_input: dict[str, Any]
) -> None:
    where = f"workflow {workflow_id!r}: node {node.id!r}"
    expressions = _references(node.params) + _references(node.idempotency_key or "")
    ancestors = _ancestors(graph, node.id) if expressions else set()
    for expression in expressions:
        parts = expression.split(".")
        if parts[0] == "input":
            _lookup(run_input, parts[1:], f"{where}: {{{{ {expression} }}}}")
        elif parts[0] == "nodes" and len(parts) >= 3 and parts[2] == "output":
            if parts[1] not in graph:
                raise InvalidInput(
                    f"{where}: {{{{ {expression} }}}} names node {parts[1]!r}, which is not "
                    "a node of this workflow"
                )
            if parts[1] not in ancestors:
                raise InvalidInput(
                    f"{where}: {{{{ {expression} }}}} uses node {parts[1]!r}, which it does not "
                    f"depend on: add {parts[1]!r} to its dependsOn"
                )
        else:
            raise InvalidInput(
                f"{where}: {{{{ {expression} }}}} is not a template corral knows: use "
                "{{ input.FIELD }} or {{ nodes.ID.output.FIELD }}"
            )


def _lookup(value: Any, path: list[str], where: str) -> Any:
    for part in path:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise InvalidInput(f"{where}: there is no {part!r} there")
    return value


def _render(value: Any, run_input: dict[str, Any], run: WorkflowRun, *, where: str) -> Any:
    """`value` with its templates filled in; a string that is one template keeps its type."""

    def resolve(expression: str) -> Any:
        parts = expression.strip().split(".")
        if parts[0] == "input":
            return _lookup(run_input, parts[1:], f"{where}: {{{{ {expression} }}}}")
        upstream = run.nodes[parts[1]]
        return _lookup(upstream.output, parts[3:], f"{where}: {{{{ {expression} }}}}")

    if isinstance(value, str):
        whole = _TEMPLATE.fullmatch(value.strip())
        if whole is not None:
            return resolve(whole.group(1))

        def text(match: re.Match[str]) -> str:
            found = resolve(match.group(1))
            return found if isinstance(found, str) else json.dumps(found)

        return _TEMPLATE.sub(text, value)
    if isinstance(value, dict):
        return {k: _render(v, run_input, run, where=where) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, run_input, run, where=where) for v in value]
    return value
