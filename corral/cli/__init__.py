"""The `corral` command: one module per command group.

Exit status: 0 the execution (or the workflow run) succeeded, 1 it failed, 2
the command line, the input or the environment was wrong. With `--json`, exactly one JSON
object is printed on stdout whatever the exit status; for 2 it is `"ok": false` with an
`invalid_input` error, and a line on stderr says what to fix.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from importlib import metadata
from typing import Any, NoReturn

from corral._exceptions import ConfigError
from corral.cli import _catalog, _keys, _run, _selftest, _service, _workflow
from corral.cli._common import UsageError

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors reach `main`, which prints them (as JSON too)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self)


class _Version(argparse.Action):
    """`--version`: the installed distribution's version, looked up only when asked."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print corral's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_args: Any) -> None:
        try:
            version = metadata.version("corral")
        except metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
            version = "unknown (not installed)"
        print(f"corral {version}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `corral` command."""
    parser = _Parser(
        prog="corral",
        description="Run untrusted connector code in a sandbox with hard limits.",
        epilog="Limits default to the SANDBOX_* environment variables; see the README.",
    )
    parser.add_argument("--version", action=_Version)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (_run, _workflow, _catalog, _selftest, _service, _keys):
        group.add_commands(commands)
    return parser


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kw: Any) -> None:
    print(f"corral: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the `corral` command; returns the exit status."""
    warnings.showwarning = _show_warning
    argv = sys.argv[1:] if argv is None else argv
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        return int(args.handler(args))
    except UsageError as exc:
        parser = exc.args[1] if len(exc.args) > 1 else None
        if parser is not None:  # the parser's own complaint: its usage line first
            parser.print_usage(sys.stderr)
            message = f"{parser.prog}: error: {exc.args[0]}"
        else:
            message = f"corral {args.command if args else ''}: {exc.args[0]}"
        return _stop(message, str(exc.args[0]), args, argv)
    except ConfigError as exc:
        message = str(exc)
        line = message if message.startswith("corral") else f"corral: {message}"
        return _stop(line, message.removeprefix("corral: "), args, argv)
    except BrokenPipeError:  # `corral registry | head`: the reader left; so do we, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 1


def _stop(line: str, message: str, args: argparse.Namespace | None, argv: list[str]) -> int:
    """Exit status 2: one line on stderr and, under --json, one JSON object on stdout."""
    print(line, file=sys.stderr)
    if args.json if args is not None and hasattr(args, "json") else "--json" in argv:
        error = {"type": "invalid_input", "message": message}
        command = args.command if args is not None else next(iter(argv), None)
        print(
            json.dumps(
                _run.json_failure(error) if command == "run" else {"ok": False, "error": error}
            )
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())
