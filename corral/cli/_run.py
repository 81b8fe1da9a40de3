"""`corral run`: one connector file in the sandbox."""

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

from corral._exceptions import Aborted, ConfigError, SandboxError
from corral._warnings import claim
from corral.cli._common import UsageError, json_argument, positive_int, printable
from corral.config import get_settings
from corral.sandbox import ExecutionResult, Limits, LogEntry, NodeSandbox, Usage
from corral.sandbox._sandbox import DEFAULT_TIMEOUT_MS, NO_MEMORY_LIMIT, RAISE_LIMIT

#: The flag of each Limits field (and of `timeout_ms`), and the env var behind it.
FLAG_OF = {
    "max_cpu_ms": ("--max-cpu-ms", "SANDBOX_MAX_CPU_MS"),
    "cpu_quota_ms": ("--cpu-quota-ms", "SANDBOX_CPU_QUOTA_MS"),
    "max_memory_mb": ("--max-memory-mb", "SANDBOX_MAX_MEMORY_MB"),
    "heartbeat_interval_ms": ("--heartbeat-interval-ms", "SANDBOX_HEARTBEAT_INTERVAL_MS"),
    "heartbeat_timeout_ms": ("--heartbeat-timeout-ms", "SANDBOX_HEARTBEAT_TIMEOUT_MS"),
}
#: The flag that raises the limit behind each error type.
RAISED_BY = {
    "cpu_limit": "--max-cpu-ms",
    "memory_limit": "--max-memory-mb",
    "timeout": "--timeout-ms",
}
LOG_LINES_SHOWN = 10  # at each end of a long log, without --json


def add_commands(commands: Any) -> None:
    """Add `run` to the `corral` command."""
    run = commands.add_parser(
        "run",
        help="run one connector file in the sandbox",
        description="Run ENTRY(params, context) of FILE in the sandbox and print the result. "
        "Exit status: 0 ok, 1 the execution failed, 2 the command line was wrong.",
    )
    run.add_argument("file", metavar="FILE", help="the connector's Python source; - for stdin")
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
    """The flags' limits over the environment's; a bad combination is a usage error that names
    the flags (and the env vars, where the other value came from there)."""
    settings = get_settings()  # a bad env var is its own one-line error
    given = {name: getattr(args, name) for name in FLAG_OF}
    try:
        flags = Limits(**{name: value for name, value in given.items() if value is not None})
        return Limits.from_settings(settings).merged(flags)
    except ConfigError as exc:
        message = str(exc)
        for name, (flag, variable) in FLAG_OF.items():
            message = message.replace(f"Limits.{name}=", f"{flag} ")
            message = re.sub(
                rf"\b{name}\b(?: \((\w+)\))?",
                lambda found, flag=flag, variable=variable: (
                    f"{flag} (" + (f"{found[1]}; " if found[1] else "") + f"also {variable})"
                ),
                message,
            )
        raise UsageError(message) from None


async def _execute_interruptibly(sandbox: NodeSandbox, code: str, **kwargs: Any) -> ExecutionResult:
    """Execute; SIGINT or SIGTERM kills the execution and reports `aborted` with the logs and
    usage it had."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(sandbox.execute(code, **kwargs))
    received: list[str] = []

    def interrupt(signum: signal.Signals) -> None:
        received.append(signum.name)
        if not sandbox.abort(f"interrupted by {signum.name}"):
            task.cancel()  # not started yet: nothing ran, so nothing is lost

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


def _source(file: str) -> str:
    """The connector's source from FILE, or from stdin for `-`."""
    try:
        if file == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise UsageError(f"cannot read {'stdin' if file == '-' else file}: {reason}") from None


def _run(args: argparse.Namespace) -> int:
    code = _source(args.file)
    params = json_argument("--params", args.params)
    context = json_argument("--context", args.context)
    if not isinstance(params, dict):
        raise UsageError(f"--params must be a JSON object, got {json.dumps(params)[:40]}")
    limits = _limits(args)  # a bad env var or flag stops here, before anything starts
    advise = limits.max_memory_mb is None and claim(NO_MEMORY_LIMIT)
    with NodeSandbox(executor=args.executor, limits=limits) as sandbox:
        if advise:  # in the command's words, once the settings proved valid
            warnings.warn(
                "executions have no memory limit; pass --max-memory-mb N "
                "or set SANDBOX_MAX_MEMORY_MB",
                RuntimeWarning,
                stacklevel=1,
            )
        try:
            result = asyncio.run(
                _execute_interruptibly(
                    sandbox, code, entry_point=args.entry, params=params, context=context,
                    timeout_ms=args.timeout_ms, secrets=args.secret,
                )
            )  # fmt: skip
        except SandboxError as error:
            _print_failure(_in_flags(error), sandbox, args.json)
            return 1
    _print_success(result, args.json)
    return 0


def _in_flags(error: SandboxError) -> SandboxError:
    """A limit error's advice in the command's words: the flag instead of the Python API."""
    flag, advice = RAISED_BY.get(error.type), RAISE_LIMIT.get(error.type)
    if flag is not None and advice is not None:
        error.message = error.message.replace(advice[0], flag)
        error.args = (error.message,)
    return error


def _print_success(result: ExecutionResult, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(f"ok  {_summary(result.executor, result.usage, result.isolation)}")
    print(f"output: {_shown(result.output)}")
    _print_logs(result.logs)


def _print_failure(error: SandboxError, sandbox: NodeSandbox, as_json: bool) -> None:
    executor = error.executor or sandbox.executor
    if as_json:
        usage = error.usage.to_dict() if error.usage is not None else None
        print(json.dumps({
            "ok": False, "output": None, "logs": [entry.to_dict() for entry in error.logs],
            "executor": executor, "usage": usage, "error": error.to_dict(),
            "isolation": sandbox.isolation,
        }))  # fmt: skip
        return
    print(f"failed  {error.type}: {printable(error.message)}")
    if error.usage is not None:
        print(f"        {_summary(executor, error.usage, sandbox.isolation)}")
    _print_logs(error.logs)


def json_failure(error: dict[str, Any]) -> dict[str, Any]:
    """The `corral run --json` object of a command that stopped before anything ran."""
    return {"ok": False, "output": None, "logs": [], "executor": None, "usage": None,
            "error": error, "isolation": None}  # fmt: skip


def _summary(executor: str, usage: Usage, isolation: str) -> str:
    peak = usage.peak_memory_bytes
    memory = f"{peak / (1 << 20):.1f} MiB peak" if peak is not None else "peak unknown"
    return (
        f"{executor} · {usage.wall_ms:.1f} ms wall · {usage.cpu_ms:.1f} ms cpu · {memory}"
        f" · {printable(isolation)}"
    )


def _shown(value: Any) -> str:
    compact = json.dumps(value)
    return compact if len(compact) <= 80 else "\n" + json.dumps(value, indent=2)


def _print_logs(logs: list[LogEntry]) -> None:
    """The log lines; of a long log, the first and last LOG_LINES_SHOWN and a count between."""
    if not logs:
        return
    print("logs:")
    width = max(len(entry.level) for entry in logs)
    hidden = len(logs) - 2 * LOG_LINES_SHOWN
    shown = logs if hidden <= 0 else [*logs[:LOG_LINES_SHOWN], None, *logs[-LOG_LINES_SHOWN:]]
    for entry in shown:
        if entry is None:
            print(f"  ... {hidden} more lines ({len(logs)} in all; --json prints every one)")
        else:
            print(f"  {printable(entry.level):<{width}}  {printable(entry.message)}")
