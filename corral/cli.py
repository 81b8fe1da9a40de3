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
import os
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

    registry = commands.add_parser(
        "registry",
        help="print which connector functions can run here, and how",
        description="Print the capabilities map: every function with a bespoke handler and, "
        "with GENERIC_EXECUTOR_ENABLED on, every action and trigger the generic HTTP path "
        "can run.",
    )
    registry.add_argument("--json", action="store_true", help="print one JSON object")
    registry.set_defaults(handler=_registry)

    _add_catalog_commands(commands)

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


def _add_catalog_commands(commands: Any) -> None:
    catalog = commands.add_parser(
        "catalog",
        help="check and maintain connector definitions",
        description="Check and maintain the connector catalog. Without --dir, the catalog "
        "in use: the CORRAL_CONNECTORS_DIR folders, then the shipped one.",
    ).add_subparsers(dest="catalog_command", metavar="COMMAND", required=True)

    def command(
        name: str, summary: str, description: str,
        dir_help: str = "a catalog folder (one folder per app); repeatable",
    ) -> argparse.ArgumentParser:  # fmt: skip
        parser = catalog.add_parser(name, help=summary, description=description)
        parser.add_argument("--dir", action="append", type=Path, metavar="D", help=dir_help)
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        return parser

    validate = command(
        "validate", "check every definition against the schema",
        "Check every connector.json against the schema (connectors/schema.json) and every "
        "handlers.py against the sandbox's policy. Exit status: 0 all valid, 1 a problem found.",
    )  # fmt: skip
    validate.set_defaults(handler=_catalog_validate)
    for name, summary in (
        ("backfill-actions", 'add runtimes: ["python"] and fallback: null where an action '
         "lacks them"),
        ("seed-trigger-fallbacks", "add cursor-based runtimes, fallback and dedupe where a "
         "trigger lacks them"),
    ):  # fmt: skip
        backfill = command(
            name, summary,
            f"{summary[0].upper()}{summary[1:]}. Set values are left alone, and each file "
            "keeps its key order and layout: the diff shows only what was added. A second "
            "run changes nothing. Exit status: 0, or with --check 1 when a run would change "
            "something.",
        )  # fmt: skip
        backfill.add_argument(
            "--check", action="store_true", help="change nothing; exit 1 if a run would"
        )
        backfill.set_defaults(handler=_catalog_backfill)
    openapi = command(
        "import-openapi", "make or refresh a connector from an OpenAPI 3 document",
        "Turn an OpenAPI 3 document (JSON or YAML) into D/APP/connector.json: an action per "
        "operation. Re-importing keeps what a person set (runtimes, fallback, names, "
        "triggers). Without --dir, the first CORRAL_CONNECTORS_DIR folder, else the shipped "
        "catalog. Exit status: 0, or with --check 1 when the import would change the file.",
        "the catalog folder to write the app into",
    )  # fmt: skip
    openapi.add_argument("spec", metavar="SPEC", type=Path, help="the OpenAPI document")
    openapi.add_argument("--app", required=True, metavar="ID", help="the app's id (lower case)")
    openapi.add_argument("--check", action="store_true", help="change nothing; exit 1 if it would")
    openapi.set_defaults(handler=_catalog_import_openapi)
    schema = catalog.add_parser(
        "schema", help="print the definition schema (JSON Schema)",
        description="Print the JSON Schema of a connector definition (connectors/schema.json).",
    )  # fmt: skip
    schema.set_defaults(handler=_catalog_schema)


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
    for line in _table(rows):
        print(f"  {line}")
    for node in run.nodes.values():
        if node.error is not None:
            print(f"  {node.id}: {node.error['type']}: {_printable(str(node.error['message']))}")


def _catalog_folders(args: argparse.Namespace, *, with_apps: bool = True) -> list[Path]:
    """The --dir folders, else the catalog in use; each --dir must hold an app (a typo'd
    folder would pass every check) unless `with_apps` is off."""
    from corral.executors import SHIPPED_CATALOG, app_folders

    folders = args.dir or [*map(Path, get_settings().connectors_dir), SHIPPED_CATALOG]
    for folder in folders:
        if not folder.is_dir():
            raise UsageError(f"{folder} is not a folder")
        if with_apps and args.dir and next(app_folders(folder), None) is None:
            hint = (f": it is an app's folder; pass the catalog, {folder.resolve().parent}"
                    if (folder / "connector.json").is_file() else "")  # fmt: skip
            raise UsageError(f"{folder} holds no app (no */connector.json){hint}")
    return folders


def _registry(args: argparse.Namespace) -> int:
    from corral.config import FLAGS
    from corral.executors import ConnectorFramework
    from corral.runtime import capabilities

    framework = ConnectorFramework.from_settings(get_settings())
    registry = capabilities(framework)
    if args.json:
        print(json.dumps(registry))
        return 0
    count = sum(len(kinds[kind]) for kinds in registry.values() for kind in kinds)
    generic = "on" if FLAGS.GENERIC_EXECUTOR_ENABLED else "off"
    print(f"{count} functions in {len(registry)} apps can run (generic HTTP path {generic})")
    for app, kinds in registry.items():
        rows = [("kind", "function", "executor", "fallback", "runtimes")]
        for kind, functions in kinds.items():
            for function, entry in functions.items():
                rows.append((kind[:-1], function, entry["executor"], entry["fallback"] or "-",
                             ",".join(entry["runtimes"])))  # fmt: skip
        print(f"\n{app} ({framework.connector(app).name})")
        for line in _table(rows):
            print(f"  {line}")
    if generic == "off":
        print("\nFunctions without a bespoke handler are left out: set "
              "GENERIC_EXECUTOR_ENABLED=true to run them through the generic HTTP path.")
    return 0


def _catalog_validate(args: argparse.Namespace) -> int:
    from corral.executors import check_catalog

    folders = _catalog_folders(args)
    count, found = check_catalog(folders, get_settings().allowed_imports)
    if args.json:
        print(json.dumps({"ok": not found, "apps": count,
                          "problems": [p.to_dict() for p in found]}))  # fmt: skip
    else:
        for problem in found:
            print(_printable(str(problem)))
        where = ", ".join(map(str, folders))
        files = len({p.file.parent for p in found})
        print(f"{_count(count, 'app')} checked in {where}: " + (
            f"{_count(len(found), 'problem')} in {_count(files, 'app')}" if found else "all valid"
        ))  # fmt: skip
    return 1 if found else 0


def _catalog_backfill(args: argparse.Namespace) -> int:
    from corral.executors import backfill

    additions = backfill(_catalog_folders(args), args.catalog_command, write=not args.check)
    if args.json:
        print(json.dumps({"changed": bool(additions), "written": bool(additions) and not args.check,
                          "additions": [a.to_dict() for a in additions]}))  # fmt: skip
    else:
        rows = [(str(a.file), f"{a.kind}.{a.operation}", "+ " + ", ".join(a.added))
                for a in additions]  # fmt: skip
        for line in _table(rows) if rows else []:
            print(line)
        files = len({a.file for a in additions})
        verb = "would add" if args.check else "added"
        print(f"{args.catalog_command}: {verb} defaults to "
              f"{_count(len(additions), additions[0].kind[:-1])} in {_count(files, 'file')}"
              if additions else f"{args.catalog_command}: nothing to add")  # fmt: skip
    return 1 if additions and args.check else 0


def _catalog_import_openapi(args: argparse.Namespace) -> int:
    from corral.executors import import_openapi

    folder = _catalog_folders(args, with_apps=False)[0]
    report = import_openapi(args.spec, args.app, folder, check=args.check)
    if args.json:
        print(json.dumps({
            "file": str(report.path), "created": report.created, "changed": report.changed,
            "written": report.changed and not args.check, "added": report.added,
            "updated": report.updated, "removed": report.removed, "kept": report.kept,
            "notes": report.notes,
        }))  # fmt: skip
    else:
        verb = "would write" if args.check else "wrote"
        if not report.changed:
            print(f"{report.path}: up to date with {args.spec}")
        else:
            print(f"{verb} {report.path}" + (" (new)" if report.created else ""))
        for label, names in (("added", report.added), ("updated", report.updated),
                             ("removed", report.removed), ("kept", report.kept)):  # fmt: skip
            if names:
                print(f"  {label}: {_printable(', '.join(names))}")
        for note in report.notes:
            print(f"  note: {_printable(note)}")
    return 1 if report.changed and args.check else 0


def _catalog_schema(args: argparse.Namespace) -> int:
    from corral.executors import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


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
        print(f"corral selftest: {report['executor']} backend, {report['isolation']}")
        rows = [
            (row["check"], row["proves"] or "-", row["status"], row["detail"])
            for row in report["checks"]
        ]
        for line in _table(rows):
            print(line)
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


def _count(number: int, noun: str) -> str:
    """`1 app`, `2 apps`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _summary(executor: str, usage: Usage) -> str:
    peak = usage.peak_memory_bytes
    memory = f"{peak / (1 << 20):.1f} MiB peak" if peak is not None else "peak unknown"
    return f"{executor} · {usage.wall_ms:.1f} ms wall · {usage.cpu_ms:.1f} ms cpu · {memory}"


def _shown(value: Any) -> str:
    compact = json.dumps(value)
    return compact if len(compact) <= 80 else "\n" + json.dumps(value, indent=2)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """`rows` as aligned columns, two spaces apart, each cell made printable."""
    shown = [[_printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in shown) for column in range(len(shown[0]))]
    return [
        "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in shown
    ]


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
    except BrokenPipeError:  # `corral registry | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
