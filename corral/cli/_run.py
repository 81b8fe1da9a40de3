"""`corral run`: one connector file in the sandbox."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path
from typing import Any

from corral._exceptions import Aborted, SandboxError
from corral.cli._common import UsageError, json_argument, positive_int, printable
from corral.config import get_settings
from corral.sandbox import ExecutionResult, Limits, LogEntry, NodeSandbox, Usage
from corral.sandbox._sandbox import DEFAULT_TIMEOUT_MS


def add_commands(commands: Any) -> None:
    """Add `run` to the `corral` command."""
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
        "--timeout-ms", type=positive_int, default=DEFAULT_TIMEOUT_MS, metavar="N",
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
        limits.add_argument(flag, type=positive_int, metavar="N", help=meaning)
    run.add_argument(
        "--secret", action="append", default=[], metavar="VALUE",
        help="a value to redact from logs, errors and output (repeatable)",
    )  # fmt: skip
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.set_defaults(handler=_run)


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
    params = json_argument("--params", args.params)
    context = json_argument("--context", args.context)
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
    print(f"failed  {error.type}: {printable(error.message)}")
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


def _print_logs(logs: list[LogEntry]) -> None:
    if logs:
        print("logs:")
        width = max(len(entry.level) for entry in logs)
        for entry in logs:
            print(f"  {printable(entry.level):<{width}}  {printable(entry.message)}")
