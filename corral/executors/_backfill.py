"""Catalog backfills: add default keys where a definition's actions or triggers lack them.

Host side (`corral catalog backfill-actions`, `corral catalog seed-trigger-fallbacks`).
A definition is edited as text, not re-serialised: each missing key is
inserted just before its object's closing brace, in that object's own style
(one member a line at its indentation, or inline after a comma), so the
diff shows only what was added and a key the author set is never touched.
A second run finds nothing missing and changes nothing.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import json_source_map

from corral.executors._catalog import CatalogError, app_folders

#: What an action lacking them gets: it runs in Python, and it declares no fallback of its
#: own (the deployment's GENERIC_EXECUTOR_ENABLED decides, DESIGN §7 and §9).
ACTION_DEFAULTS: dict[str, Any] = {"runtimes": ["python"], "fallback": None}
#: What a trigger lacking them gets. Conservative: no fallback declared, and dedupe by id
#: with the item's update time as the cursor, so nothing older than what was seen is new.
TRIGGER_DEFAULTS: dict[str, Any] = {
    "runtimes": ["python"],
    "fallback": None,
    "dedupe": {"strategy": "cursor", "cursor": "$.updated_at", "key": "$.id"},
}
BACKFILLS: dict[str, tuple[Literal["actions", "triggers"], dict[str, Any]]] = {
    "backfill-actions": ("actions", ACTION_DEFAULTS),
    "seed-trigger-fallbacks": ("triggers", TRIGGER_DEFAULTS),
}


@dataclass(frozen=True)
class Addition:
    """Keys added to one action or trigger of one definition file."""

    file: Path
    kind: Literal["actions", "triggers"]
    operation: str
    added: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """`{"file", "kind", "operation", "added"}` for `--json`."""
        return {
            "file": str(self.file), "kind": self.kind, "operation": self.operation,
            "added": self.added,
        }  # fmt: skip


def backfill(folders: Iterable[Path], name: str, *, write: bool = True) -> list[Addition]:
    """Run backfill `name` (a key of BACKFILLS) over every definition in the catalog
    `folders`; the additions made (with `write=False`, those a run would make)."""
    kind, defaults = BACKFILLS[name]
    found: list[Addition] = []
    for folder in folders:
        for app in app_folders(Path(folder)):
            file = app / "connector.json"
            try:
                with open(file, encoding="utf-8", newline="") as stream:  # CRLF stays CRLF
                    text = stream.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise CatalogError(f"corral: {file}: cannot be read: {exc}") from None
            updated, additions = fill_missing(text, kind, defaults, file=file)
            if additions and write:
                _replace(file, updated)
            found += additions
    return found


def fill_missing(
    text: str, kind: Literal["actions", "triggers"], defaults: dict[str, Any], *, file: Path
) -> tuple[str, list[Addition]]:
    """`text` (a definition) with `defaults` added to each item of `kind` lacking them."""
    try:
        definition = json.loads(text)
        spans = json_source_map.calculate(text)
    except ValueError as exc:
        raise CatalogError(f"corral: {file}: cannot be read as JSON: {exc}") from None
    items = definition.get(kind) if isinstance(definition, dict) else None
    if not isinstance(items, list):
        return text, []
    edits: list[tuple[int, str]] = []
    additions: list[Addition] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue  # `corral catalog validate` reports it; nothing to fill
        missing = {key: value for key, value in defaults.items() if key not in item}
        if not missing:
            continue
        pointer = f"/{kind}/{index}"
        if pointer not in spans:  # the source map names members by their raw text
            raise CatalogError(
                f"corral: {file}: cannot be edited as text: write the key {kind!r} without "
                "escape sequences"
            )
        edits.append(_insertion(text, spans, pointer, missing))
        additions.append(Addition(file, kind, str(item.get("id", f"#{index}")), missing))
    for position, insert in sorted(edits, reverse=True):
        text = text[:position] + insert + text[position:]
    if edits:  # the text must mean exactly the defaults added: a slip here never corrupts
        definition[kind] = [
            {**item, **{k: v for k, v in defaults.items() if k not in item}}
            if isinstance(item, dict) else item
            for item in items
        ]  # fmt: skip
        if json.loads(text) != definition:
            raise CatalogError(f"corral: {file}: the backfill could not be applied as text")
    return text, additions


def _insertion(
    text: str, spans: dict[str, Any], pointer: str, missing: dict[str, Any]
) -> tuple[int, str]:
    """Where and what to insert so that `missing` ends the object at `pointer`.

    The object's own text says its style: members one a line when a line break
    comes before the first, at that member's indentation; inline otherwise. (Its
    members are not looked up by key: the source map names them by their raw text.)
    """
    start = spans[pointer].value_start.position  # the object's opening brace
    close = spans[pointer].value_end.position - 1  # and its closing one
    inside = text[start + 1 : close]
    rendered = [f"{json.dumps(key)}: {_inline(value)}" for key, value in missing.items()]
    if not inside.strip():
        return close, ", ".join(rendered)
    after_last = start + 1 + len(inside.rstrip())
    lead = inside[: len(inside) - len(inside.lstrip())]
    if "\n" in lead:  # one member a line: the new ones too, at the same indentation
        newline = "\r\n" if "\r\n" in lead else "\n"
        indent = lead.rsplit("\n", 1)[1]
        return after_last, "".join(f",{newline}{indent}{member}" for member in rendered)
    return after_last, "".join(f", {member}" for member in rendered)


def _inline(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _replace(file: Path, text: str) -> None:
    """Write `text` to `file` through a temporary file and a rename: never half-written.
    A symlink's target is what changes, and the file keeps its permissions."""
    file = file.resolve()
    temporary = file.with_name(f".{file.name}.corral-tmp")
    try:
        temporary.write_text(text, encoding="utf-8", newline="")
        if file.exists():
            shutil.copymode(file, temporary)
        temporary.replace(file)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise CatalogError(f"corral: {file}: cannot be written: {exc.strerror}") from None
