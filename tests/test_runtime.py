"""WorkflowRuntime end to end: a catalog of the test's own, real sandbox executions, a real
HTTP server on 127.0.0.1 that fails on demand, and the real store (SQLite, and Redis)."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import serving

import corral
from corral import FLAGS, Limits, NodeSandbox
from corral.config import load_settings
from corral.executors import ConnectorFramework
from corral.runtime import RedisStore, SqliteStore, Store, WorkflowRuntime

TOKEN = "tok-runtime-5ecret-77"

CONNECTOR = {
    "id": "svc",
    "name": "Test service",
    "auth": {"type": "bearer"},
    "actions": [
        {"id": "call", "method": "GET", "endpoint": "/{path}", "fallback": "generic",
         "params": {"type": "object", "required": ["path"],
                    "properties": {"path": {"type": "string"}}}},
        {"id": "plain", "method": "GET", "endpoint": "/{path}", "fallback": None,
         "params": {"type": "object", "required": ["path"],
                    "properties": {"path": {"type": "string"}}}},
    ],
}  # fmt: skip

HANDLERS = """
def call(params, context):
    connection = context["connection"]
    token = connection["credentials"]["token"]
    log("calling", params["path"], "as", token)
    response = http.get(connection["baseUrl"] + "/" + params["path"],
                        headers={"Authorization": "Bearer " + token})
    response.raise_for_status()
    return response.json()
"""


class _Service(http.server.BaseHTTPRequestHandler):
    """ok/*: 200. flaky/*: two 503s, then 200. limited/*: a 429 (Retry-After: 1), then 200.
    down/*: always 500. missing/*: 404. Every hit is recorded with its time."""

    def do_GET(self) -> None:
        hits = self.server.hits  # type: ignore[attr-defined]
        path = self.path.lstrip("/")
        hits.append((path, time.monotonic(), self.headers.get("authorization")))
        count = sum(1 for hit in hits if hit[0] == path)
        kind = path.split("/")[0]
        status, extra = 200, {}
        if kind == "flaky" and count <= 2:
            status = 503
        elif kind == "limited" and count == 1:
            status, extra = 429, {"retry-after": "1"}
        elif kind == "down":
            status = 500
        elif kind == "missing":
            status = 404
        elif kind == "slow":
            time.sleep(0.5)
        body = json.dumps({"path": path, "hit": count}).encode()
        self.send_response(status)
        for name, value in {"content-type": "application/json", **extra}.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[http.server.ThreadingHTTPServer]:
    """The fail-on-demand server; `.hits` lists (path, time, authorization)."""
    with serving(_Service) as server:
        server.hits = []  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A catalog folder holding the `svc` app."""
    folder = tmp_path / "catalog" / "svc"
    folder.mkdir(parents=True)
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    return folder.parent


ENV = {
    "CORRAL_EGRESS_ALLOW": "127.0.0.1",
    "CORRAL_RETRY_INITIAL_MS": "20",
    "CORRAL_RETRY_MAX_MS": "1500",
    "CORRAL_BREAKER_FAILURE_THRESHOLD": "3",
    "CORRAL_BREAKER_RESET_MS": "700",
}


@pytest.fixture
def sandbox() -> Iterator[NodeSandbox]:
    """A process-backend sandbox whose egress policy allows 127.0.0.1."""
    with NodeSandbox(
        executor="process", limits=Limits(max_memory_mb=64), settings=load_settings(**ENV)
    ) as box:
        yield box


@pytest.fixture(params=["sqlite", "redis"])
def store_spec(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """Where the runtime's store lives: a SQLite state dir, or the session's Redis."""
    if request.param == "sqlite":
        return {"CORRAL_STATE_DIR": str(tmp_path / "state")}
    return {"CORRAL_REDIS_URL": request.getfixturevalue("redis_url"), "prefix": tmp_path.name}


def _store(spec: dict[str, str]) -> Store:
    if "CORRAL_REDIS_URL" in spec:
        return RedisStore(spec["CORRAL_REDIS_URL"], prefix=f"test:{spec['prefix']}:")
    Path(spec["CORRAL_STATE_DIR"]).mkdir(parents=True, exist_ok=True)
    return SqliteStore(Path(spec["CORRAL_STATE_DIR"]) / "corral.db")


def _run(
    catalog: Path,
    sandbox: NodeSandbox,
    spec: dict[str, str],
    workflow: dict[str, Any],
    *,
    connections: dict[str, Any] | None = None,
    env: dict[str, str] = ENV,
    **kwargs: Any,
) -> corral.runtime.WorkflowRun:
    async def go() -> corral.runtime.WorkflowRun:
        runtime = WorkflowRuntime(
            load_settings(**env), framework=ConnectorFramework([catalog]),
            store=_store(spec), sandbox=sandbox,
        )  # fmt: skip
        async with runtime:
            return await runtime.run_workflow(workflow, connections=connections, **kwargs)

    return asyncio.run(go())


def _connections(service: http.server.ThreadingHTTPServer) -> dict[str, Any]:
    base = f"http://127.0.0.1:{service.server_address[1]}"
    return {"svc": {"baseUrl": base, "credentials": {"token": TOKEN}}}


def _one(path: str, function: str = "call", **node: Any) -> dict[str, Any]:
    return {"id": "wf", "nodes": [{"id": "n", "app": "svc", "function": function,
                                   "params": {"path": path}, **node}]}  # fmt: skip


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "corral.events"]
    return [record for record in records if record["event"] == f"corral.{name}"]


def test_a_flaky_node_is_retried_with_bounded_backoff(catalog, sandbox, service, caplog):
    """Two 503s then a 200: three attempts, each failed one a JSON event with its delay."""
    caplog.set_level(logging.INFO, logger="corral.events")
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    run = _run(catalog, sandbox, spec, _one("flaky/1"), connections=_connections(service))
    node = run.nodes["n"]
    assert run.status == "succeeded" and node.output == {"path": "flaky/1", "hit": 3}
    meta = node.metadata
    assert (meta["attempts"], meta["executor"], meta["replayed"]) == (3, "bespoke", False)
    assert meta["circuit_state"] == "closed" and meta["idempotency_key"]
    failed = _events(caplog, "node.attempt_failed")
    assert [e["attempt"] for e in failed] == [1, 2]
    assert all(e["error_type"] == "http_error" and e["status"] == 503 for e in failed)
    delays = [e["next_delay_s"] for e in failed]
    assert all(0 <= d <= 0.04 for d in delays)  # full jitter under 20 ms, then 40 ms


def test_retry_after_is_honoured(catalog, sandbox, service):
    """A 429 with Retry-After: 1 is retried no sooner than a second later."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    run = _run(catalog, sandbox, spec, _one("limited/1"), connections=_connections(service))
    assert run.status == "succeeded" and run.nodes["n"].metadata["attempts"] == 2
    first, second = (hit[1] for hit in service.hits)
    assert second - first >= 1.0


@pytest.mark.parametrize(("path", "attempts"), [("missing/1", 1), ("down/1", 3)])
def test_failures_are_retried_only_when_worth_it(catalog, sandbox, service, path, attempts):
    """A 404 is not retried; a 500 is, up to max_attempts; the error carries the status."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    run = _run(catalog, sandbox, spec, _one(path), connections=_connections(service))
    node = run.nodes["n"]
    assert run.status == "failed" and node.metadata["attempts"] == attempts
    assert node.error["type"] == "http_error" and node.error["status"] in (404, 500)
    assert len(service.hits) == attempts


def test_a_finished_run_replays_without_touching_the_server(catalog, sandbox, service, store_spec):
    """Re-running the same run id replays its nodes from the store: no request is sent."""
    connections = _connections(service)
    first = _run(catalog, sandbox, store_spec, _one("ok/1"), connections=connections, run_id="r1")
    again = _run(catalog, sandbox, store_spec, _one("ok/1"), connections=connections, run_id="r1")
    assert len(service.hits) == 1
    assert again.nodes["n"].output == first.nodes["n"].output
    assert again.nodes["n"].metadata["replayed"] is True
    assert again.nodes["n"].metadata["attempts"] == 0


def test_the_same_run_with_other_params_is_a_conflict(catalog, sandbox, service, store_spec):
    """The node's key with different params: idempotency_conflict, and nothing is sent."""
    connections = _connections(service)
    _run(catalog, sandbox, store_spec, _one("ok/1"), connections=connections, run_id="r2")
    other = _run(catalog, sandbox, store_spec, _one("ok/2"), connections=connections, run_id="r2")
    assert other.nodes["n"].error["type"] == "idempotency_conflict"
    assert [hit[0] for hit in service.hits] == ["ok/1"]


_OTHER_PROCESS = r"""
import asyncio, json, sys
from pathlib import Path
from corral import Limits, NodeSandbox
from corral.config import load_settings
from corral.executors import ConnectorFramework
from corral.runtime import WorkflowRuntime
spec, catalog, workflow, connections, env = (json.loads(arg) for arg in sys.argv[1:])
async def main():
    settings = load_settings(**env, **{k: v for k, v in spec.items() if k != "prefix"})
    from corral.runtime import RedisStore, SqliteStore
    if "CORRAL_REDIS_URL" in spec:
        store = RedisStore(spec["CORRAL_REDIS_URL"], prefix="test:" + spec["prefix"] + ":")
    else:
        store = SqliteStore(Path(spec["CORRAL_STATE_DIR"]) / "corral.db")
    with NodeSandbox(limits=Limits(max_memory_mb=64), settings=settings) as sandbox:
        runtime = WorkflowRuntime(settings, framework=ConnectorFramework([Path(catalog)]),
                                  store=store, sandbox=sandbox)
        async with runtime:
            run = await runtime.run_workflow(workflow, connections=connections)
    print(json.dumps(run.to_dict()))
asyncio.run(main())
"""


def test_a_key_in_flight_is_not_run_twice(catalog, sandbox, service):
    """Two runs of the same run id at once: one runs the node, the other waits for it and
    replays its result; the server sees one request."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}

    async def both() -> list[corral.runtime.WorkflowRun]:
        runtime = WorkflowRuntime(
            load_settings(**ENV), framework=ConnectorFramework([catalog]),
            store=_store(spec), sandbox=sandbox,
        )  # fmt: skip
        async with runtime:
            return list(await asyncio.gather(*(
                runtime.run_workflow(_one("slow/1"), connections=_connections(service),
                                     run_id="same")
                for _ in range(2)
            )))  # fmt: skip

    runs = asyncio.run(both())
    assert [hit[0] for hit in service.hits] == ["slow/1"]
    assert sorted(run.nodes["n"].metadata["replayed"] for run in runs) == [False, True]
    assert runs[0].nodes["n"].output == runs[1].nodes["n"].output


def test_the_offline_example_runs(tmp_path):
    """examples/workflow/run_offline.py succeeds on its own local server, with a retry."""
    example = Path(__file__).parents[1] / "examples" / "workflow" / "run_offline.py"
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CORRAL_STATE_DIR": str(tmp_path / "state")},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert run["status"] == "succeeded"
    assert run["nodes"]["notify"]["metadata"]["attempts"] == 2


def test_the_breaker_is_shared_across_processes(catalog, sandbox, service, store_spec):
    """Another process fails a node three times: its breaker opens for everyone, so this
    process fails fast without a request; after the reset time one probe goes through."""
    # A reset long enough for the other process to exit and this one to start its runtime
    # while the breaker is still open, on a slow machine too.
    env = {**ENV, "CORRAL_BREAKER_RESET_MS": "3000"}
    connections = _connections(service)
    Path(store_spec.get("CORRAL_STATE_DIR", catalog)).mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-c", _OTHER_PROCESS, json.dumps(store_spec), json.dumps(str(catalog)),
         json.dumps(_one("down/1")), json.dumps(connections), json.dumps(env)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    theirs = json.loads(done.stdout)["nodes"]["n"]
    assert theirs["metadata"]["attempts"] == 3 and theirs["metadata"]["circuit_state"] == "open"
    assert len(service.hits) == 3
    ours = _run(catalog, sandbox, store_spec, _one("down/1"), connections=connections, env=env)
    node = ours.nodes["n"]
    assert node.error["type"] == "circuit_open" and node.metadata["circuit_state"] == "open"
    assert len(service.hits) == 3  # failed fast: nothing sent
    time.sleep(3.1)  # past CORRAL_BREAKER_RESET_MS since it opened: half-open, one probe
    probe = _run(catalog, sandbox, store_spec, _one("down/1"), connections=connections, env=env)
    assert len(service.hits) == 4
    assert probe.nodes["n"].metadata["circuit_state"] == "open"  # the probe failed: open again
    other = _one("ok/9")
    other["nodes"][0]["id"] = "other"
    healthy = _run(catalog, sandbox, store_spec, other, connections=connections, env=env)
    assert healthy.status == "succeeded"  # another node's breaker is its own


def test_fallback_only_under_the_flag_with_its_reason(catalog, sandbox, service):
    """A function with no bespoke handler is not_supported with the flag off, and runs on
    the generic path with it on, its reason in the metadata."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    connections = _connections(service)
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=False):
        off = _run(catalog, sandbox, spec, _one("ok-3", "plain"), connections=connections)
    assert off.nodes["n"].error["type"] == "not_supported" and service.hits == []
    with FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        on = _run(catalog, sandbox, spec, _one("ok-3", "plain"), connections=connections)
    meta = on.nodes["n"].metadata
    assert (meta["executor"], meta["fallback_reason"]) == ("generic", "no bespoke handler")
    assert on.nodes["n"].output["data"] == {"path": "ok-3", "hit": 1}
    assert service.hits[0][2] == f"Bearer {TOKEN}"  # the generic path applied the auth


def test_credentials_never_reach_output_or_logs(catalog, sandbox, service, caplog):
    """The handler logs its token and the server echoes paths: the token appears in no
    output, no event line, no error."""
    caplog.set_level(logging.INFO, logger="corral.events")
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    workflow = {
        "id": "wf",
        "nodes": [
            {"id": "a", "app": "svc", "function": "call", "params": {"path": f"ok/{TOKEN}"}},
            {"id": "b", "app": "svc", "function": "call", "params": {"path": "missing/x"}},
        ],
    }
    run = _run(catalog, sandbox, spec, workflow, connections=_connections(service))
    shown = json.dumps(run.to_dict()) + "\n".join(r.getMessage() for r in caplog.records)
    assert TOKEN not in shown and "[redacted]" in shown


def test_nodes_run_in_order_and_a_failure_stops_its_dependants(catalog, sandbox, service):
    """Templates pass outputs along; the dependants of a failed node do not run."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    workflow = {"id": "wf", "nodes": [
        {"id": "first", "app": "svc", "function": "call", "params": {"path": "{{ input.p }}"}},
        {"id": "second", "app": "svc", "function": "call", "dependsOn": ["first"],
         "params": {"path": "ok/after-{{ nodes.first.output.hit }}"}},
        {"id": "broken", "app": "svc", "function": "call", "params": {"path": "missing/1"}},
        {"id": "never", "app": "svc", "function": "call", "dependsOn": ["broken"],
         "params": {"path": "ok/never"}}]}  # fmt: skip
    run = _run(catalog, sandbox, spec, workflow, connections=_connections(service),
               input={"p": "ok/start"})  # fmt: skip
    assert run.nodes["second"].output == {"path": "ok/after-1", "hit": 1}
    never = run.nodes["never"]
    assert never.status == "skipped" and "broken" in never.error["message"]
    assert "ok/never" not in [hit[0] for hit in service.hits]
    assert run.status == "failed"


@pytest.mark.parametrize(
    ("workflow", "expected"),
    [
        ({"id": "wf", "nodes": [{"id": "n", "app": "nope", "function": "call"}]}, "unknown app"),
        ({"id": "wf", "nodes": [{"id": "n", "app": "svc", "function": "nope"}]}, "'nope'"),
        ({"id": "wf", "nodes": [
            {"id": "a", "app": "svc", "function": "call", "params": {"path": "ok"},
             "dependsOn": ["b"]},
            {"id": "b", "app": "svc", "function": "call", "params": {"path": "ok"},
             "dependsOn": ["a"]}]}, "cycle"),
        ({"id": "wf", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                 "params": {"path": "{{ nodes.ghost.output.x }}"}}]}, "ghost"),
        ({"id": "wf", "nodes": [
            {"id": "a", "app": "svc", "function": "call", "params": {"path": "ok"}},
            {"id": "b", "app": "svc", "function": "call",
             "params": {"path": "{{ nodes.a.output.path }}"}}]}, "add 'a' to its dependsOn"),
        ({"id": "wf", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                 "params": {"path": "{{ input.missing }}"}}]}, "'missing'"),
        ({"id": "wf", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                 "retry": {"max_attempt": 2}, "params": {"path": "ok"}}]},
         "max_attempt"),
        ({"id": "wf", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                 "retry": {"backoff_coefficient": 1e300},
                                 "params": {"path": "ok"}}]},
         "backoff_coefficient"),
        ({"id": "wf", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                 "retry": {"max_interval_ms": float("nan")},
                                 "params": {"path": "ok"}}]}, "max_interval_ms"),
        ({"id": "wf", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                 "timeout_ms": 10**12, "params": {"path": "ok"}}]}, "timeout_ms"),
    ],
    ids=["unknown-app", "unknown-function", "cycle", "missing-node", "not-a-dependency",
         "missing-input", "bad-retry", "huge-coefficient", "nan-interval", "huge-timeout"],
)  # fmt: skip
def test_bad_workflows_name_the_culprit_and_run_nothing(catalog, sandbox, service, workflow,
                                                         expected):  # fmt: skip
    """Each is an InvalidInput naming what is wrong, raised before any node runs."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    with pytest.raises(corral.InvalidInput, match=expected):
        _run(catalog, sandbox, spec, workflow, connections=_connections(service))
    assert service.hits == []


def test_checking_a_hostile_workflow_stays_fast(catalog, sandbox):
    """Unclosed template openers and long runs of spaces cost linear time to check."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    workflow = {"id": "wf", "nodes": [{"id": "n", "app": "svc", "function": "call",
                                       "params": {"path": "{{" + " " * 20_000 + "x"}}]}  # fmt: skip
    runtime = WorkflowRuntime(load_settings(**ENV), framework=ConnectorFramework([catalog]),
                              store=_store(spec), sandbox=sandbox)  # fmt: skip
    started = time.monotonic()
    runtime.check(workflow, {})
    assert time.monotonic() - started < 0.5
    asyncio.run(runtime.aclose())


def test_another_connection_never_gets_a_replay(catalog, sandbox, service, store_spec):
    """The same run id called with other credentials or another baseUrl is a conflict, never
    a replay of the first caller's result."""
    mine = _connections(service)
    _run(catalog, sandbox, store_spec, _one("ok/7"), connections=mine, run_id="shared")
    theirs = {"svc": {**mine["svc"], "credentials": {"token": "someone-else-entirely"}}}
    other = _run(catalog, sandbox, store_spec, _one("ok/7"), connections=theirs, run_id="shared")
    assert other.nodes["n"].output is None
    assert other.nodes["n"].error["type"] == "idempotency_conflict"


def test_the_callers_own_failures_do_not_open_the_breaker(catalog, sandbox, service):
    """4xx answers (and the code's own errors) say nothing of the upstream's health."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    for _ in range(4):  # past the threshold of 3
        run = _run(catalog, sandbox, spec, _one("missing/b"), connections=_connections(service))
        assert run.nodes["n"].error["type"] == "http_error"
    assert run.nodes["n"].metadata["circuit_state"] == "closed"


def test_params_failing_the_schema_fail_the_node_before_any_request(catalog, sandbox, service):
    """The contract is checked before anything runs: invalid_input, not retried."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    workflow = {"id": "wf", "nodes": [{"id": "n", "app": "svc", "function": "call",
                                       "params": {"path": 7}}]}  # fmt: skip
    run = _run(catalog, sandbox, spec, workflow, connections=_connections(service))
    node = run.nodes["n"]
    assert node.error["type"] == "invalid_input" and "'path'" in node.error["message"]
    assert node.metadata["attempts"] == 1 and service.hits == []


def test_the_workflow_command(catalog, service, tmp_path):
    """`corral workflow run --json`: exit 0 and the run object; 1 for a failed run; 2 for a
    workflow that names an unknown app (one line on stderr)."""
    env = {**ENV, "CORRAL_CONNECTORS_DIR": str(catalog), "CORRAL_STATE_DIR": str(tmp_path / "s"),
           "PATH": "/usr/bin:/bin"}  # fmt: skip
    connections = json.dumps(_connections(service))

    def corral_cli(workflow: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "workflow.json"
        path.write_text(json.dumps(workflow))
        return subprocess.run(
            [sys.executable, "-m", "corral", "workflow", "run", str(path), "--json",
             "--connections", connections],
            capture_output=True, text=True, timeout=60, env=env,
        )  # fmt: skip

    ok = corral_cli(_one("ok/cli"))
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["nodes"]["n"]["output"] == {"path": "ok/cli", "hit": 1}
    failed = corral_cli(_one("missing/cli"))
    assert failed.returncode == 1 and json.loads(failed.stdout)["status"] == "failed"
    bad = corral_cli({"id": "wf", "nodes": [{"id": "n", "app": "nope", "function": "x"}]})
    assert bad.returncode == 2
    assert json.loads(bad.stdout)["error"]["type"] == "invalid_input"  # one object, as ever
    assert len(bad.stderr.strip().splitlines()) == 1 and "unknown app 'nope'" in bad.stderr


@pytest.mark.parametrize(
    ("connections", "expected"),
    [
        ({"svc": {"baseUrl": "http://127.0.0.1:9"}},
         r"the svc connection needs credentials.token or credentials.access_token or "
         r"credentials.api_key \(bearer auth\)"),
        ({"svc": {"credentials": {"token": ""}}}, "the svc connection needs credentials.token"),
        (None, "the svc connection needs credentials.token"),
        ({"svc": {"credentials": {"token": TOKEN}}, "svcc": {}},
         "no node of workflow 'wf' uses the app 'svcc'; it uses svc"),
    ],
    ids=["no-credentials", "empty-token", "no-connection", "unused-app"],
)  # fmt: skip
def test_connections_are_checked_before_anything_runs(catalog, sandbox, service, connections,
                                                      expected):  # fmt: skip
    """Credentials a node's app needs (its definition's auth) and a connection for an app no
    node uses are InvalidInput before any request, naming what to fix."""
    spec = {"CORRAL_STATE_DIR": str(catalog.parent / "state")}
    with pytest.raises(corral.InvalidInput, match=expected):
        _run(catalog, sandbox, spec, _one("ok/1"), connections=connections)
    assert service.hits == []
