"""The connector catalog: definitions (`connector.json`) and bespoke handlers (`handlers.py`).

Host side. A catalog folder holds one folder per app (DESIGN §8). Folders
from CORRAL_CONNECTORS_DIR are searched before the shipped `corral/connectors/`;
the first folder that defines an app wins. Handlers are connector code: the
host never imports them, it only reads their source and (with `ast`) the
names of their top-level functions; they run in the sandbox.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema
import referencing

from corral._exceptions import ConfigError, InvalidInput
from corral.config import DEFAULT_ALLOWED_IMPORTS, Settings
from corral.config._imports import view_attributes
from corral.executors._schema import problems

#: The catalog shipped with corral: package data, in the source tree and in a wheel alike.
SHIPPED_CATALOG = Path(__file__).resolve().parents[1] / "connectors"


class CatalogError(ConfigError):
    """A connector definition is invalid; the message names the file and the problem."""


def normalise_app_id(app: str) -> str:
    """`GitHub`, ` github `, `git_hub`... as the catalog spells ids: lower case, `-` for `_`
    and spaces."""
    return re.sub(r"[\s_]+", "-", str(app).strip().lower())


@dataclass(frozen=True)
class Operation:
    """An action or a trigger of an app, as its definition states it."""

    app: str
    id: str
    kind: Literal["action", "trigger"]
    name: str
    method: str | None
    endpoint: str | None
    params_schema: dict[str, Any]
    runtimes: tuple[str, ...]
    fallback: str | None
    dedupe: dict[str, Any] | None
    items: str | None  # triggers: JSONPath to the list of items in what they return
    definition: dict[str, Any] = field(repr=False, compare=False)

    @property
    def has_http_metadata(self) -> bool:
        """Whether the generic path can run it (`method` and `endpoint` given)."""
        return bool(self.method and self.endpoint)

    @functools.cached_property
    def _validator(self) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator(
            self.params_schema,
            format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            registry=referencing.Registry(),  # nothing is ever fetched to resolve a $ref
        )

    def validate(self, params: Any) -> None:
        """Raise InvalidInput naming the first problem when `params` breaks the contract."""
        try:
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(params))
        except Exception as exc:  # a contract that cannot be applied (a $ref loop, ...)
            raise InvalidInput(
                f"{self.app}.{self.id}: its params contract could not be applied "
                f"({type(exc).__name__}); fix the definition"
            ) from None
        if error is not None:
            where = "params" + "".join(f"[{part!r}]" for part in error.absolute_path)
            raise InvalidInput(f"{self.app}.{self.id}: {where}: {error.message}")


@dataclass(frozen=True)
class Connector:
    """One app: its definition, its operations and its bespoke handlers' source."""

    id: str
    name: str
    base_url: str | None
    auth: dict[str, Any] | None
    headers: dict[str, str]
    actions: dict[str, Operation]
    triggers: dict[str, Operation]
    handlers_source: str | None
    handler_names: frozenset[str]
    path: Path

    def operation(self, function: str) -> Operation:
        """The action (or trigger) named `function`; InvalidInput naming what exists."""
        found = self.actions.get(function) or self.triggers.get(function)
        if found is None:
            known = ", ".join(sorted({*self.actions, *self.triggers})) or "none"
            raise InvalidInput(f"{self.id} has no action or trigger {function!r}; it has: {known}")
        return found

    def handler(self, function: str) -> str | None:
        """The bespoke handler's source (the whole handlers.py), or None when it has none."""
        return self.handlers_source if function in self.handler_names else None


class ConnectorFramework:
    """Loads the catalog and resolves an app and a function to what runs them."""

    def __init__(self, folders: Iterable[Path]) -> None:
        self.folders = [Path(folder) for folder in folders]
        self._connectors: dict[str, Connector] = {}
        for folder in reversed(self.folders):  # earlier folders win
            for path in app_folders(folder):
                connector = load_connector(path)
                self._connectors[connector.id] = connector

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectorFramework:
        """CORRAL_CONNECTORS_DIR's folders, then the shipped catalog."""
        folders = [Path(folder) for folder in settings.connectors_dir]
        for folder in folders:
            if not folder.is_dir():
                raise ConfigError(
                    f"corral: CORRAL_CONNECTORS_DIR names {str(folder)!r}, which is not a folder"
                )
        return cls([*folders, SHIPPED_CATALOG])

    def apps(self) -> list[str]:
        """The ids of every app in the catalog, sorted."""
        return sorted(self._connectors)

    def connector(self, app: str) -> Connector:
        """The app `app` (id normalised); InvalidInput naming the apps there are."""
        found = self._connectors.get(normalise_app_id(app))
        if found is None:
            raise InvalidInput(
                f"unknown app {app!r}; the catalog has: {', '.join(self.apps()) or 'nothing'}"
            )
        return found


def app_folders(folder: Path) -> Iterator[Path]:
    """The app folders (those with a connector.json) of catalog folder `folder`, sorted."""
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if (path / "connector.json").is_file():
            yield path


@dataclass(frozen=True)
class CatalogProblem:
    """One thing wrong in a catalog: the file, where in it (a JSONPath, or a line), and what."""

    file: Path
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}"

    def to_dict(self) -> dict[str, str]:
        """`{"file", "path", "message"}` for `--json`."""
        return {"file": str(self.file), "path": self.path, "message": self.message}


def check_catalog(
    folders: Iterable[Path], allowed_imports: Iterable[str] = DEFAULT_ALLOWED_IMPORTS
) -> tuple[int, list[CatalogProblem]]:
    """How many apps the catalog `folders` define, and every problem in them: the schema,
    the folder name, handlers that do not compile under the sandbox's policy or import a
    module outside `allowed_imports`, functions nothing can run."""
    count, found = 0, []
    allowed = frozenset(allowed_imports)
    for folder in folders:
        for path in app_folders(Path(folder)):
            count += 1
            found += _app_problems(path, allowed)
    return count, found


def _refused_imports(source: str, allowed: frozenset[str]) -> Iterator[tuple[int, str]]:
    """(line, name) of each import in `source` the sandbox would refuse: a module outside
    `allowed`, or a name its view does not show (`from functools import update_wrapper`). A package
    that only holds allowed modules (`urllib` of `urllib.parse`) may be named on the way."""

    def importable(name: str) -> bool:
        return name in allowed or any(module.startswith(f"{name}.") for module in allowed)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            names = ["." * node.level + (node.module or "")]
        elif isinstance(node, ast.ImportFrom) and node.module in allowed:
            shown = set(view_attributes(node.module))
            names = [f"{node.module}.{alias.name}" for alias in node.names
                     if alias.name != "*" and alias.name not in shown
                     and f"{node.module}.{alias.name}" not in allowed]  # fmt: skip
            yield from ((node.lineno, name) for name in names)
            continue
        elif isinstance(node, ast.ImportFrom):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        yield from ((node.lineno, name) for name in names if not importable(name))


def _app_problems(path: Path, allowed_imports: frozenset[str]) -> list[CatalogProblem]:
    from corral.sandbox._policy import compile_connector  # the child's compiler, host side

    file = path / "connector.json"
    try:
        definition = _read_definition(file)
    except CatalogError as exc:
        return [CatalogProblem(file, "$", str(exc))]
    found = [CatalogProblem(file, p.path, p.message) for p in problems(definition)]
    if found:
        return found
    if definition["id"] != path.name:
        found.append(CatalogProblem(
            file, "$.id", f"{definition['id']!r} differs from its folder's name {path.name!r}"
        ))  # fmt: skip
    handlers_file = path / "handlers.py"
    try:
        source, names = _read_handlers(handlers_file)
    except CatalogError as exc:
        return [*found, CatalogProblem(handlers_file, "$", str(exc))]
    if source is not None:
        _, error_type, message = compile_connector(source, str(handlers_file))
        if error_type is not None:
            found.append(CatalogProblem(handlers_file, "$", f"{error_type}: {message}"))
        for line, module in _refused_imports(source, allowed_imports):
            found.append(CatalogProblem(
                handlers_file, f"line {line}",
                f"imports {module!r}, which connector code may not import (allowed: "
                f"{', '.join(sorted(allowed_imports))}; CORRAL_ALLOWED_IMPORTS chooses more)",
            ))  # fmt: skip
    for kind in ("actions", "triggers"):
        for index, item in enumerate(definition.get(kind, [])):
            if item["id"] not in names and not (item.get("method") and item.get("endpoint")):
                found.append(CatalogProblem(
                    file, f"$.{kind}[{index}]",
                    f"nothing can run {item['id']!r}: handlers.py has no function of that name "
                    "and it has no method and endpoint for the generic path",
                ))  # fmt: skip
    return found


def _read_definition(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise CatalogError(f"cannot be read as JSON: {exc}") from None


def _read_handlers(file: Path) -> tuple[str | None, frozenset[str]]:
    """handlers.py's source and the names of its top-level functions; (None, ∅) without."""
    if not file.is_file():
        return None, frozenset()
    try:
        source = file.read_text(encoding="utf-8")
        tree = ast.parse(source, str(file))
    except SyntaxError as exc:
        raise CatalogError(f"line {exc.lineno}: {exc.msg}") from None
    except (OSError, ValueError, MemoryError, RecursionError) as exc:  # not UTF-8, too deep
        raise CatalogError(f"cannot be read as Python ({type(exc).__name__})") from None
    return source, frozenset(node.name for node in tree.body if isinstance(node, ast.FunctionDef))


def load_connector(path: Path) -> Connector:
    """The app defined in folder `path`; CatalogError naming the file and what is wrong."""
    definition_file, handlers_file = path / "connector.json", path / "handlers.py"
    try:
        definition = _read_definition(definition_file)
    except CatalogError as exc:
        raise CatalogError(f"corral: {definition_file}: {exc}") from None
    found = problems(definition)
    if found:
        more = f" (and {len(found) - 1} more: run `corral catalog validate`)" if found[1:] else ""
        raise CatalogError(f"corral: {definition_file}: {found[0]}{more}")
    try:
        source, names = _read_handlers(handlers_file)
    except CatalogError as exc:
        raise CatalogError(f"corral: {handlers_file}: {exc}") from None
    app = definition["id"]
    if app != path.name:  # two folders could otherwise define one app, the later winning
        raise CatalogError(
            f"corral: {definition_file}: $.id: {app!r} differs from its folder's name {path.name!r}"
        )
    operations = {
        kind: {item["id"]: _operation(app, kind, item) for item in definition.get(f"{kind}s", [])}
        for kind in ("action", "trigger")
    }
    return Connector(
        id=app,
        name=definition.get("name", app),
        base_url=definition.get("baseUrl"),
        auth=definition.get("auth"),
        headers=dict(definition.get("headers") or {}),
        actions=operations["action"],
        triggers=operations["trigger"],
        handlers_source=source,
        handler_names=names,
        path=path,
    )


def _operation(app: str, kind: Literal["action", "trigger"], item: dict[str, Any]) -> Operation:
    return Operation(
        app=app,
        id=item["id"],
        kind=kind,
        name=item.get("name", item["id"]),
        method=str(item.get("method") or "").upper() or None,
        endpoint=item.get("endpoint"),
        params_schema=item.get("params") or {"type": "object"},
        runtimes=tuple(item.get("runtimes") or ("python",)),
        fallback=item.get("fallback"),
        dedupe=item.get("dedupe"),
        items=item.get("items"),
        definition=item,
    )
