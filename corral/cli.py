"""The `corral` command.

Exit status: 0 the execution (or the workflow run) succeeded, 1 it failed, 2
the command line, the input or the environment was wrong. With `--json`, exactly one JSON object is
printed on stdout for exit statuses 0 and 1; for 2 a single line on stderr
says what to fix.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from corral._exceptions import Aborted, ConfigError, InvalidInput, SandboxError
from corral.config import get_settings
from corral.sandbox import ExecutionResult, Limits, LogEntry, NodeSandbox, Usage
from corral.sandbox._sandbox import DEFAULT_TIMEOUT_MS


class UsageError(Exception):
    """The command line is wrong; the message says how (exit status 2)."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number, got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def _json_argument(option: str, text: str) -> Any:
    """A JSON value given inline or, as `@FILE`, in a file."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"{option}: cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `corral` command."""
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Run untrusted connector code in a sandbox with hard limits.",
        epilog="Limits default to the SANDBOX_* environment variables; see the README.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run one connector file in the sandbox",
        description="Run ENTRY(params, context) of FILE in the sandbox and print the result. "
        "Exit status: 0 ok, 1 the execution failed, 2 the command line was wrong.",
    )
    run.add_argument("file", metavar="FILE", help="the connector's Python source")
    run.add_argument("--entry", default="run", metavar="NAME", help="function to call (run)")
    run.add_argument("--params", default="{}", metavar="JSON", help="params as JSON or @FILE")
    run.add_argument("--context", default="{}", metavar="JSON", help="context as JSON or @FILE")
    run.add_argument(
        "--executor", choices=["process", "worker"], help="backend (default: from the env)"
    )
    run.add_argument(
        "--timeout-ms", type=_positive_int, default=DEFAULT_TIMEOUT_MS, metavar="N",
        help=f"wall-clock time-out (default {DEFAULT_TIMEOUT_MS})",
    )  # fmt: skip
    limits = run.add_argument_group("limits (override the SANDBOX_* env vars)")
    for flag, meaning in (
        ("--max-cpu-ms", "CPU time the execution may use; killed past it"),
        ("--cpu-quota-ms", "CPU ms per 100 ms period; throttles, never kills"),
        ("--max-memory-mb", "memory the execution may use; killed past it"),
        ("--heartbeat-interval-ms", "how often the sandbox proves it is alive (min 25)"),
        ("--heartbeat-timeout-ms", "silence after which it is declared hung"),
    ):
        limits.add_argument(flag, type=_positive_int, metavar="N", help=meaning)
    run.add_argument(
        "--secret", action="append", default=[], metavar="VALUE",
        help="a value to redact from logs, errors and output (repeatable)",
    )  # fmt: skip
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.set_defaults(handler=_run)

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

    selftest = commands.add_parser(
        "selftest",
        help="prove on this host that each limit is enforced",
        description="Run real executions that break each limit and check the error each "
        "one ends with. Exit status: 0 when no check failed, 1 otherwise.",
    )
    selftest.add_argument(
        "--executor", choices=["process", "worker"], help="backend (default: from the env)"
    )
    selftest.add_argument("--json", action="store_true", help="print one JSON object")
    selftest.set_defaults(handler=_selftest)
    return parser


def _limits(args: argparse.Namespace) -> Limits:
    given = {
        "max_cpu_ms": args.max_cpu_ms,
        "cpu_quota_ms": args.cpu_quota_ms,
        "max_memory_mb": args.max_memory_mb,
        "heartbeat_interval_ms": args.heartbeat_interval_ms,
        "heartbeat_timeout_ms": args.heartbeat_timeout_ms,
    }
    return Limits(**{name: value for name, value in given.items() if value is not None})


async def _execute_interruptibly(sandbox: NodeSandbox, code: str, **kwargs: Any) -> ExecutionResult:
    """Execute; SIGINT or SIGTERM kills the execution and reports `aborted`."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(sandbox.execute(code, **kwargs))
    received: list[str] = []

    def interrupt(signum: signal.Signals) -> None:
        received.append(signum.name)
        task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt, signum)
    try:
        return await task
    except asyncio.CancelledError:
        if not received:
            raise
        raise Aborted(f"interrupted by {received[0]}") from None
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _run(args: argparse.Namespace) -> int:
    try:
        code = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {args.file}: {reason}") from None
    params = _json_argument("--params", args.params)
    context = _json_argument("--context", args.context)
    get_settings()  # a bad env var stops here, before anything starts
    with NodeSandbox(executor=args.executor, limits=_limits(args)) as sandbox:
        try:
            result = asyncio.run(
                _execute_interruptibly(
                    sandbox, code, entry_point=args.entry, params=params, context=context,
                    timeout_ms=args.timeout_ms, secrets=args.secret,
                )
            )  # fmt: skip
        except SandboxError as error:
            _print_failure(error, sandbox.executor, args.json)
            return 1
    _print_success(result, args.json)
    return 0


def _run_workflow(args: argparse.Namespace) -> int:
    from corral.runtime import WorkflowRuntime

    workflow = _json_argument("FILE", f"@{args.file}")
    run_input = _json_argument("--input", args.input)
    connections = _json_argument("--connections", args.connections)

    async def run() -> Any:
        async with WorkflowRuntime(get_settings()) as runtime:
            return await runtime.run_workflow(
                workflow, input=run_input, connections=connections, run_id=args.run_id
            )

    try:
        outcome = asyncio.run(run())
    except InvalidInput as exc:
        raise UsageError(exc.message) from None
    if args.json:
        print(json.dumps(outcome.to_dict()))
    else:
        _print_run(outcome)
    return 0 if outcome.status == "succeeded" else 1


def _print_run(run: Any) -> None:
    """A table of the run's nodes, then each failed node's error."""
    print(f"run {_printable(run.id)} of {_printable(run.workflow_id)}: {run.status}")
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
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    for row in rows:
        cells = "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=False))
        print(f"  {cells}  {_printable(row[5])}".rstrip())
    for node in run.nodes.values():
        if node.error is not None:
            print(f"  {node.id}: {node.error['type']}: {_printable(str(node.error['message']))}")


def _selftest(args: argparse.Namespace) -> int:
    from corral.selftest import run_selftest

    settings = get_settings()

    def progress(index: int, total: int, name: str) -> None:
        if not args.json or sys.stderr.isatty():
            print(f"\rselftest: {index}/{total} {name:<20}", end="", file=sys.stderr, flush=True)

    with NodeSandbox(executor=args.executor) as sandbox:
        report = run_selftest(sandbox, settings, progress)
    print("\r" + " " * 40 + "\r", end="", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(report))
    else:
        rows = report["checks"]
        widths = [max(len(str(row[key])) for row in rows) for key in ("check", "proves", "status")]
        print(f"corral selftest: {report['executor']} backend, {report['isolation']}")
        for row in rows:
            cells = (row["check"], row["proves"] or "-", row["status"])
            print("  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths, strict=True)),
                  " ", row["detail"])  # fmt: skip
        print("ok" if report["ok"] else "FAILED: a limit does not hold on this host")
    return 0 if report["ok"] else 1


def _print_success(result: ExecutionResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(f"ok  {_summary(result.executor, result.usage)}")
    print(f"output: {_shown(result.output)}")
    _print_logs(result.logs)


def _print_failure(error: SandboxError, executor: str, as_json: bool) -> None:
    if as_json:
        usage = error.usage.to_dict() if error.usage is not None else None
        print(json.dumps({
            "ok": False, "output": None, "logs": [entry.to_dict() for entry in error.logs],
            "executor": error.executor or executor, "usage": usage, "error": error.to_dict(),
        }))  # fmt: skip
        return
    print(f"failed  {error.type}: {_printable(error.message)}")
    if error.usage is not None:
        print(f"        {_summary(error.executor or executor, error.usage)}")
    _print_logs(error.logs)


def _summary(executor: str, usage: Usage) -> str:
    peak = usage.peak_memory_bytes
    memory = f"{peak / (1 << 20):.1f} MiB peak" if peak is not None else "peak unknown"
    return f"{executor} · {usage.wall_ms:.1f} ms wall · {usage.cpu_ms:.1f} ms cpu · {memory}"


def _shown(value: Any) -> str:
    compact = json.dumps(value)
    return compact if len(compact) <= 80 else "\n" + json.dumps(value, indent=2)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _printable(text: str) -> str:
    """Connector text for a terminal: control characters escaped, so it cannot move the
    cursor, rewrite a line or set the window title."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def _print_logs(logs: list[LogEntry]) -> None:
    if logs:
        print("logs:")
        width = max(len(entry.level) for entry in logs)
        for entry in logs:
            print(f"  {_printable(entry.level):<{width}}  {_printable(entry.message)}")


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    print(f"corral: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `corral` command; returns the exit status."""
    warnings.showwarning = _show_warning
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"corral {args.command}: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        message = str(exc)
        print(message if message.startswith("corral") else f"corral: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
