"""`corral selftest`: prove on this host, with real executions, that each limit holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from corral._warnings import claim
from corral.cli._common import table
from corral.config import get_settings
from corral.sandbox import NodeSandbox
from corral.sandbox._sandbox import NO_MEMORY_LIMIT


def add_commands(commands: Any) -> None:
    """Add `selftest` to the `corral` command."""
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


def _selftest(args: argparse.Namespace) -> int:
    from corral.selftest import run_selftest

    settings = get_settings()

    def progress(index: int, total: int, name: str) -> None:
        if not args.json or sys.stderr.isatty():
            print(f"\rselftest: {index}/{total} {name:<20}", end="", file=sys.stderr, flush=True)

    # The memory checks set their own limit: a warning about executions without one is
    # not this command's to give.
    claim(NO_MEMORY_LIMIT)
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
        for line in table(rows):
            print(line)
        print("ok" if report["ok"] else "FAILED: a limit does not hold on this host")
    return 0 if report["ok"] else 1
