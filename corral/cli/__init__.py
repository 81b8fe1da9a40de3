"""The `corral` command: one module per command group.

Exit status: 0 the execution (or the workflow run) succeeded, 1 it failed, 2
the command line, the input or the environment was wrong. With `--json`, exactly one JSON object is
printed on stdout for exit statuses 0 and 1; for 2 a single line on stderr
says what to fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

from corral._exceptions import ConfigError
from corral.cli import _catalog, _keys, _run, _selftest, _service, _workflow
from corral.cli._common import UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `corral` command."""
    parser = argparse.ArgumentParser(
        prog="corral",
        description="Run untrusted connector code in a sandbox with hard limits.",
        epilog="Limits default to the SANDBOX_* environment variables; see the README.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in (_run, _workflow, _catalog, _selftest, _service, _keys):
        group.add_commands(commands)
    return parser


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
