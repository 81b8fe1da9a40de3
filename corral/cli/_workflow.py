"""`corral workflow run`: a workflow through the runtime in this process."""

from __future__ import annotations

import argparse
import asyncio
import json
import warnings
from typing import Any

from corral._exceptions import InvalidInput
from corral._warnings import claim
from corral.cli._common import UsageError, json_argument, printable, table
from corral.config import get_settings
from corral.sandbox._sandbox import NO_MEMORY_LIMIT


def add_commands(commands: Any) -> None:
    """Add `workflow run` to the `corral` command."""
    workflow = commands.add_parser(
        "workflow", help="workflows: run one", description="Run workflows."
    ).add_subparsers(dest="workflow_command", metavar="COMMAND", required=True)
    run_workflow = workflow.add_parser(
        "run",
        help="run a workflow through the runtime in this process",
        description="Run every node of the workflow in FILE (retries, circuit breakers, "
        "idempotent replays), each connector call in the sandbox. Exit status: 0 the run "
        "succeeded, 1 it failed, 2 the workflow, its input or the command line was wrong "
        "(nothing ran).",
    )
    run_workflow.add_argument("file", metavar="FILE", help="the workflow (JSON)")
    run_workflow.add_argument(
        "--input", default="{}", metavar="JSON", help="the run's input, as JSON or @FILE"
    )
    run_workflow.add_argument(
        "--connections", default="{}", metavar="JSON",
        help='app -> {"baseUrl", "credentials"}, as JSON or @FILE; credentials are secrets',
    )  # fmt: skip
    run_workflow.add_argument(
        "--run-id", metavar="ID", help="re-run this run: nodes that finished replay"
    )
    run_workflow.add_argument("--json", action="store_true", help="print one JSON object")
    run_workflow.set_defaults(handler=_run_workflow)


def _run_workflow(args: argparse.Namespace) -> int:
    from corral.runtime import WorkflowRuntime

    workflow = json_argument(args.file, f"@{args.file}")
    run_input = json_argument("--input", args.input)
    connections = json_argument("--connections", args.connections)

    async def run() -> Any:
        async with WorkflowRuntime(get_settings()) as runtime:
            return await runtime.run_workflow(
                workflow, input=run_input, connections=connections, run_id=args.run_id
            )

    # The warning about executions without a memory limit comes after the checks, in the
    # command's words, so that bad input is the one line a user sees.
    advise = get_settings().sandbox_max_memory_mb is None and claim(NO_MEMORY_LIMIT)
    try:
        outcome = asyncio.run(run())
    except InvalidInput as exc:
        raise UsageError(exc.message) from None
    if advise:
        warnings.warn(
            "executions have no memory limit; set SANDBOX_MAX_MEMORY_MB", RuntimeWarning, 1
        )
    if args.json:
        print(json.dumps(outcome.to_dict()))
    else:
        _print_run(outcome)
    return 0 if outcome.status == "succeeded" else 1


def _print_run(run: Any) -> None:
    """A table of the run's nodes, then each failed node's error."""
    print(f"run {printable(run.id)} of {printable(run.workflow_id)}: {run.status}")
    rows = [("node", "status", "executor", "attempts", "ms", "note")]
    for node in run.nodes.values():
        meta = node.metadata
        note = "replayed" if meta.get("replayed") else meta.get("fallback_reason") or ""
        if meta.get("circuit_state") not in (None, "closed"):
            note = f"circuit {meta['circuit_state']}" + (f"; {note}" if note else "")
        rows.append((
            node.id, node.status, str(meta.get("executor") or "-"), str(meta.get("attempts", 0)),
            f"{meta.get('execution_ms', 0):.0f}", note,
        ))  # fmt: skip
    for line in table(rows):
        print(f"  {line}")
    for node in run.nodes.values():
        if node.error is not None:
            print(f"  {node.id}: {node.error['type']}: {printable(str(node.error['message']))}")
