"""The schema of a connector definition (`connector.json`, DESIGN §8), as pydantic models.

Host side. `problems(definition)` lists everything wrong with a definition as
`Problem(path, message)`, `path` a JSONPath such as `$.actions[2].method`;
the loader refuses a definition with any, and `corral catalog validate`
prints them all. `json_schema()` is the same schema as JSON Schema (committed
as `corral/connectors/schema.json`, so an editor can check a definition as it is
typed).

Keys starting with `x-` are extensions: kept, never checked. Any other key
the schema does not name is a problem (a typo such as `endpiont` must not
pass silently).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import jsonpath_ng
import jsonschema
import referencing
import referencing.exceptions
import referencing.jsonschema
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

#: The `$schema` a definition may name to get editor checks.
SCHEMA_ID = "urn:corral:connector-definition"
HTTP_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_PARAMS_URI = "urn:corral:params"
PLACEHOLDER = re.compile(r"[{]([A-Za-z][A-Za-z0-9_]*)[}]")  # what GENERIC_SOURCE fills


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a definition: where (a JSONPath) and what."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@functools.lru_cache(maxsize=512)
def compile_jsonpath(expression: str) -> jsonpath_ng.JSONPath:
    """`expression` parsed (cached: the catalog names a handful, each used on every poll)."""
    if not expression.startswith("$"):
        raise ValueError(f"{expression!r} is not a JSONPath: it must start with '$'")
    try:
        return jsonpath_ng.parse(expression)
    except Exception as exc:  # the lexer and the parser raise several kinds
        raise ValueError(f"{expression!r} is not a JSONPath ({exc})") from None


def _jsonpath(expression: str) -> str:
    compile_jsonpath(expression)
    return expression


def _references(schema: Any) -> list[str]:
    """Every `$ref` (and `$dynamicRef`) in `schema`, in no particular order."""
    found, pending = [], [schema]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key in ("$ref", "$dynamicRef"):
                    found.append(str(value))
                pending.append(value)
        elif isinstance(item, list):
            pending.extend(item)
    return found


def _params_schema(schema: dict[str, Any]) -> dict[str, Any]:
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
    references = _references(schema)
    for reference in references:
        if not reference.startswith("#"):
            raise ValueError(f"$ref {reference!r} points outside the definition")
    if references and "$id" not in json.dumps(schema):  # an $id moves the base: not checked
        resolver = referencing.Registry().with_resource(
            _PARAMS_URI, referencing.jsonschema.DRAFT202012.create_resource(schema)
        ).resolver(_PARAMS_URI)  # fmt: skip
        for reference in references:
            try:
                resolver.lookup(reference)
            except referencing.exceptions.Unresolvable:
                raise ValueError(f"$ref {reference!r} does not resolve in params") from None
    if schema.get("type", "object") != "object":
        raise ValueError('params must describe an object ("type": "object")')
    return schema


JsonPath = Annotated[str, AfterValidator(_jsonpath), Field(examples=["$.id", "$.fields.updated"])]
PythonName = Annotated[
    str,
    Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="names the handler function too"),
]


class _Model(BaseModel):
    """Unknown keys are problems; `x-` keys are extensions and pass unchecked."""

    model_config = ConfigDict(
        extra="allow",
        populate_by_name=True,
        frozen=True,
        json_schema_extra={"patternProperties": {"^x-": {}}, "additionalProperties": False},
    )

    @model_validator(mode="after")
    def _no_unknown_keys(self) -> _Model:
        unknown = [key for key in self.model_extra or {} if not key.startswith("x-")]
        if unknown:
            known = ", ".join(
                field.alias or name for name, field in type(self).model_fields.items()
            )
            raise ValueError(
                f"unknown key {unknown[0]!r}; known keys are {known} (prefix extensions x-)"
            )
        return self


#: The credential names each auth type reads, any one of which will do (what the generic path
#: sends, and what a connection must carry before anything runs). Basic auth's password is
#: optional: API keys used as the user (Stripe) have none.
CREDENTIAL_NAMES: dict[str, tuple[str, ...]] = {
    "none": (),
    "bearer": ("token", "access_token", "api_key"),
    "basic": ("username", "user", "api_key"),
    "header": ("api_key", "token"),
    "query": ("api_key", "token"),
}


def missing_credentials(auth: dict[str, Any] | None, credentials: Any) -> str | None:
    """What a connection's credentials lack for `auth` (a definition's `auth` object), or
    None when nothing is missing."""
    names = CREDENTIAL_NAMES.get((auth or {}).get("type", "none"), ())
    if not names:
        return None
    given = credentials if isinstance(credentials, dict) else {}
    if any(given.get(name) not in (None, "") for name in names):
        return None
    choice = " or ".join(f"credentials.{name}" for name in names)
    return f"needs {choice} ({auth['type']} auth)"  # type: ignore[index]


class Auth(_Model):
    """How the generic path authenticates with the connection's credentials."""

    type: Literal["none", "bearer", "basic", "header", "query"] = Field(
        description="bearer: credentials token; basic: username/password; header, query: "
        "credentials api_key sent under `name`"
    )
    name: str | None = Field(None, description="header or query parameter name")
    prefix: str | None = Field(None, description="prepended to the header's value")

    @model_validator(mode="after")
    def _fields_fit_the_type(self) -> Auth:
        if self.prefix is not None and self.type != "header":
            raise ValueError("prefix applies only to auth type 'header'")
        if self.name is not None and self.type not in ("header", "query"):
            raise ValueError("name applies only to auth types 'header' and 'query'")
        return self


class Dedupe(_Model):
    """How a trigger tells new items from those it returned before."""

    strategy: Literal["cursor", "key"] = Field(
        description="cursor: new when the key is unseen and the cursor not older than the "
        "stored one; key: new when the key is unseen"
    )
    key: JsonPath = Field(description="JSONPath to an item's unique id")
    cursor: JsonPath | None = Field(None, description="JSONPath to an item's ordering value")
    param: PythonName | None = Field(
        None, description="the param that receives the stored cursor on the next poll"
    )

    @model_validator(mode="after")
    def _cursor_for_cursor_strategy(self) -> Dedupe:
        if self.strategy == "cursor" and self.cursor is None:
            raise ValueError("strategy 'cursor' needs a cursor (a JSONPath such as '$.updated_at')")
        if self.param is not None and self.cursor is None:
            raise ValueError("param needs a cursor to pass")
        return self


class Operation(_Model):
    """What actions and triggers share."""

    id: PythonName
    name: str | None = None
    description: str | None = None
    method: Literal[HTTP_METHODS] | None = Field(  # type: ignore[valid-type]
        None, description="with endpoint: the generic path can run it"
    )
    endpoint: str | None = Field(
        None, pattern=r"^/", description="path under baseUrl; {name} filled from params"
    )
    params: Annotated[dict[str, Any], AfterValidator(_params_schema)] = Field(
        default_factory=lambda: {"type": "object"},
        description="JSON Schema (draft 2020-12) the payload must satisfy",
    )
    headers: dict[str, str] | None = None
    runtimes: list[Literal["python"]] | None = Field(None, min_length=1)
    fallback: Literal["generic"] | None = Field(
        None,
        description="what runs it when the bespoke handler cannot: 'generic' declares the "
        "generic path; null leaves it to GENERIC_EXECUTOR_ENABLED",
    )

    @model_validator(mode="after")
    def _endpoint_placeholders_are_required(self) -> Operation:
        if (self.method is None) != (self.endpoint is None):
            raise ValueError("method and endpoint go together: give both or neither")
        if self.fallback == "generic" and self.method is None:
            raise ValueError("fallback 'generic' needs the method and endpoint it would send")
        required = set(self.params.get("required", []))
        for name in PLACEHOLDER.findall(self.endpoint or ""):
            if name not in required:
                raise ValueError(
                    f"the endpoint's {{{name}}} must be a required param (add {name!r} to "
                    "params.required and params.properties)"
                )
        return self


class Action(Operation):
    """A call that does something."""


class Trigger(Operation):
    """A poll that returns items; the new ones start runs."""

    items: JsonPath | None = Field(
        None,
        description="JSONPath to the list of items in what the trigger returns (a bespoke "
        "handler's value, or the generic response body); default: the value itself",
    )
    dedupe: Dedupe | None = None


class ConnectorDefinition(_Model):
    """One app of the catalog: `connectors/<id>/connector.json`."""

    schema_: str | None = Field(None, alias="$schema")
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="lower case; the folder name")
    name: str | None = None
    description: str | None = None
    base_url: str | None = Field(
        None, alias="baseUrl", pattern=r"^https?://", description="a connection's wins"
    )
    auth: Auth | None = None
    headers: dict[str, str] | None = None
    actions: list[Action] = Field(default_factory=list)
    triggers: list[Trigger] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> ConnectorDefinition:
        seen: set[str] = set()
        for operation in [*self.actions, *self.triggers]:
            if operation.id in seen:
                raise ValueError(f"{operation.id!r} is defined twice (ids name handlers)")
            seen.add(operation.id)
        return self


def problems(definition: Any) -> list[Problem]:
    """Everything wrong with `definition`, in document order; [] when it is valid."""
    if not isinstance(definition, dict):
        return [Problem("$", "the definition must be a JSON object")]
    try:
        ConnectorDefinition.model_validate(definition)
    except ValidationError as exc:
        return [_problem(error) for error in exc.errors(include_url=False)]
    return []


_PATTERN_HINTS = {  # (at the top level, key): why the pattern is what it is
    (True, "id"): ": an app id is lower case, such as 'github' (it names the folder)",
    (False, "id"): ": it names the handler function, so it must be a Python name",
    (True, "baseUrl"): ": an http(s) URL",
    (False, "endpoint"): ": a path under baseUrl, such as '/repos/{owner}/{repo}/issues'",
}


def _problem(error: Any) -> Problem:
    path = "$"
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("function-after", "function-before"):  # pydantic's validator frames
            continue
        else:
            path += f".{part}" if re.fullmatch(r"[A-Za-z_$][\w-]*", str(part)) else f"[{part!r}]"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "is required"
    elif error["type"] == "string_pattern_mismatch":
        hint = _PATTERN_HINTS.get((len(error["loc"]) == 1, str(error["loc"][-1])), "")
        message = f"{error['input']!r} does not match {error['ctx']['pattern']}{hint}"
    elif error["type"] == "literal_error":
        message = message.replace("Input should be", "must be")
    return Problem(path, message)


def json_schema() -> dict[str, Any]:
    """The definition schema as JSON Schema (what `corral/connectors/schema.json` holds)."""
    schema = ConnectorDefinition.model_json_schema(by_alias=True, mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        **schema,
    }
