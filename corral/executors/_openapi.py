"""`corral catalog import-openapi`: a connector definition made from an OpenAPI 3 document.

Host side. Each operation of the document becomes an action the generic path
can run: its `method` and `endpoint` (path parameters renamed to Python names
where they are not), and a params schema (JSON Schema 2020-12) made of its
path and query parameters and the properties of its JSON request body. The
document's first server is the `baseUrl` and its security scheme the `auth`.

The document is read as JSON or YAML (safe loading only), checked with
openapi-spec-validator, and its `$ref`s are resolved with `referencing`
(jsonschema's resolver). Only references inside the document are followed:
an import never fetches anything. Schemas a params schema refers to are
copied into its `$defs`, so recursive schemas stay finite.

Re-importing an updated document refreshes what the document owns (method,
endpoint, params) and keeps what a person owns: runtimes, fallback, headers,
triggers, actions made by hand, extension keys, and any name, description,
baseUrl or auth that differs from what the last import wrote. To tell the two
apart each imported object carries `x-openapi`: the operation it came from
and a short digest of each value the import suggested.
"""

from __future__ import annotations

import copy
import hashlib
import json
import keyword
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import openapi_spec_validator
import referencing
import referencing.exceptions
import referencing.jsonschema
import yaml
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

from corral.executors._backfill import ACTION_DEFAULTS, _replace
from corral.executors._catalog import CatalogError
from corral.executors._schema import HTTP_METHODS, problems

_BASE_URI = "urn:corral:openapi-document"
#: Key of the import's bookkeeping on the definition and on each action it made.
MARK = "x-openapi"
#: Values the document suggests but a person may change; kept once changed.
_SUGGESTED_TOP = ("name", "description", "baseUrl", "auth")
_SUGGESTED_ACTION = ("name", "description")
#: Keys of an OpenAPI 3.0 schema object that JSON Schema does not know, or that mean
#: nothing for a request: dropped from params schemas.
_OPENAPI_ONLY = frozenset({"discriminator", "xml", "externalDocs", "example", "nullable"})
_QUERY_METHODS = ("GET", "DELETE", "HEAD")  # what the generic path sends as query


@dataclass
class ImportReport:
    """What an import did (or, with `check`, would do) to `path`."""

    path: Path
    created: bool = False
    changed: bool = False
    added: list[str] = field(default_factory=list)  # action ids new in the definition
    updated: list[str] = field(default_factory=list)  # action ids whose request changed
    removed: list[str] = field(default_factory=list)  # imported actions gone from the document
    kept: list[str] = field(default_factory=list)  # values a person set, left as they are
    notes: list[str] = field(default_factory=list)  # parts of the document not imported


def import_openapi(spec: Path, app: str, folder: Path, *, check: bool = False) -> ImportReport:
    """Make or refresh `folder/app/connector.json` from the OpenAPI document `spec`.

    With `check`, writes nothing. CatalogError names the file and what is wrong
    with it: unreadable, not OpenAPI 3, invalid, a reference outside the document.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", app):
        raise CatalogError(
            f"corral: --app {app!r}: an app id is lower case letters, digits, '-' and '_', "
            "such as 'petstore' (it names the folder)"
        )
    document = _read_document(spec)
    path = folder / app / "connector.json"
    existing = _read_existing(path)
    report = ImportReport(path=path, created=existing is None)
    imported = _Importer(document, spec, report).definition(app)
    merged = _merge(existing, imported, report)
    found = problems(merged)
    if found:  # a document the schema cannot express: say where, write nothing
        raise CatalogError(f"corral: {spec}: the imported definition is invalid: {found[0]}")
    text = _dumps(merged) + "\n"
    report.changed = existing is None or text != path.read_text(encoding="utf-8")
    if report.changed and not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        _replace(path, text)
    return report


def _read_document(spec: Path) -> dict[str, Any]:
    try:
        text = spec.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"corral: {spec}: cannot be read: {exc}") from None
    try:
        document = json.loads(text) if spec.suffix == ".json" else yaml.load(text, _YamlLoader)
    except ValueError as exc:
        raise CatalogError(f"corral: {spec}: cannot be read as JSON: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CatalogError(f"corral: {spec}: cannot be read as YAML: {where}{problem}") from None
    if not isinstance(document, dict):
        raise CatalogError(f"corral: {spec}: an OpenAPI document is an object")
    version = str(document.get("openapi", ""))
    if not version.startswith("3."):
        found = f"swagger {document['swagger']}" if "swagger" in document else "no 'openapi' key"
        raise CatalogError(
            f"corral: {spec}: only OpenAPI 3 documents are imported ({found}); convert a "
            "Swagger 2.0 document first, e.g. with swagger2openapi"
        )
    try:
        outside = _outside_reference(document)
        if outside is not None:
            raise CatalogError(
                f"corral: {spec}: {outside[0]}: $ref {outside[1]!r} points outside the "
                "document; the import never fetches: bundle the document first "
                "(e.g. `redocly bundle`)"
            )
        openapi_spec_validator.validate(document)
    except OpenAPIValidationError as exc:
        # One line whichever backend validated: the jsonschema-rs one (used when installed,
        # e.g. by schemathesis) appends the failing schema and instance on further lines.
        message = (exc.message.strip().splitlines() or ["invalid"])[0]
        raise CatalogError(f"corral: {spec}: {exc.json_path}: {message}") from None
    except referencing.exceptions.Unresolvable as exc:
        raise CatalogError(f"corral: {spec}: $ref {exc.ref!r} does not resolve") from None
    except CatalogError:
        raise
    except Exception as exc:  # the validator fails in its own ways on some malformed input
        raise CatalogError(
            f"corral: {spec}: not a valid OpenAPI document ({type(exc).__name__}: {exc})"
        ) from None
    return document


class _YamlLoader(yaml.SafeLoader):
    """Safe loading as a JSON document reads: no aliases (`*name` would let a few bytes
    stand for an exponential or endless tree), dates left as the strings they were
    written as, and mapping keys as strings (a response code `200:` is "200")."""

    yaml_implicit_resolvers: ClassVar[dict[Any, list[Any]]] = {
        first: [(tag, pattern) for tag, pattern in resolvers if not tag.endswith(":timestamp")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not supported: write the value out",
                event.start_mark,
            )  # fmt: skip
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key_node.tag = "tag:yaml.org,2002:str"
        return super().construct_mapping(node, deep=deep)


#: Keys whose values are data, not parts of the document: a `$ref` there is an example.
_DATA_KEYS = frozenset({"example", "examples", "default", "enum", "const"})


def _outside_reference(document: Any) -> tuple[str, str] | None:
    """(where, ref) of the first `$ref` that does not start with `#`."""
    pending: list[tuple[str, Any]] = [("$", document)]
    while pending:
        where, item = pending.pop()
        if isinstance(item, dict):
            ref = item.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                return where, ref
            pending += [(f"{where}.{key}", value) for key, value in item.items()
                        if key not in _DATA_KEYS]  # fmt: skip
        elif isinstance(item, list):
            pending += [(f"{where}[{index}]", value) for index, value in enumerate(item)]
    return None


def _read_existing(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CatalogError(f"corral: {path}: cannot be read as JSON: {exc}") from None
    if not isinstance(existing, dict):
        raise CatalogError(f"corral: {path}: the definition must be a JSON object")
    return existing


class _Importer:
    """One document turned into a definition; `report.notes` collects what was left out."""

    def __init__(self, document: dict[str, Any], spec: Path, report: ImportReport) -> None:
        self.document = document
        self.spec = spec
        self.report = report
        resource = referencing.Resource.from_contents(
            document, default_specification=referencing.jsonschema.DRAFT202012
        )
        self.resolver = (
            referencing.Registry().with_resource(_BASE_URI, resource).resolver(_BASE_URI)
        )

    def definition(self, app: str) -> dict[str, Any]:
        info = self.document.get("info") or {}
        definition: dict[str, Any] = {"id": app, "name": info.get("title") or app}
        description = info.get("description") or info.get("summary")
        if description:
            definition["description"] = str(description).strip()
        base_url = self._base_url()
        if base_url:
            definition["baseUrl"] = base_url
        auth = self._auth()
        if auth:
            definition["auth"] = auth
        definition["actions"] = list(self._actions())
        definition[MARK] = {
            "source": f"{info.get('title', '')} {info.get('version', '')}".strip(),
            "suggested": _digests(definition, _SUGGESTED_TOP),
        }
        return definition

    def note(self, message: str) -> None:
        self.report.notes.append(message)

    def resolve(self, node: Any) -> Any:
        """`node` with its `$ref` (and the chain it leads to) followed."""
        seen = set()
        while isinstance(node, dict) and isinstance(node.get("$ref"), str):
            if node["$ref"] in seen:
                raise CatalogError(f"corral: {self.spec}: $ref {node['$ref']!r} refers to itself")
            seen.add(node["$ref"])
            try:
                node = self.resolver.lookup(node["$ref"]).contents
            except referencing.exceptions.Unresolvable:
                raise CatalogError(
                    f"corral: {self.spec}: $ref {node['$ref']!r} does not resolve"
                ) from None
        return node

    def _base_url(self) -> str | None:
        servers = self.document.get("servers") or []
        if not servers:
            return None
        server = servers[0]
        url = str(server.get("url", ""))
        for name, variable in (server.get("variables") or {}).items():
            url = url.replace("{" + name + "}", str(variable.get("default", "")))
        if not re.match(r"^https?://", url):
            self.note(f"server {url!r} is not an absolute http(s) URL: no baseUrl (a "
                      "connection's baseUrl gives it)")  # fmt: skip
            return None
        return url.rstrip("/")

    def _auth(self) -> dict[str, Any] | None:
        schemes = (self.document.get("components") or {}).get("securitySchemes") or {}
        wanted = [name for requirement in self.document.get("security") or [] for name in
                  requirement] or list(schemes)  # fmt: skip
        for name in wanted:
            scheme = self.resolve(schemes.get(name)) or {}
            kind, where = scheme.get("type"), scheme.get("in")
            if kind == "http" and str(scheme.get("scheme", "")).lower() in ("bearer", "basic"):
                return {"type": str(scheme["scheme"]).lower()}
            if kind in ("oauth2", "openIdConnect"):
                self.note(f"security scheme {name!r} ({kind}): imported as bearer; the "
                          "connection's credentials carry the access token")  # fmt: skip
                return {"type": "bearer"}
            if kind == "apiKey" and where in ("header", "query"):
                return {"type": where, "name": str(scheme["name"])}
            self.note(f"security scheme {name!r} ({kind} {where or ''}) is not supported by "
                      "the generic path: skipped")  # fmt: skip
        return None

    def _actions(self) -> Iterator[dict[str, Any]]:
        ids: set[str] = set()
        keys: set[str] = set()
        for route, path_item in (self.document.get("paths") or {}).items():
            path_item = self.resolve(path_item) or {}
            for method, operation in path_item.items():
                if method.upper() not in HTTP_METHODS or not isinstance(operation, dict):
                    continue  # parameters, summary, servers, and TRACE (not sent)
                key = operation.get("operationId") or f"{method.upper()} {route}"
                if key in keys:  # re-imports match actions by it: it must name one
                    raise CatalogError(
                        f"corral: {self.spec}: {key!r} names two operations; give each an "
                        "operationId of its own"
                    )
                keys.add(key)
                action_id = _unique(_python_name(key), ids)
                ids.add(action_id)
                yield self._action(action_id, key, method.upper(), route, path_item, operation)

    def _action(
        self, action_id: str, key: str, method: str, route: str,
        path_item: dict[str, Any], operation: dict[str, Any],
    ) -> dict[str, Any]:  # fmt: skip
        params = _Params(self, key)
        parameters = {}  # the operation's own win over the path item's (same name and `in`)
        for parameter in [*path_item.get("parameters", []), *operation.get("parameters", [])]:
            parameter = self.resolve(parameter)
            parameters[(parameter.get("name"), parameter.get("in"))] = parameter
        renamed = {}
        for parameter in parameters.values():
            where = parameter.get("in")
            if where == "path":
                renamed[parameter["name"]] = params.add(parameter, required=True, path=True)
            elif where == "query" and _nested(self.resolve(parameter.get("schema") or {})):
                self.note(f"{key}: query parameter {parameter['name']!r} left out: the generic "
                          "path sends flat query values, not objects")  # fmt: skip
            elif where == "query" and method in _QUERY_METHODS:
                params.add(parameter, required=bool(parameter.get("required")))
            elif where == "query":
                self.note(f"{key}: query parameter {parameter['name']!r} left out: the generic "
                          f"path sends a {method}'s params as its JSON body")  # fmt: skip
            else:
                self.note(f"{key}: {where} parameter {parameter.get('name')!r} left out: the "
                          "generic path sends only path, query and body params")  # fmt: skip
        if "requestBody" in operation and method in _QUERY_METHODS:
            self.note(f"{key}: request body left out: the generic path sends a {method}'s "
                      "params as its query")  # fmt: skip
        elif "requestBody" in operation:
            params.add_body(self.resolve(operation["requestBody"]) or {})
        servers = operation.get("servers") or path_item.get("servers")
        if servers:
            self.note(f"{key}: its own server {servers[0].get('url')!r} is not used: the "
                      "generic path sends to the connector's baseUrl")  # fmt: skip
        endpoint = re.sub(
            r"\{([^}]+)\}", lambda match: "{" + renamed.get(match[1], match[1]) + "}", route
        )
        action: dict[str, Any] = {"id": action_id}
        name = operation.get("summary") or _title(action_id)
        action["name"] = str(name).strip()
        description = operation.get("description")
        if description:
            action["description"] = str(description).strip()
        action |= {"method": method, "endpoint": endpoint, "params": params.schema()}
        action |= copy.deepcopy(ACTION_DEFAULTS)
        action[MARK] = {"operation": key, "suggested": _digests(action, _SUGGESTED_ACTION)}
        return action


class _Params:
    """The params schema of one operation, built parameter by parameter."""

    def __init__(self, importer: _Importer, key: str) -> None:
        self.importer = importer
        self.key = key
        self.properties: dict[str, Any] = {}
        self.required: list[str] = []
        self.defs: dict[str, Any] = {}
        self.def_names: dict[str, str] = {}  # $ref -> its name in $defs
        self.open = False  # a body whose properties are not all known: allow others

    def add(self, parameter: dict[str, Any], *, required: bool, path: bool = False) -> str:
        """Add a path or query parameter; the name it has in params."""
        name = str(parameter["name"])
        if path:
            name = _python_name(name, keep_case=True)
        schema = self.convert(parameter.get("schema") or {})
        if parameter.get("description") and "description" not in schema:
            schema = {**schema, "description": str(parameter["description"]).strip()}
        self.properties[name] = schema
        if required and name not in self.required:
            self.required.append(name)
        return name

    def add_body(self, body: dict[str, Any]) -> None:
        content = body.get("content") or {}
        media = next((m for m in content if m == "application/json" or m.endswith("+json")), None)
        if media is None:
            if content:
                takes = ", ".join(content)
                self.importer.note(f"{self.key}: request body left out: the generic path "
                                   f"sends JSON, the operation takes {takes}")  # fmt: skip
            return
        schema = self.importer.resolve(content[media].get("schema") or {})
        if schema.get("type", "object") != "object":
            self.importer.note(f"{self.key}: request body left out: the generic path sends "
                               f"an object, the operation takes {schema['type']}")  # fmt: skip
            return
        parts = [self.importer.resolve(part) for part in schema.get("allOf", [schema])]
        if not all(part.get("type", "object") == "object" and "properties" in part
                   for part in parts):  # fmt: skip
            self.importer.note(f"{self.key}: request body is not an object with properties: "
                               "its params are not checked beyond the path and query")  # fmt: skip
            self.open = True
            return
        for part in parts:
            for name, prop in part["properties"].items():
                if self.importer.resolve(prop).get("readOnly"):
                    continue  # the server sets it; a request does not send it
                if name in self.properties:
                    self.importer.note(f"{self.key}: body property {name!r} left out: a "
                                       "parameter has the same name")  # fmt: skip
                    continue
                self.properties[name] = self.convert(prop)
            if body.get("required"):
                self.required += [n for n in part.get("required", []) if n in self.properties
                                  and n not in self.required]  # fmt: skip
            if part.get("additionalProperties", True) is not False:
                self.open = True

    def schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object"}
        if self.required:
            schema["required"] = self.required
        schema["properties"] = self.properties
        if not self.open:
            schema["additionalProperties"] = False
        if self.defs:
            schema["$defs"] = self.defs
        return schema

    def convert(self, node: Any) -> Any:
        """An OpenAPI schema object as JSON Schema 2020-12, references into `$defs`."""
        if isinstance(node, list):
            return [self.convert(item) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            if ref not in self.def_names:
                name = _unique(re.sub(r"[^A-Za-z0-9_.-]", "_", ref.rsplit("/", 1)[-1]),
                               set(self.def_names.values()))  # fmt: skip
                self.def_names[ref] = name
                self.defs[name] = {}  # taken before converting: a schema may contain itself
                self.defs[name] = self.convert(self.importer.resolve({"$ref": ref}))
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            return {"$ref": f"#/$defs/{self.def_names[ref]}", **self.convert(siblings)}
        converted = {
            key: self._convert_member(key, value)
            for key, value in node.items()
            if key not in _OPENAPI_ONLY and not key.startswith("x-")
        }
        if node.get("nullable") is True:  # OpenAPI 3.0's spelling of "or null"
            kind = converted.get("type")
            if not isinstance(kind, str):  # oneOf, allOf, a $ref...: null or all of that
                converted = {"anyOf": [converted, {"type": "null"}]}
            else:
                converted["type"] = [kind, "null"]
                if isinstance(converted.get("enum"), list) and None not in converted["enum"]:
                    converted["enum"] = [*converted["enum"], None]
        for bound in ("Minimum", "Maximum"):  # 3.0: a flag on minimum; 2020-12: a number
            flag = converted.get(f"exclusive{bound}")
            if isinstance(flag, bool):
                del converted[f"exclusive{bound}"]
                if flag and f"{bound.lower()}" in converted:
                    converted[f"exclusive{bound}"] = converted.pop(bound.lower())
        return converted

    def _convert_member(self, key: str, value: Any) -> Any:
        if key in ("properties", "patternProperties", "$defs", "definitions"):
            return {name: self.convert(item) for name, item in value.items()}
        if key in ("enum", "const", "default", "examples", "required", "type"):
            return value  # data, not schemas
        return self.convert(value)


def _nested(schema: dict[str, Any]) -> bool:
    """Whether a query parameter's schema is an object (deepObject and the like)."""
    return schema.get("type") == "object" or "properties" in schema


def _merge(
    existing: dict[str, Any] | None, imported: dict[str, Any], report: ImportReport
) -> dict[str, Any]:
    """`imported` laid over `existing`, keeping what a person owns; fills `report`."""
    if existing is None:
        report.added = [action["id"] for action in imported["actions"]]
        return imported
    merged = _keep_changed(existing, imported, _SUGGESTED_TOP, "", report)
    fresh = {action[MARK]["operation"]: action for action in imported["actions"]}
    actions = []
    for old in existing.get("actions", []):  # the existing order first: the diff shows changes
        mark = old.get(MARK) if isinstance(old, dict) else None
        if not isinstance(mark, dict):
            actions.append(old)  # made by hand: the import does not own it
            continue
        new = fresh.pop(str(mark.get("operation")), None)
        if new is None:
            report.removed.append(str(old.get("id")))
            continue
        action = _keep_changed(old, {**new, "id": old["id"]}, _SUGGESTED_ACTION,
                               f"{old['id']}.", report)  # fmt: skip
        for key in ("runtimes", "fallback", "headers"):  # a person's, once set
            if key in old:
                action[key] = old[key]
        if any(action.get(key) != old.get(key) for key in ("method", "endpoint", "params")):
            report.updated.append(str(old["id"]))
        actions.append(action)
    taken = {item.get("id") for item in [*actions, *existing.get("triggers", [])]
             if isinstance(item, dict)}  # fmt: skip
    for new in fresh.values():  # operations new in the document
        new = {**new, "id": _unique(new["id"], taken)}
        taken.add(new["id"])
        report.added.append(new["id"])
        actions.append(new)
    merged["actions"] = actions
    return merged


def _keep_changed(
    old: dict[str, Any], new: dict[str, Any], suggested: tuple[str, ...], label: str,
    report: ImportReport,
) -> dict[str, Any]:  # fmt: skip
    """`new` over `old` (in `old`'s key order), except the `suggested` values a person
    changed since the last import, which stay."""
    last = (old.get(MARK) or {}).get("suggested") or {}
    merged = dict(old)
    for key, value in new.items():
        edited = key in old and _digest(old[key]) != last.get(key)
        if key in suggested and old.get(key) != value and edited:
            report.kept.append(f"{label}{key}")
            continue
        merged[key] = value
    for key in suggested:  # the document no longer suggests it: drop it unless a person's
        if key in old and key not in new and _digest(old[key]) == last.get(key):
            del merged[key]
    return merged


def _dumps(value: Any, indent: str = "") -> str:
    """`value` as JSON laid out like the shipped catalog: two-space indents, one member a
    line, and lists of plain values (`["python"]`, `required`) on one line."""
    inner = indent + "  "
    if isinstance(value, dict) and value:
        members = [f"{inner}{json.dumps(key)}: {_dumps(item, inner)}" for key, item in
                   value.items()]  # fmt: skip
        return "{\n" + ",\n".join(members) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(item, dict | list) for item in value):
        return "[\n" + ",\n".join(inner + _dumps(item, inner) for item in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False)


def _digests(values: dict[str, Any], keys: tuple[str, ...]) -> dict[str, str]:
    return {key: _digest(values[key]) for key in keys if key in values}


def _digest(value: Any) -> str:
    """A short fingerprint of `value`: enough to tell an edited value from the imported one."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _python_name(text: str, *, keep_case: bool = False) -> str:
    """`text` as a Python name: `listPets` → `list_pets`, `repos/get-content` →
    `repos_get_content`, `GET /pets/{id}` → `get_pets_id`; `keep_case` only replaces."""
    if not keep_case:
        text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", text).lower()
    name = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "operation"
    if name[0].isdigit():
        name = f"op_{name}"
    return f"{name}_" if keyword.iskeyword(name) else name


def _title(action_id: str) -> str:
    return action_id.replace("_", " ").capitalize()


def _unique(name: str, taken: set[Any]) -> str:
    candidate, number = name, 2
    while candidate in taken:
        candidate, number = f"{name}_{number}", number + 1
    return candidate
