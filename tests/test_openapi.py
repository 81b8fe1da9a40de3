"""`corral catalog import-openapi`: OpenAPI 3 documents made into connector definitions.

Documents are written to tmp_path; the imported connector runs through the
generic path in a real sandbox against a real server on 127.0.0.1. Nothing
here sends a request anywhere else.
"""

from __future__ import annotations

import asyncio
import copy
import http.server
import json
import re
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import corral, serving

import corral as corral_api
from corral.config import load_settings
from corral.executors import (
    CatalogError,
    ConnectorFramework,
    IntegrationManager,
    import_openapi,
    problems,
)
from corral.executors._openapi import MARK

API_KEY = "pk_c0rralPetst0reK3y9a8b7c"

PETSTORE: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "Petstore", "version": "1.0.0", "description": "A pet store."},
    "servers": [
        {"url": "https://{region}.petstore.example/v1", "variables": {"region": {"default": "eu"}}}
    ],
    "security": [{"key": []}],
    "components": {
        "securitySchemes": {"key": {"type": "apiKey", "in": "header", "name": "X-Api-Key"}},
        "parameters": {
            "Limit": {
                "name": "limit",
                "in": "query",
                "schema": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 100,
                    "exclusiveMaximum": True,
                },
            }
        },
        "schemas": {
            "Pet": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "id": {"type": "integer", "readOnly": True},
                    "name": {"type": "string", "example": "Rex"},
                    "tag": {"type": "string", "nullable": True},
                    "parent": {"$ref": "#/components/schemas/Pet"},
                },
            }
        },
    },
    "paths": {
        "/pets": {
            "get": {
                "operationId": "listPets",
                "summary": "List pets",
                "parameters": [{"$ref": "#/components/parameters/Limit"}],
                "responses": {"200": {"description": "ok"}},
            },
            "post": {
                "operationId": "createPet",
                "parameters": [{"name": "dryRun", "in": "query", "schema": {"type": "boolean"}}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Pet"}}
                    },
                },
                "responses": {"201": {"description": "ok"}},
            },
        },
        "/pets/{pet-id}": {
            "parameters": [
                {"name": "pet-id", "in": "path", "required": True, "schema": {"type": "string"}}
            ],
            "get": {"summary": "Get a pet", "responses": {"200": {"description": "ok"}}},
            "delete": {
                "operationId": "deletePet",
                "parameters": [{"name": "X-Trace", "in": "header", "schema": {"type": "string"}}],
                "responses": {"204": {"description": "gone"}},
            },
        },
    },
}


def write(path: Path, document: dict[str, Any]) -> Path:
    """`document` written as YAML (or JSON for a .json path)."""
    if path.suffix == ".json":
        text = json.dumps(document)
    else:
        text = yaml.safe_dump(document, sort_keys=False)
    path.write_text(text)
    return path


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    folder = tmp_path / "catalog"
    folder.mkdir()
    return folder


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return write(tmp_path / "petstore.yaml", PETSTORE)


def imported(catalog: Path) -> dict[str, Any]:
    return json.loads((catalog / "petstore" / "connector.json").read_text())


def actions(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {action["id"]: action for action in definition["actions"]}


def test_each_operation_becomes_an_action_the_generic_path_can_run(spec, catalog):
    """Operations become actions: ids from operationIds (or method and path), path
    placeholders as Python names, query params for a GET, the JSON body's properties for a
    POST, baseUrl from the first server, auth from the security scheme."""
    report = import_openapi(spec, "petstore", catalog)
    assert report.created and report.changed
    assert report.added == ["list_pets", "create_pet", "get_pets_pet_id", "delete_pet"]
    definition = imported(catalog)
    assert problems(definition) == []
    assert definition["baseUrl"] == "https://eu.petstore.example/v1"
    assert definition["auth"] == {"type": "header", "name": "X-Api-Key"}
    found = actions(definition)
    assert found["list_pets"]["method"] == "GET" and found["list_pets"]["endpoint"] == "/pets"
    assert found["list_pets"]["params"] == {
        "type": "object",
        "properties": {"limit": {"type": "integer", "minimum": 1, "exclusiveMaximum": 100}},
        "additionalProperties": False,
    }
    assert found["get_pets_pet_id"]["endpoint"] == "/pets/{pet_id}"
    assert found["get_pets_pet_id"]["name"] == "Get a pet"
    assert found["get_pets_pet_id"]["params"]["required"] == ["pet_id"]
    create = found["create_pet"]["params"]
    assert create["required"] == ["name"]
    assert set(create["properties"]) == {"name", "tag", "parent"}  # id is read-only
    assert create["properties"]["tag"] == {"type": ["string", "null"]}
    assert create["properties"]["parent"] == {"$ref": "#/$defs/Pet"}  # recursive: by reference
    assert "example" not in json.dumps(create)
    for action in definition["actions"]:
        assert action["runtimes"] == ["python"] and action["fallback"] is None
    assert any("dryRun" in note for note in report.notes)
    assert any("X-Trace" in note for note in report.notes)


def test_a_json_document_imports_like_its_yaml_twin(spec, catalog, tmp_path):
    """JSON and YAML documents give the same definition."""
    import_openapi(spec, "petstore", catalog)
    other = tmp_path / "other"
    other.mkdir()
    import_openapi(write(tmp_path / "petstore.json", PETSTORE), "petstore", other)
    assert imported(catalog) == imported(other)


class PetHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in Petstore that records what it got."""

    seen: list[dict[str, Any]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        url = urllib.parse.urlsplit(self.path)
        self.seen.append({
            "method": self.command, "path": url.path,
            "query": dict(urllib.parse.parse_qsl(url.query)),
            "key": self.headers.get("X-Api-Key"),
            "body": json.loads(self.rfile.read(length)) if length else None,
        })  # fmt: skip
        data = json.dumps([{"id": 1, "name": "Rex"}]).encode()
        self.send_response(201 if self.command == "POST" else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def petstore_api() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []
    handler = type("Handler", (PetHandler,), {"seen": seen})
    with serving(handler) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen


def test_the_imported_connector_sends_what_the_document_describes(spec, catalog, petstore_api):
    """Run through the generic path in the sandbox, an imported action sends its query,
    path and JSON body with the API key where the scheme says, and its params contract
    refuses what the document does not allow before any request."""
    import_openapi(spec, "petstore", catalog)
    url, seen = petstore_api
    connection = {"baseUrl": url, "credentials": {"api_key": API_KEY}}
    settings = load_settings(CORRAL_EGRESS_ALLOW="127.0.0.1")
    with (
        corral_api.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True),
        corral_api.NodeSandbox(
            executor="process", limits=corral_api.Limits(max_memory_mb=64), settings=settings
        ) as sandbox,
    ):
        manager = IntegrationManager(ConnectorFramework([catalog]), sandbox)

        def call(function: str, params: dict[str, Any]) -> Any:
            return asyncio.run(manager.execute("petstore", function, params, connection))

        listed = call("list_pets", {"limit": 5})
        assert listed.executor == "generic" and listed.output["data"] == [{"id": 1, "name": "Rex"}]
        call("create_pet", {"name": "Rex", "tag": None})
        call("get_pets_pet_id", {"pet_id": "a/b"})
        for bad in ({"limit": 100}, {"limit": 5, "limt": 1}):
            with pytest.raises(corral_api.InvalidInput):
                call("list_pets", bad)
        with pytest.raises(corral_api.InvalidInput, match="name"):
            call("create_pet", {"tag": "x"})
    assert seen == [
        {"method": "GET", "path": "/v1/pets", "query": {"limit": "5"}, "key": API_KEY,
         "body": None},
        {"method": "POST", "path": "/v1/pets", "query": {}, "key": API_KEY,
         "body": {"name": "Rex", "tag": None}},
        {"method": "GET", "path": "/v1/pets/a%2Fb", "query": {}, "key": API_KEY, "body": None},
    ]  # fmt: skip


def updated_petstore() -> dict[str, Any]:
    """Petstore 1.1: listPets takes an offset, createPet is documented, deletePet is gone,
    updatePet is new."""
    document = copy.deepcopy(PETSTORE)
    document["info"]["version"] = "1.1.0"
    paths = document["paths"]
    paths["/pets"]["get"]["parameters"].append(
        {"name": "offset", "in": "query", "schema": {"type": "integer", "minimum": 0}}
    )
    paths["/pets"]["post"]["summary"] = "Add a pet"
    del paths["/pets/{pet-id}"]["delete"]
    paths["/pets/{pet-id}"]["put"] = {
        "operationId": "updatePet",
        "requestBody": {"content": {"application/json": {"schema": {
            "$ref": "#/components/schemas/Pet"}}}},
        "responses": {"200": {"description": "ok"}},
    }  # fmt: skip
    return document


def test_reimport_refreshes_the_document_and_keeps_what_a_person_set(spec, catalog):
    """Re-importing an updated document refreshes endpoints and params, adds and removes
    operations, and keeps what a person set: renamed ids and names, runtimes, fallback,
    a changed baseUrl, hand-made actions and triggers, extension keys."""
    import_openapi(spec, "petstore", catalog)
    file = catalog / "petstore" / "connector.json"
    definition = json.loads(file.read_text())
    definition["baseUrl"] = "https://pets.internal.example/v1"
    found = actions(definition)
    found["list_pets"]["name"] = "All the pets"
    found["list_pets"]["fallback"] = "generic"
    found["get_pets_pet_id"]["id"] = "get_pet"  # renamed: a handler now has this name
    found["create_pet"]["x-team"] = "pets"
    definition["actions"].append(
        {"id": "adopt", "method": "POST", "endpoint": "/adopt", "runtimes": ["python"],
         "fallback": None}
    )  # fmt: skip
    definition["triggers"] = [{"id": "new_pet", "method": "GET", "endpoint": "/pets"}]
    file.write_text(json.dumps(definition, indent=2))

    report = import_openapi(write(spec, updated_petstore()), "petstore", catalog)
    assert report.changed and not report.created
    assert report.added == ["update_pet"]
    assert report.removed == ["delete_pet"]
    assert sorted(report.updated) == ["list_pets"]
    assert sorted(report.kept) == ["baseUrl", "list_pets.name"]
    after = imported(catalog)
    assert problems(after) == []
    assert after["baseUrl"] == "https://pets.internal.example/v1"
    assert after["triggers"] == definition["triggers"]
    assert [a["id"] for a in after["actions"]] == [
        "list_pets",
        "create_pet",
        "get_pet",
        "adopt",
        "update_pet",
    ]
    found = actions(after)
    assert found["list_pets"]["name"] == "All the pets"
    assert found["list_pets"]["fallback"] == "generic"
    assert set(found["list_pets"]["params"]["properties"]) == {"limit", "offset"}
    assert found["create_pet"]["name"] == "Add a pet"  # nobody had changed it: refreshed
    assert found["create_pet"]["x-team"] == "pets"
    assert found["get_pet"]["endpoint"] == "/pets/{pet_id}"
    assert found["adopt"] == definition["actions"][-1]
    assert after[MARK]["source"] == "Petstore 1.1.0"

    text = file.read_text()
    again = import_openapi(spec, "petstore", catalog)  # the same document once more
    assert not again.changed and again.added == again.removed == again.updated == []
    assert file.read_text() == text


def test_check_changes_nothing_and_says_whether_an_import_would(spec, catalog):
    """`--check` writes nothing and exits 1 when the import would create or change the
    file, 0 when the file is up to date; --json says what would change."""
    args = ["catalog", "import-openapi", str(spec), "--app", "petstore", "--dir", str(catalog)]
    done = corral(*args, "--check", "--json")
    assert done.returncode == 1, done.stderr
    assert json.loads(done.stdout)["created"] is True
    assert not (catalog / "petstore").exists()
    done = corral(*args)
    assert done.returncode == 0, done.stderr
    assert "added: list_pets, create_pet, get_pets_pet_id, delete_pet" in done.stdout
    assert "note: createPet: query parameter 'dryRun' left out" in done.stdout
    assert corral(*args, "--check").returncode == 0
    write(spec, updated_petstore())
    before = (catalog / "petstore" / "connector.json").read_text()
    done = corral(*args, "--check", "--json")
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert (report["changed"], report["written"]) == (True, False)
    assert (report["added"], report["removed"]) == (["update_pet"], ["delete_pet"])
    assert (catalog / "petstore" / "connector.json").read_text() == before


class CountingHandler(http.server.BaseHTTPRequestHandler):
    hits: list[str]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_reference_outside_the_document_is_refused_never_fetched(tmp_path, catalog):
    """A `$ref` to another file or URL is refused with where it is; nothing is fetched."""
    hits: list[str] = []
    with serving(type("Handler", (CountingHandler,), {"hits": hits})) as server:
        document = copy.deepcopy(PETSTORE)
        ref = f"http://127.0.0.1:{server.server_address[1]}/pet.yaml"
        document["components"]["schemas"]["Pet"]["properties"]["owner"] = {"$ref": ref}
        with pytest.raises(CatalogError, match="points outside the document") as caught:
            import_openapi(write(tmp_path / "spec.yaml", document), "petstore", catalog)
    assert "$.components.schemas.Pet.properties.owner" in str(caught.value)
    assert hits == []
    assert not (catalog / "petstore").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("swagger: '2.0'\ninfo: {title: x, version: '1'}\npaths: {}\n", "only OpenAPI 3"),
        ("openapi: 3.0.3\ninfo: {title: x\n", "cannot be read as YAML"),
        ("- just\n- a list\n", "an OpenAPI document is an object"),
        (
            "openapi: 3.0.3\ninfo: {title: x, version: '1'}\npaths: {/a: {get: {responses: 5}}}\n",
            # jsonschema quotes 'object', jsonschema-rs (when installed) "object"
            re.compile(r"\$\.paths\['/a'\]\.get\.responses: 5 is not of type ['\"]object['\"]$"),
        ),
        (
            "openapi: 3.0.3\ninfo: {title: x, version: '1'}\npaths: {/a: {get: {responses: "
            "{'200': {description: ok}}, parameters: [{$ref: '#/components/parameters/Nope'}]}}}\n",
            "does not resolve",
        ),
    ],
    ids=["swagger-2", "bad-yaml", "not-an-object", "invalid", "dangling-ref"],
)
def test_a_bad_document_is_one_clear_error(tmp_path, catalog, text, message):
    """A document that is not valid OpenAPI 3 is refused with what is wrong and where."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(CatalogError) as caught:
        import_openapi(spec, "petstore", catalog)
    if isinstance(message, re.Pattern):
        assert message.search(str(caught.value)), str(caught.value)
    else:
        assert message in str(caught.value)
    assert str(spec) in str(caught.value)
    assert not (catalog / "petstore").exists()


def test_the_command_line_refuses_bad_input_with_exit_2(spec, catalog, tmp_path):
    """A missing document, a bad app id or a bad document exit 2 with one line on stderr."""
    base = ["catalog", "import-openapi"]
    for args, message in (
        ([str(tmp_path / "nope.yaml"), "--app", "petstore"], "cannot be read"),
        ([str(spec), "--app", "Pet Store"], "an app id is lower case"),
    ):
        done = corral(*base, *args, "--dir", str(catalog))
        assert done.returncode == 2
        assert message in done.stderr and done.stdout == ""
        assert len(done.stderr.strip().splitlines()) == 1


def test_yaml_is_read_as_json_would_be(tmp_path, catalog):
    """Unquoted dates stay the strings they were written as, response codes may be bare
    numbers, and an alias (which could stand for an endless tree) is refused with where."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "openapi: 3.0.3\ninfo: {title: Dates, version: '1'}\npaths:\n  /days:\n    get:\n"
        "      operationId: listDays\n      parameters:\n"
        "        - {name: since, in: query, schema: {type: string, default: 2024-12-31}}\n"
        "      responses: {200: {description: ok}}\n"
    )
    import_openapi(spec, "dates", catalog)
    definition = json.loads((catalog / "dates" / "connector.json").read_text())
    since = definition["actions"][0]["params"]["properties"]["since"]
    assert since == {"type": "string", "default": "2024-12-31"}
    spec.write_text("openapi: 3.0.3\ninfo: &info {title: x, version: '1'}\nx-again: *info\n")
    with pytest.raises(CatalogError, match=r"line 3, column 10: alias \*info is not supported"):
        import_openapi(spec, "dates", catalog)


def test_what_the_generic_path_cannot_send_is_left_out_with_a_note(tmp_path, catalog):
    """Object query parameters, a DELETE's body, an array body and an operation's own
    server are left out of the definition, each with a note; a nullable oneOf takes null."""
    document = copy.deepcopy(PETSTORE)
    pets = document["paths"]["/pets"]
    pets["get"]["parameters"].append(
        {"name": "filter", "in": "query", "style": "deepObject",
         "schema": {"type": "object", "properties": {"tag": {"type": "string"}}}}
    )  # fmt: skip
    pets["get"]["servers"] = [{"url": "https://search.petstore.example"}]
    pets["delete"] = {
        "operationId": "deletePets",
        "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": {"204": {"description": "gone"}},
    }
    pets["put"] = {
        "operationId": "replacePets",
        "requestBody": {"content": {"application/json": {"schema": {
            "type": "array", "items": {"$ref": "#/components/schemas/Pet"}}}}},
        "responses": {"200": {"description": "ok"}},
    }  # fmt: skip
    document["components"]["schemas"]["Pet"]["properties"]["owner"] = {
        "nullable": True, "oneOf": [{"type": "string"}, {"type": "integer"}],
    }  # fmt: skip
    report = import_openapi(write(tmp_path / "spec.yaml", document), "petstore", catalog)
    found = actions(imported(catalog))
    assert "filter" not in found["list_pets"]["params"]["properties"]
    assert found["delete_pets"]["params"]["properties"] == {}
    assert found["replace_pets"]["params"]["properties"] == {}
    notes = "\n".join(report.notes)
    for fragment in (
        "listPets: query parameter 'filter' left out",
        "listPets: its own server 'https://search.petstore.example' is not used",
        "deletePets: request body left out: the generic path sends a DELETE's params",
        "replacePets: request body left out: the generic path sends an object",
    ):
        assert fragment in notes
    framework = ConnectorFramework([catalog])
    create = framework.connector("petstore").operation("create_pet")
    create.validate({"name": "Rex", "owner": None})
    create.validate({"name": "Rex", "owner": 7})
    with pytest.raises(corral_api.InvalidInput):
        create.validate({"name": "Rex", "owner": 1.5})


def test_reimport_never_reuses_a_hand_made_id(spec, catalog):
    """An operation new in the document whose id a hand-made trigger already has gets an
    id of its own."""
    import_openapi(spec, "petstore", catalog)
    file = catalog / "petstore" / "connector.json"
    definition = json.loads(file.read_text())
    definition["triggers"] = [{"id": "update_pet", "method": "GET", "endpoint": "/pets"}]
    file.write_text(json.dumps(definition))
    report = import_openapi(write(spec, updated_petstore()), "petstore", catalog)
    assert report.added == ["update_pet_2"]
    assert problems(imported(catalog)) == []


def test_example_data_is_not_a_reference_and_keys_name_one_operation(tmp_path, catalog):
    """A `$ref` inside an example is data, not a reference; two operations the import
    would know by the same key are refused."""
    document = copy.deepcopy(PETSTORE)
    pet = document["components"]["schemas"]["Pet"]
    pet["example"] = {"link": {"$ref": "https://elsewhere.example/pet"}}
    import_openapi(write(tmp_path / "spec.yaml", document), "petstore", catalog)
    document["paths"]["/pets"]["post"]["operationId"] = "GET /pets/{pet-id}"
    with pytest.raises(CatalogError, match="names two operations"):
        import_openapi(write(tmp_path / "spec.yaml", document), "petstore", catalog)
