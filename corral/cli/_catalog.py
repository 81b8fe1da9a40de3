"""`corral registry` and `corral catalog ...`: the connector catalog and what can run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from corral.cli._common import UsageError, plural, printable, table
from corral.config import get_settings


def add_commands(commands: Any) -> None:
    """Add `registry` and `catalog ...` to the `corral` command."""
    registry = commands.add_parser(
        "registry",
        help="print which connector functions can run here, and how",
        description="Print the capabilities map: every function with a bespoke handler and, "
        "with GENERIC_EXECUTOR_ENABLED on, every action and trigger the generic HTTP path "
        "can run.",
    )
    registry.add_argument("--json", action="store_true", help="print one JSON object")
    registry.set_defaults(handler=_registry)

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
        "Check every connector.json against the schema (corral/connectors/schema.json) and every "
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
        description="Print the JSON Schema of a connector definition "
        "(corral/connectors/schema.json).",
    )  # fmt: skip
    schema.set_defaults(handler=_catalog_schema)


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
        for line in table(rows):
            print(f"  {line}")
    if generic == "off":
        print(
            "\nFunctions without a bespoke handler are left out: set "
            "GENERIC_EXECUTOR_ENABLED=true to run them through the generic HTTP path."
        )
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
            print(printable(str(problem)))
        where = ", ".join(map(str, folders))
        files = len({p.file.parent for p in found})
        print(f"{plural(count, 'app')} checked in {where}: " + (
            f"{plural(len(found), 'problem')} in {plural(files, 'app')}" if found else "all valid"
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
        for line in table(rows) if rows else []:
            print(line)
        files = len({a.file for a in additions})
        verb = "would add" if args.check else "added"
        print(f"{args.catalog_command}: {verb} defaults to "
              f"{plural(len(additions), additions[0].kind[:-1])} in {plural(files, 'file')}"
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
                print(f"  {label}: {printable(', '.join(names))}")
        for note in report.notes:
            print(f"  note: {printable(note)}")
    return 1 if report.changed and args.check else 0


def _catalog_schema(args: argparse.Namespace) -> int:
    from corral.executors import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0
