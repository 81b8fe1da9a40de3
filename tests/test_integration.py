"""IntegrationManager on a catalog of the test's own: the params contract, the bespoke
handler, and the generic fallback (only under the flag, only before any request)."""

from __future__ import annotations

import asyncio
import http.server
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import send_json, serving

import corral
import corral.executors
from corral import FLAGS, Limits, NodeSandbox
from corral.config import load_settings
from corral.executors import ConnectorFramework, IntegrationManager

DEFINITION = {
    "id": "demo",
    "auth": {"type": "bearer"},
    "actions": [
        {"id": name, "method": "GET", "endpoint": "/items/{item}",
         "params": {"type": "object", "required": ["item"],
                    "properties": {"item": {"type": "integer"}}}}
        for name in ("todo", "todo_after_request", "broken")
    ] + [{"id": "dots", "method": "GET", "endpoint": "/items/{item}/x",
          "params": {"type": "object", "required": ["item"],
                     "properties": {"item": {"type": "string"}}}}],
}  # fmt: skip
HANDLERS = """
def todo(params, context):
    raise NotImplementedError("Function todo is not implemented yet")


def todo_after_request(params, context):
    http.get(context["connection"]["baseUrl"] + "/items/0")
    raise NotImplementedError("Function todo_after_request is half done")


def broken(params, context):
    raise ValueError("the item does not exist")  # the handler's own failure
"""


class _Api(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        send_json(self, {"path": self.path})

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[http.server.ThreadingHTTPServer]:
    """The API on 127.0.0.1; `.paths` lists what it served."""
    with serving(_Api) as server:
        server.paths = []  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[IntegrationManager]:
    folder = tmp_path / "demo"
    folder.mkdir()
    (folder / "connector.json").write_text(json.dumps(DEFINITION))
    (folder / "handlers.py").write_text(HANDLERS)
    settings = load_settings(CORRAL_EGRESS_ALLOW="127.0.0.1")
    with NodeSandbox(limits=Limits(max_memory_mb=64), settings=settings) as sandbox:
        yield IntegrationManager(ConnectorFramework([tmp_path]), sandbox)


def _call(manager: IntegrationManager, api: Any, function: str, params: Any) -> Any:
    connection = {"baseUrl": f"http://127.0.0.1:{api.server_address[1]}",
                  "credentials": {"token": "tok-integration-1"}}  # fmt: skip
    return asyncio.run(manager.execute("Demo", function, params, connection))


def test_not_implemented_falls_back_only_under_the_flag(manager, api):
    """Flag off: the handler's error unchanged. Flag on: the generic path, reason recorded."""
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=False), pytest.raises(corral.CodeError):
        _call(manager, api, "todo", {"item": 7})
    assert api.paths == []
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        result = _call(manager, api, "todo", {"item": 7})
    assert result.executor == "generic" and "not implemented" in result.fallback_reason
    assert result.output["data"] == {"path": "/items/7"} and api.paths == ["/items/7"]


def test_no_fallback_once_the_handler_sent_a_request(manager, api):
    """A handler that sent a request before giving up is not repeated by the generic path."""
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True), pytest.raises(corral.CodeError):
        _call(manager, api, "todo_after_request", {"item": 7})
    assert api.paths == ["/items/0"]


def test_other_failures_never_fall_back(manager, api):
    """A handler's own error (not "not implemented") surfaces unchanged under the flag."""
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True), pytest.raises(corral.CodeError):
        _call(manager, api, "broken", {"item": 7})
    assert api.paths == []


@pytest.mark.parametrize(
    ("app", "function", "params", "expected"),
    [("nope", "todo", {"item": 1}, "unknown app"),
     ("demo", "nope", {"item": 1}, "no action or trigger 'nope'"),
     ("demo", "todo", {"item": "x"}, "params\\['item'\\]")],
)  # fmt: skip
def test_bad_calls_are_invalid_input_before_anything_runs(manager, api, app, function, params,
                                                           expected):  # fmt: skip
    """Unknown app or function, params against the contract: named, nothing sent."""
    with pytest.raises(corral.InvalidInput, match=expected):
        asyncio.run(manager.execute(app, function, params))
    assert api.paths == []


def test_a_contract_never_reaches_outside_its_definition(tmp_path):
    """A params schema whose $ref names a file or a URL is refused when the catalog loads:
    validating params never makes the host read a file or open a connection."""
    folder = tmp_path / "leaky"
    folder.mkdir()
    definition = {
        "id": "leaky",
        "actions": [
            {
                "id": "run",
                "params": {"type": "object", "properties": {"q": {"$ref": "file:///etc/passwd"}}},
            }
        ],
    }
    (folder / "connector.json").write_text(json.dumps(definition))
    with pytest.raises(corral.executors.CatalogError, match="points outside"):
        ConnectorFramework([tmp_path])


def test_dot_segments_in_path_params_stay_inside_the_endpoint(manager, api):
    """A path param of '..' is sent encoded: the generic path cannot climb the URL."""
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        asyncio.run(
            manager.execute(
                "demo",
                "dots",
                {"item": ".."},
                {
                    "baseUrl": f"http://127.0.0.1:{api.server_address[1]}/api",
                    "credentials": {"token": "tok-integration-1"},
                },
            )
        )
    assert api.paths == ["/api/items/%2E%2E/x"]
