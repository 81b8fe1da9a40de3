"""Catalog tooling (DESIGN §5, §8, §9): `corral catalog validate`, the committed JSON Schema,
the backfills that edit definitions in place, and the registry with the generic path on and
off. Temporary catalogs under tmp_path; the shipped catalog only read."""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import corral

from corral.config import Flags
from corral.executors import (
    SHIPPED_CATALOG,
    CatalogError,
    ConnectorFramework,
    backfill,
    check_catalog,
    json_schema,
    load_connector,
    problems,
)
from corral.executors._backfill import ACTION_DEFAULTS, TRIGGER_DEFAULTS, fill_missing
from corral.runtime import capabilities

SCHEMA_FILE = SHIPPED_CATALOG / "schema.json"
CURSOR_DEDUPE = {"strategy": "cursor", "cursor": "$.updated_at", "key": "$.id"}

# A valid app: a bespoke-only action, an action with a handler and HTTP metadata, a generic
# one, and a generic trigger.
VALID: dict[str, Any] = {
    "id": "demo",
    "name": "Demo",
    "baseUrl": "https://api.example.com",
    "auth": {"type": "bearer"},
    "actions": [
        {"id": "compute", "runtimes": ["python"], "fallback": None},
        {"id": "create_thing", "method": "POST", "endpoint": "/things",
         "params": {"type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}}},
         "runtimes": ["python"], "fallback": "generic"},
        {"id": "get_thing", "method": "GET", "endpoint": "/things/{thing_id}",
         "params": {"type": "object", "required": ["thing_id"],
                    "properties": {"thing_id": {"type": "string"}}},
         "runtimes": ["python"], "fallback": None},
    ],
    "triggers": [
        {"id": "new_thing", "method": "GET", "endpoint": "/things",
         "runtimes": ["python"], "fallback": None, "dedupe": CURSOR_DEDUPE},
    ],
}  # fmt: skip
HANDLERS = """\
def compute(params, context):
    return {"answer": 42}


def create_thing(params, context):
    return http.post(context["connection"]["baseUrl"] + "/things", json=params).json()
"""


def _app(
    catalog: Path, folder: str, definition: dict[str, Any] | str, handlers: str | None = None
) -> Path:
    """Write app `folder` of `catalog` (a dict pretty-printed, a str as is); its folder."""
    path = catalog / folder
    path.mkdir(parents=True, exist_ok=True)
    text = definition if isinstance(definition, str) else json.dumps(definition, indent=2)
    (path / "connector.json").write_text(text, encoding="utf-8")
    if handlers is not None:
        (path / "handlers.py").write_text(handlers, encoding="utf-8")
    return path


def _flags(generic: bool) -> Flags:
    flags = Flags()
    flags.GENERIC_EXECUTOR_ENABLED = generic
    return flags


# -- validate ----------------------------------------------------------------------------


def test_a_valid_catalog_passes(tmp_path):
    """A catalog with nothing wrong: no problems, and `corral catalog validate` exits 0."""
    _app(tmp_path, "demo", VALID, HANDLERS)
    assert problems(VALID) == []
    assert check_catalog([tmp_path]) == (1, [])
    done = corral("catalog", "validate", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"1 app checked in {tmp_path}: all valid"


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A case that rewrites demo's connector.json after `change`."""

    def apply(app: Path) -> None:
        definition = copy.deepcopy(VALID)
        change(definition)
        (app / "connector.json").write_text(json.dumps(definition, indent=2))

    return apply


def _set(where: Callable[[dict[str, Any]], dict[str, Any]], key: str, value: Any):
    return _edit(lambda d: where(d).__setitem__(key, value))


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda app: (app / name).write_text(text)


PROBLEM_CASES = {
    "unknown key (typo)": (
        _set(lambda d: d["actions"][0], "endpiont", "/compute"),
        "connector.json", "$.actions[0]", "unknown key 'endpiont'",
    ),
    "bad method": (
        _set(lambda d: d["actions"][1], "method", "FETCH"),
        "connector.json", "$.actions[1].method", "must be 'GET', 'POST'",
    ),
    "placeholder not required": (
        _set(lambda d: d["actions"][2], "endpoint", "/things/{thing_id}/{part}"),
        "connector.json", "$.actions[2]", "{part} must be a required param",
    ),
    "bad JSONPath in dedupe": (
        _set(lambda d: d["triggers"][0]["dedupe"], "cursor", "$.["),
        "connector.json", "$.triggers[0].dedupe.cursor", "'$.[' is not a JSONPath",
    ),
    "dedupe key not a JSONPath": (
        _set(lambda d: d["triggers"][0]["dedupe"], "key", "id"),
        "connector.json", "$.triggers[0].dedupe.key", "must start with '$'",
    ),
    "invalid JSON": (
        _write("connector.json", '{"id": "demo", "actions": [\n'),
        "connector.json", "$", "cannot be read as JSON",
    ),
    "id differs from the folder": (
        _set(lambda d: d, "id", "other"),
        "connector.json", "$.id", "'other' differs from its folder's name 'demo'",
    ),
    "handlers.py breaks the sandbox policy": (
        _write("handlers.py", HANDLERS.replace('return {"answer": 42}', "params.__class__ = 1")),
        "handlers.py", "$", 'policy_violation: Line 2: "__class__" cannot be assigned',
    ),
    "handlers.py imports what the sandbox refuses": (
        _write("handlers.py", "from os import path\nimport json, urllib.parse\n" + HANDLERS),
        "handlers.py", "line 1", "imports 'os.path', which connector code may not import",
    ),
    "handlers.py imports a name its module's view does not show": (
        _write("handlers.py", "import json\nfrom functools import update_wrapper\n" + HANDLERS),
        "handlers.py", "line 2", "imports 'functools.update_wrapper', which connector code may not",
    ),
    "a params $ref that does not resolve": (
        _set(lambda d: d["actions"][1]["params"]["properties"], "tag",
             {"$ref": "#/$defs/Tag"}),
        "connector.json", "$.actions[1].params", "$ref '#/$defs/Tag' does not resolve",
    ),
    "handlers.py is not Python": (
        _write("handlers.py", "def compute(params, context)\n    return 1\n"),
        "handlers.py", "$", "line 1",
    ),
    "nothing can run an action": (
        _write("handlers.py", HANDLERS.replace("def compute", "def computed")),
        "connector.json", "$.actions[0]", "nothing can run 'compute'",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(PROBLEM_CASES))
def test_each_problem_is_reported_with_its_file_and_path(tmp_path, case):
    """Each kind of problem is reported once, naming the file and where in it (a JSONPath
    for connector.json) with a message that says what is wrong."""
    change, file, path, fragment = PROBLEM_CASES[case]
    change(_app(tmp_path, "demo", VALID, HANDLERS))
    count, found = check_catalog([tmp_path])
    assert count == 1
    assert len(found) == 1, [str(p) for p in found]
    problem = found[0]
    assert problem.file == tmp_path / "demo" / file
    if path is not None:
        assert problem.path == path
    assert fragment in problem.message, problem.message
    assert str(problem).startswith(f"{tmp_path / 'demo' / file}: ")


def test_the_loader_refuses_an_invalid_definition_naming_file_and_path(tmp_path):
    """Loading an invalid definition fails with the file, the JSONPath and a pointer to
    `corral catalog validate` when there are more problems."""
    definition = copy.deepcopy(VALID)
    definition["actions"][0]["endpiont"] = "/compute"
    definition["actions"][1]["method"] = "FETCH"
    app = _app(tmp_path, "demo", definition, HANDLERS)
    with pytest.raises(CatalogError) as caught:
        load_connector(app)
    message = str(caught.value)
    assert f"{app / 'connector.json'}: $.actions[0]: unknown key 'endpiont'" in message
    assert "and 1 more: run `corral catalog validate`" in message


def test_the_loader_refuses_an_app_in_a_folder_of_another_name(tmp_path):
    """A definition whose id is not its folder's name does not load: a stale copy in
    `github-old` must not stand in for `github`."""
    definition = copy.deepcopy(VALID)
    app = _app(tmp_path, "demo-old", definition, HANDLERS)
    with pytest.raises(CatalogError, match="'demo' differs from its folder's name 'demo-old'"):
        load_connector(app)


def test_a_catalog_folder_without_apps_is_refused(tmp_path):
    """`--dir` naming a folder with no app (or an app's own folder) exits 2 saying so,
    rather than passing every check on nothing."""
    app = _app(tmp_path, "demo", VALID, HANDLERS)
    for folder, hint in ((app, f"pass the catalog, {tmp_path}"), (tmp_path / "empty", None)):
        folder.mkdir(exist_ok=True)
        for command in ("validate", "backfill-actions"):
            done = corral("catalog", command, "--dir", str(folder))
            assert done.returncode == 2 and done.stdout == ""
            assert f"{folder} holds no app" in done.stderr
            assert hint is None or hint in done.stderr


def test_extension_keys_pass_validation(tmp_path):
    """Keys starting with x- are extensions: validate and the exported schema accept them."""
    definition = copy.deepcopy(VALID)
    definition["x-owner"] = "team-a"
    definition["actions"][1]["x-note"] = {"anything": [1, 2]}
    _app(tmp_path, "demo", definition, HANDLERS)
    assert check_catalog([tmp_path]) == (1, [])
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    assert list(validator.iter_errors(definition)) == []


def test_validate_reports_every_problem_in_every_file(tmp_path):
    """Several problems in several files are all reported in one run, human and --json,
    and the command exits 1."""
    _app(tmp_path, "demo", VALID, HANDLERS)  # valid: reported as checked, no problem
    two = copy.deepcopy(VALID)
    two["id"] = "alpha"
    two["actions"][0]["endpiont"] = "/compute"
    two["actions"][1]["method"] = "FETCH"
    _app(tmp_path, "alpha", two, HANDLERS)
    _app(tmp_path, "beta", "{not json")
    other = copy.deepcopy(VALID)
    other["id"] = "gamma-x"
    _app(tmp_path, "gamma", other, HANDLERS)
    expected = [
        (tmp_path / "alpha" / "connector.json", "$.actions[0]", "unknown key 'endpiont'"),
        (tmp_path / "alpha" / "connector.json", "$.actions[1].method", "must be 'GET'"),
        (tmp_path / "beta" / "connector.json", "$", "cannot be read as JSON"),
        (tmp_path / "gamma" / "connector.json", "$.id", "differs from its folder's name"),
    ]

    human = corral("catalog", "validate", "--dir", str(tmp_path))
    assert human.returncode == 1, human.stderr
    lines = human.stdout.splitlines()
    assert len(lines) == len(expected) + 1, human.stdout
    for line, (file, path, fragment) in zip(lines, expected, strict=False):
        assert line.startswith(f"{file}: {path}: "), line
        assert fragment in line, line
    assert lines[-1] == f"4 apps checked in {tmp_path}: 4 problems in 3 apps"

    as_json = corral("catalog", "validate", "--dir", str(tmp_path), "--json")
    assert as_json.returncode == 1, as_json.stderr
    document = json.loads(as_json.stdout)
    assert list(document) == ["ok", "apps", "problems"]
    assert document["ok"] is False and document["apps"] == 4
    assert [list(p) for p in document["problems"]] == [["file", "path", "message"]] * 4
    assert [(Path(p["file"]), p["path"]) for p in document["problems"]] == [
        (file, path) for file, path, _ in expected
    ]
    for problem, (_, _, fragment) in zip(document["problems"], expected, strict=True):
        assert fragment in problem["message"]


@pytest.mark.parametrize("kind", ["missing", "a file"])
def test_a_dir_that_is_not_a_folder_is_a_usage_error(tmp_path, kind):
    """`--dir` naming no folder: exit 2, one line on stderr naming it, nothing on stdout."""
    target = tmp_path / "nowhere"
    if kind == "a file":
        target = _app(tmp_path, "demo", VALID) / "connector.json"
    done = corral("catalog", "validate", "--dir", str(target))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [f"corral catalog: {target} is not a folder"]


# -- the schema --------------------------------------------------------------------------


def test_the_committed_schema_is_the_models_export():
    """corral/connectors/schema.json is exactly what `json_schema()` and `corral catalog schema`
    give, so the committed export cannot drift from the models (regenerate with
    `corral catalog schema > corral/connectors/schema.json`)."""
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert json.loads(committed) == json_schema()
    done = corral("catalog", "schema")
    assert done.returncode == 0, done.stderr
    assert done.stdout == committed


def test_shipped_definitions_validate_against_the_exported_schema():
    """Every shipped connector.json validates against corral/connectors/schema.json with
    jsonschema, and the exported schema still rejects a typo and a bad method."""
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    files = sorted(SHIPPED_CATALOG.glob("*/connector.json"))
    assert len(files) >= 5
    for file in files:
        errors = [error.message for error in validator.iter_errors(json.loads(file.read_text()))]
        assert errors == [], f"{file}: {errors}"
    assert list(validator.iter_errors(VALID)) == []
    for key, value in (("endpiont", "/compute"), ("method", "FETCH")):
        broken = copy.deepcopy(VALID)
        broken["actions"][1][key] = value
        assert list(validator.iter_errors(broken)), key


def test_validate_and_the_exported_schema_agree_on_a_lower_case_method():
    """`corral catalog validate` and corral/connectors/schema.json give the same verdict on a
    lower-case method."""
    definition = copy.deepcopy(VALID)
    definition["actions"][1]["method"] = "post"
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    assert (problems(definition) == []) == validator.is_valid(definition)


# -- backfills ---------------------------------------------------------------------------

# Definitions lacking the keys the backfills add, next to keys an author set.
BARE: dict[str, Any] = {
    "id": "demo",
    "name": "Demo",
    "actions": [
        {"id": "compute"},
        {"id": "create_thing", "method": "POST", "endpoint": "/things",
         "params": {"type": "object", "properties": {"name": {"type": "string"}}},
         "fallback": "generic"},
        {"id": "get_thing", "runtimes": ["python"], "method": "GET", "endpoint": "/things"},
    ],
    "triggers": [
        {"id": "new_thing", "method": "GET", "endpoint": "/things"},
        {"id": "new_event", "method": "GET", "endpoint": "/events", "fallback": "generic",
         "dedupe": {"strategy": "key", "key": "$.uid"}},
        {"id": "done", "runtimes": ["python"], "fallback": None, "dedupe": CURSOR_DEDUPE},
    ],
}  # fmt: skip
BARE_HANDLERS = "def compute(params, context):\n    return 1\n\n\ndef done(params, context):\n" \
    "    return []\n\n\ndef create_thing(params, context):\n    return 1\n\n\n" \
    "def new_event(params, context):\n    return []\n"  # fmt: skip
# What each backfill must add, by function id.
EXPECTED = {
    "backfill-actions": ("actions", {
        "compute": ACTION_DEFAULTS,
        "create_thing": {"runtimes": ["python"]},
        "get_thing": {"fallback": None},
    }),
    "seed-trigger-fallbacks": ("triggers", {
        "new_thing": TRIGGER_DEFAULTS,
        "new_event": {"runtimes": ["python"]},
    }),
}  # fmt: skip
STYLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "pretty": lambda d: json.dumps(d, indent=2) + "\n",
    "tabs": lambda d: json.dumps(d, indent="\t") + "\n",
    "crlf": lambda d: json.dumps(d, indent=2).replace("\n", "\r\n") + "\r\n",
    "compact": lambda d: json.dumps(d, separators=(",", ":")),
    "one-function-a-line": lambda d: "{\n" + ",\n".join(
        f"  {json.dumps(key)}: " + (
            "[\n" + ",\n".join(f"    {json.dumps(item)}" for item in value) + "\n  ]"
            if isinstance(value, list) else json.dumps(value)
        ) for key, value in d.items()
    ) + "\n}\n",
}  # fmt: skip


def test_the_backfill_defaults_are_the_contracts():
    """The defaults are exactly DESIGN §5's: actions get runtimes ["python"] and fallback
    null; triggers also get a cursor dedupe on $.updated_at keyed by $.id."""
    assert ACTION_DEFAULTS == {"runtimes": ["python"], "fallback": None}
    assert TRIGGER_DEFAULTS == {
        "runtimes": ["python"],
        "fallback": None,
        "dedupe": {"strategy": "cursor", "cursor": "$.updated_at", "key": "$.id"},
    }


def _inserted(before: str, after: str) -> list[str]:
    """The pieces `after` adds to `before`; fails when anything was removed or replaced."""
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    pieces = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        assert tag in ("equal", "insert"), (tag, before[i1:i2], after[j1:j2])
        if tag == "insert":
            pieces.append(after[j1:j2])
    return pieces


@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("name", list(EXPECTED))
def test_a_backfill_only_adds_the_missing_members(tmp_path, name, style):
    """Each backfill adds exactly the missing defaults at the end of each function, leaves
    set values (a generic fallback, a custom dedupe) and key order alone, keeps the file's
    layout (the diff is only added members), and a second run changes nothing."""
    kind, expected = EXPECTED[name]
    before = STYLES[style](BARE)
    app = _app(tmp_path, "demo", before, BARE_HANDLERS)
    file = app / "connector.json"

    additions = backfill([tmp_path], name)
    after = file.read_bytes().decode()  # read_text would fold \r\n
    assert [(a.file, a.kind, a.operation, a.added) for a in additions] == [
        (file, kind, operation, added) for operation, added in expected.items()
    ]

    # The meaning: every function gains the missing defaults after its own keys, in order.
    wanted = copy.deepcopy(BARE)
    for item in wanted[kind]:
        item.update(copy.deepcopy(expected.get(item["id"], {})))
    document = json.loads(after)
    assert document == wanted
    for got, want in zip(document[kind], wanted[kind], strict=True):
        assert list(got) == list(want), got["id"]
    other = "triggers" if kind == "actions" else "actions"
    assert document[other] == BARE[other]
    assert check_catalog([tmp_path]) == (1, [])

    # The text: nothing removed or rewritten, one piece per function, each only members
    # in the file's own style.
    pieces = _inserted(before, after)
    assert len(pieces) == len(expected)
    multi_line = style in ("pretty", "tabs", "crlf")
    newline = "\r\n" if style == "crlf" else "\n"
    for piece, added in zip(pieces, expected.values(), strict=True):
        assert piece.startswith("," + newline if multi_line else ","), repr(piece)
        assert (newline in piece) is multi_line, repr(piece)
        assert json.loads("{" + piece[1:] + "}") == added
        if multi_line:  # one member a line, at the indentation of the object's members
            lines = piece[1:].split(newline)[1:]
            assert len(lines) == len(added)
            indent = {line[: len(line) - len(line.lstrip())] for line in lines}
            assert indent == ({"\t\t\t"} if style == "tabs" else {"      "}), indent
    line_diff = [
        line for line in difflib.ndiff(before.splitlines(), after.splitlines())
        if line[:1] in "+-"
    ]  # fmt: skip
    removed = [line[2:] for line in line_diff if line.startswith("-")]
    added_lines = [line[2:] for line in line_diff if line.startswith("+")]
    if multi_line:  # a line changes only by the comma a new member after it needs
        assert len(removed) == len(expected)
        for line in removed:
            assert line + "," in added_lines
        assert len(added_lines) == len(removed) + sum(map(len, expected.values()))
    else:
        assert len(removed) == len(added_lines) == (1 if style == "compact" else len(expected))

    # Repeatable: the second run finds nothing and does not even rewrite the file.
    inode = file.stat().st_ino
    assert backfill([tmp_path], name) == []
    assert file.read_bytes().decode() == after
    assert file.stat().st_ino == inode
    assert not list(app.glob(".*corral-tmp"))


def test_an_empty_function_object_gets_the_defaults_inline(tmp_path):
    """`{}` (no members at all) gets the defaults inside its braces."""
    text = '{"id": "demo", "actions": [{}]}'
    updated, additions = fill_missing(text, "actions", ACTION_DEFAULTS, file=tmp_path / "f")
    assert updated == '{"id": "demo", "actions": [{"runtimes": ["python"], "fallback": null}]}'
    assert [a.operation for a in additions] == ["#0"]


@pytest.mark.parametrize("key", ["x-a/b", "x-c~d", "x-caf\\u00e9", 'x-\\"quoted\\"'])
def test_a_function_with_any_extension_key_can_be_backfilled(tmp_path, key):
    """A valid extension key (a '/' or '~' in it, an escape in its source text) does not
    stop the backfill."""
    text = f'{{"id": "demo", "actions": [{{"id": "a", "{key}": 1}}]}}'
    assert problems(json.loads(text)) == []
    updated, _ = fill_missing(text, "actions", ACTION_DEFAULTS, file=tmp_path / "f")
    assert updated == text[:-3] + ', "runtimes": ["python"], "fallback": null}]}'


def test_a_key_written_with_escapes_is_a_clear_error(tmp_path):
    """A definition whose "actions" key is spelled with an escape cannot be edited as text:
    one clear error, the file untouched."""
    text = '{"id": "demo", "\\u0061ctions": [{"id": "a", "method": "GET", "endpoint": "/a"}]}'
    file = _app(tmp_path, "demo", text) / "connector.json"
    with pytest.raises(CatalogError, match="write the key 'actions' without escape"):
        backfill([tmp_path], "backfill-actions")
    assert file.read_text() == text


def test_a_backfill_writes_through_a_symlink_and_keeps_the_mode(tmp_path):
    """A symlinked definition is updated where it lives, with its permissions."""
    real = tmp_path / "shared" / "demo.json"
    real.parent.mkdir()
    real.write_text(json.dumps({"id": "demo", "actions": [
        {"id": "a", "method": "GET", "endpoint": "/a"}]}))  # fmt: skip
    real.chmod(0o640)
    app = tmp_path / "catalog" / "demo"
    app.mkdir(parents=True)
    (app / "connector.json").symlink_to(real)
    assert len(backfill([tmp_path / "catalog"], "backfill-actions")) == 1
    assert (app / "connector.json").is_symlink()
    assert json.loads(real.read_text())["actions"][0]["fallback"] is None
    assert real.stat().st_mode & 0o777 == 0o640


def test_backfill_commands_report_check_and_write(tmp_path):
    """`--check` exits 1 and leaves the file byte-identical while listing what it would add
    (human and --json); a real run lists what it added; then `--check` exits 0."""
    before = STYLES["pretty"](BARE)
    file = _app(tmp_path, "demo", before, BARE_HANDLERS) / "connector.json"
    command = ("catalog", "backfill-actions", "--dir", str(tmp_path))

    check = corral(*command, "--check")
    assert check.returncode == 1, check.stderr
    assert file.read_text() == before
    lines = check.stdout.splitlines()
    assert lines[-1] == "backfill-actions: would add defaults to 3 actions in 1 file"
    assert [line.split()[:2] for line in lines[:-1]] == [
        [str(file), "actions.compute"], [str(file), "actions.create_thing"],
        [str(file), "actions.get_thing"],
    ]  # fmt: skip
    assert lines[0].endswith("+ runtimes, fallback") and lines[2].endswith("+ fallback")

    check_json = corral(*command, "--check", "--json")
    assert check_json.returncode == 1, check_json.stderr
    assert file.read_text() == before
    assert json.loads(check_json.stdout) == {
        "changed": True, "written": False,
        "additions": [
            {"file": str(file), "kind": "actions", "operation": operation, "added": added}
            for operation, added in EXPECTED["backfill-actions"][1].items()
        ],
    }  # fmt: skip

    run = corral(*command)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "backfill-actions: added defaults to 3 actions in 1 file"
    assert "actions.get_thing" in run.stdout
    assert file.read_text() != before

    again = corral(*command, "--check")
    assert (again.returncode, again.stdout) == (0, "backfill-actions: nothing to add\n")


def test_seed_trigger_fallbacks_command_writes_and_reports(tmp_path):
    """`corral catalog seed-trigger-fallbacks --json` writes the trigger defaults and
    reports them; actions are not its business."""
    file = _app(tmp_path, "demo", BARE, BARE_HANDLERS) / "connector.json"
    done = corral("catalog", "seed-trigger-fallbacks", "--dir", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["changed"] is True and report["written"] is True
    assert [(a["operation"], a["added"]) for a in report["additions"]] == [
        ("new_thing", TRIGGER_DEFAULTS), ("new_event", {"runtimes": ["python"]}),
    ]  # fmt: skip
    document = json.loads(file.read_text())
    assert document["triggers"][0]["dedupe"] == CURSOR_DEDUPE
    assert document["triggers"][1]["dedupe"] == {"strategy": "key", "key": "$.uid"}
    assert document["actions"] == BARE["actions"]


def test_a_definition_that_is_not_json_is_a_clear_error(tmp_path):
    """A backfill over a definition that is not JSON stops with one line naming the file,
    exit 2, no traceback, and writes nothing."""
    broken = _app(tmp_path, "broken", '{"id": "broken", "actions": [{"id": "a"}')
    good = _app(tmp_path, "demo", BARE)
    good_text = (good / "connector.json").read_text()
    with pytest.raises(CatalogError, match="cannot be read as JSON"):
        backfill([tmp_path], "backfill-actions")
    done = corral("catalog", "backfill-actions", "--dir", str(tmp_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith(f"corral: {broken / 'connector.json'}: cannot be read as JSON")
    assert (good / "connector.json").read_text() == good_text


# -- the shipped catalog ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["validate"], ["backfill-actions", "--check"], ["seed-trigger-fallbacks", "--check"]],
)
def test_the_shipped_catalog_is_valid_and_backfilled(command):
    """The shipped catalog passes validate and both backfills' --check (CI holds it there)."""
    done = corral("catalog", *command, "--dir", str(SHIPPED_CATALOG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_shipped_catalog_has_no_problem_and_nothing_to_fill():
    """In process: no problem in any shipped app and no default missing anywhere."""
    count, found = check_catalog([SHIPPED_CATALOG])
    assert count >= 5 and found == []
    for name in EXPECTED:
        assert backfill([SHIPPED_CATALOG], name, write=False) == []


# -- the registry --------------------------------------------------------------------------

# An app with no handlers.py at all: only the generic path can run it.
BARE_APP: dict[str, Any] = {
    "id": "bare",
    "name": "Bare app",
    "baseUrl": "https://bare.example.com",
    "actions": [
        {"id": "list_things", "method": "GET", "endpoint": "/things",
         "runtimes": ["python"], "fallback": None},
    ],
    "triggers": [
        {"id": "new_thing", "method": "GET", "endpoint": "/things", "runtimes": ["python"],
         "fallback": None, "dedupe": CURSOR_DEDUPE},
    ],
}  # fmt: skip
PY = ["python"]
SLACK_FLAG_OFF = {
    "actions": {
        "post_message": {"runtimes": PY, "executor": "bespoke", "fallback": None},
        "update_message": {"runtimes": PY, "executor": "bespoke", "fallback": None},
    },
    "triggers": {},
}
SLACK_FLAG_ON = {
    "actions": {
        "post_message": {"runtimes": PY, "executor": "bespoke", "fallback": "generic"},
        "update_message": {"runtimes": PY, "executor": "bespoke", "fallback": "generic"},
        "list_channels": {"runtimes": PY, "executor": "generic", "fallback": None},
    },
    "triggers": {},
}
BARE_FLAG_ON = {
    "actions": {"list_things": {"runtimes": PY, "executor": "generic", "fallback": None}},
    "triggers": {"new_thing": {"runtimes": PY, "executor": "generic", "fallback": None}},
}


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A catalog folder with `bare` (no handlers) and `demo` (some handlers)."""
    folder = tmp_path / "catalog"
    _app(folder, "bare", BARE_APP)
    _app(folder, "demo", VALID, HANDLERS)
    return folder


def test_registry_with_the_flag_off_lists_only_bespoke_functions(catalog):
    """Flag off: only functions with a bespoke handler, with no fallback; Slack exactly as
    the original system pinned it; an app without any handler is absent."""
    registry = capabilities(ConnectorFramework([catalog, SHIPPED_CATALOG]), flags=_flags(False))
    assert registry["slack"] == SLACK_FLAG_OFF
    assert "bare" not in registry
    assert registry["demo"] == {
        "actions": {
            "compute": {"runtimes": PY, "executor": "bespoke", "fallback": None},
            "create_thing": {"runtimes": PY, "executor": "bespoke", "fallback": None},
        },
        "triggers": {},
    }
    assert "new_issue" not in registry["github"]["triggers"]  # a generic-only trigger
    for app, kinds in registry.items():
        for kind, functions in kinds.items():
            for function, entry in functions.items():
                assert (entry["executor"], entry["fallback"]) == ("bespoke", None), (
                    app, kind, function,
                )  # fmt: skip


def test_registry_with_the_flag_on_adds_every_http_function(catalog):
    """Flag on: every action and trigger with method and endpoint is listed; those with a
    handler run bespoke with the generic fallback, the others generic; functions without
    HTTP metadata stay bespoke only; apps sorted, functions in definition order."""
    framework = ConnectorFramework([catalog, SHIPPED_CATALOG])
    registry = capabilities(framework, flags=_flags(True))
    assert registry["slack"] == SLACK_FLAG_ON
    assert registry["bare"] == BARE_FLAG_ON
    assert registry["demo"] == {
        "actions": {
            "compute": {"runtimes": PY, "executor": "bespoke", "fallback": None},
            "create_thing": {"runtimes": PY, "executor": "bespoke", "fallback": "generic"},
            "get_thing": {"runtimes": PY, "executor": "generic", "fallback": None},
        },
        "triggers": {"new_thing": {"runtimes": PY, "executor": "generic", "fallback": None}},
    }
    assert list(registry) == sorted(framework.apps())
    for app in framework.apps():  # the rule, over the whole catalog
        connector = framework.connector(app)
        for kind, operations in (("actions", connector.actions),
                                 ("triggers", connector.triggers)):  # fmt: skip
            assert list(registry[app][kind]) == list(operations)
            for function, operation in operations.items():
                entry = registry[app][kind][function]
                bespoke = connector.handler(function) is not None
                http = bool(operation.method and operation.endpoint)
                assert entry["executor"] == ("bespoke" if bespoke else "generic")
                assert entry["fallback"] == ("generic" if bespoke and http else None)


def test_registry_command_json_follows_the_flag(catalog):
    """`corral registry --json` prints the capabilities map for the catalog in use
    (CORRAL_CONNECTORS_DIR first), with GENERIC_EXECUTOR_ENABLED deciding what is in it."""
    framework = ConnectorFramework([catalog, SHIPPED_CATALOG])
    for generic in (False, True):
        env = {"CORRAL_CONNECTORS_DIR": str(catalog),
               "GENERIC_EXECUTOR_ENABLED": "true" if generic else "false"}  # fmt: skip
        done = corral("registry", "--json", env=env)
        assert done.returncode == 0, done.stderr
        registry = json.loads(done.stdout)
        assert registry == capabilities(framework, flags=_flags(generic))
        assert registry["slack"] == (SLACK_FLAG_ON if generic else SLACK_FLAG_OFF)
        assert ("bare" in registry) is generic


def test_registry_command_prints_a_table_per_app(catalog):
    """`corral registry` without --json: a summary line, then per app its name and an
    aligned table of kind, function, executor, fallback and runtimes."""
    env = {"CORRAL_CONNECTORS_DIR": str(catalog), "GENERIC_EXECUTOR_ENABLED": "true"}
    done = corral("registry", env=env)
    assert done.returncode == 0, done.stderr
    blocks = done.stdout.strip().split("\n\n")
    registry = capabilities(ConnectorFramework([catalog, SHIPPED_CATALOG]), flags=_flags(True))
    count = sum(len(functions) for kinds in registry.values() for functions in kinds.values())
    assert blocks[0] == (
        f"{count} functions in {len(registry)} apps can run (generic HTTP path on)"
    )
    tables = {block.splitlines()[0]: block.splitlines()[1:] for block in blocks[1:]}
    assert tables["bare (Bare app)"] == [
        "  kind     function     executor  fallback  runtimes",
        "  action   list_things  generic   -         python",
        "  trigger  new_thing    generic   -         python",
    ]
    assert [row.split() for row in tables["slack (Slack)"][1:]] == [
        ["action", "post_message", "bespoke", "generic", "python"],
        ["action", "update_message", "bespoke", "generic", "python"],
        ["action", "list_channels", "generic", "-", "python"],
    ]
    assert len(tables) == len(registry)
