"""What every command shares: argument types, the usage error, and terminal-safe output."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any


class UsageError(Exception):
    """The command line is wrong; the message says how (exit status 2)."""


def port_number(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive whole number, got {text!r}"
        ) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {value}")
    return value


def json_argument(option: str, text: str) -> Any:
    """A JSON value given inline or, as `@FILE`, in a file."""
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text(encoding="utf-8")
        except OSError as exc:
            where = "" if option == text[1:] else f"{option}: "
            raise UsageError(f"{where}cannot read {text[1:]}: {exc.strerror}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{option} is not valid JSON: {exc}") from None


def plural(number: int, noun: str) -> str:
    """`1 app`, `2 apps`."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """Connector text for a terminal: control characters escaped, so it cannot move the
    cursor, rewrite a line or set the window title."""
    return _CONTROL.sub(lambda match: repr(match.group())[1:-1], text)


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """`rows` as aligned columns, two spaces apart, each cell made printable."""
    shown = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in shown) for column in range(len(shown[0]))]
    return [
        "  ".join(f"{cell:<{width}}" for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in shown
    ]
