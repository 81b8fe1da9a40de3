"""The connector catalog: definitions (`connector.json`) and bespoke handlers (`handlers.py`).

Host side. A catalog folder holds one folder per app (DESIGN §8). Folders
from CORRAL_CONNECTORS_DIR are searched before the shipped `connectors/`;
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
from corral.config import Settings

#: The catalog shipped with corral, next to the package.
SHIPPED_CATALOG = Path(__file__).resolve().parents[2] / "connectors"
_ID = re.compile(r"[a-z0-9][a-z0-9_-]*\Z")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})


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
            raise InvalidInput(
                f"{self.id} has no action or trigger {function!r}; it has: {known}"
            )
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
            for path in _app_folders(folder):
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


def _app_folders(folder: Path) -> Iterator[Path]:
    if not folder.is_dir():
        return
    for path in sorted(folder.iterdir()):
        if (path / "connector.json").is_file():
            yield path


def load_connector(path: Path) -> Connector:
    """The app defined in folder `path`; CatalogError naming the file and what is wrong."""
    definition_file = path / "connector.json"
    try:
        definition = json.loads(definition_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"corral: {definition_file}: cannot be read as JSON: {exc}") from None
    problem = _problem(definition)
    if problem:
        raise CatalogError(f"corral: {definition_file}: {problem}")
    handlers_file = path / "handlers.py"
    source, names = None, frozenset[str]()
    if handlers_file.is_file():
        try:
            source = handlers_file.read_text(encoding="utf-8")
            tree = ast.parse(source, str(handlers_file))
        except SyntaxError as exc:
            raise CatalogError(f"corral: {handlers_file}: line {exc.lineno}: {exc.msg}") from None
        except (OSError, ValueError, MemoryError, RecursionError) as exc:  # not UTF-8, too deep
            message = f"corral: {handlers_file}: cannot be read as Python ({type(exc).__name__})"
            raise CatalogError(message) from None
        names = frozenset(
            node.name for node in tree.body if isinstance(node, ast.FunctionDef)
        )
    app = definition["id"]
    operations = {
        kind: {
            item["id"]: _operation(app, kind, item)
            for item in definition.get(f"{kind}s", [])
        }
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
        definition=item,
    )


def _outside_reference(schema: Any) -> str | None:
    """The first `$ref` (or `$dynamicRef`) of `schema` that is not local (`#...`)."""
    pending = [schema]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("$ref", "$dynamicRef") and not str(value).startswith("#"):
                    return str(value)
                pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)
    return None


def _problem(definition: Any) -> str | None:
    """The first thing wrong with a definition, as `path: problem`; None when it is fine.

    The structural minimum the runtime relies on; `corral catalog validate` checks
    the full schema.
    """
    if not isinstance(definition, dict):
        return "the definition must be a JSON object"
    app = definition.get("id")
    if not isinstance(app, str) or not _ID.match(app):
        return "$.id: must be a lower-case id such as 'github'"
    seen: set[str] = set()
    for kind in ("actions", "triggers"):
        items = definition.get(kind, [])
        if not isinstance(items, list):
            return f"$.{kind}: must be a list"
        for index, item in enumerate(items):
            where = f"$.{kind}[{index}]"
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                return f"{where}.id: every {kind[:-1]} needs an id"
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", item["id"]):
                return f"{where}.id: {item['id']!r} is not a Python name (it names a handler)"
            if item["id"] in seen:
                return f"{where}.id: {item['id']!r} is defined twice"
            seen.add(item["id"])
            method = item.get("method")
            if method is not None and str(method).upper() not in _METHODS:
                return f"{where}.method: {method!r} is not an HTTP method"
            schema = item.get("params", {"type": "object"})
            try:
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                return f"{where}.params: not a valid JSON Schema: {exc.message}"
            outside = _outside_reference(schema)
            if outside is not None:
                return f"{where}.params: $ref {outside!r} points outside the definition"
    return None
