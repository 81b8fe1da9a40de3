"""`corral api` through a real uvicorn server on 127.0.0.1 (a `corral api` process), with
its inline worker, real sandboxes and a real HTTP service on 127.0.0.1 that the runs call."""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis
from conftest import free_port, private_redis, send_json, serving, stop

TOKEN = "api-token-for-tests-0123456789"
SECRET = "sk-live-connection-secret-4242"
START_PATIENCE_S = 30.0

CONNECTOR = {
    "id": "svc",
    "name": "Test service",
    "auth": {"type": "bearer"},
    "actions": [{"id": "call", "method": "GET", "endpoint": "/{path}", "fallback": None,
                 "params": {"type": "object", "required": ["path"],
                            "properties": {"path": {"type": "string"}}}}],
}  # fmt: skip

HANDLERS = """
def call(params, context):
    connection = context["connection"]
    token = connection["credentials"]["token"]
    log("calling", params["path"], "as", token)
    response = http.get(connection["baseUrl"] + "/" + params["path"],
                        headers={"Authorization": "Bearer " + token}, timeout=60)
    response.raise_for_status()
    return response.json()
"""


class _Service(http.server.BaseHTTPRequestHandler):
    """ok/*: 200. down/*: 500. block/*: held until `release`. Records (path, authorization)."""

    def do_GET(self) -> None:
        server = self.server
        path = self.path.lstrip("/")
        server.hits.append((path, self.headers.get("authorization")))  # type: ignore[attr-defined]
        if path.startswith("block/"):
            server.release.wait(30)  # type: ignore[attr-defined]
        status = 500 if path.startswith("down/") else 200
        send_json(self, {"path": path}, status)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[http.server.ThreadingHTTPServer]:
    """The service a test's runs call (through its stored connection); `.hits`, `.release`."""
    with serving(_Service) as server:
        server.hits = []  # type: ignore[attr-defined]
        server.release = threading.Event()  # type: ignore[attr-defined]
        try:
            yield server
        finally:
            server.release.set()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A catalog folder with the `svc` app."""
    folder = tmp_path_factory.mktemp("catalog") / "svc"
    folder.mkdir()
    (folder / "connector.json").write_text(json.dumps(CONNECTOR))
    (folder / "handlers.py").write_text(HANDLERS)
    return folder.parent


class Api:
    """A running `corral api` process: `.client` speaks to it, `.log()` is its stderr."""

    def __init__(self, process: subprocess.Popen[str], port: int, lines: list[str]) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.lines = lines
        self.client = httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {TOKEN}"}, timeout=30
        )

    def log(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _env(catalog: Path, state: Path, **extra: str) -> dict[str, str]:
    base = {name: value for name, value in os.environ.items()
            if not name.startswith(("SANDBOX_", "CORRAL_", "WORKER_SANDBOX", "GENERIC_",
                                    "ENABLE_INLINE"))}  # fmt: skip
    return {
        **base,
        "CORRAL_STATE_DIR": str(state),
        "CORRAL_CONNECTORS_DIR": str(catalog),
        "CORRAL_EGRESS_ALLOW": "127.0.0.1",
        "CORRAL_API_PORT": "0",
        "CORRAL_API_TOKEN": TOKEN,
        "CORRAL_WORKER_HEARTBEAT_S": "0.2",
        "CORRAL_LEASE_S": "2",
        "CORRAL_RETRY_MAX_ATTEMPTS": "1",
        "CORRAL_BREAKER_FAILURE_THRESHOLD": "2",
        "CORRAL_BREAKER_RESET_MS": "60000",
        "SANDBOX_EXECUTOR": "process",
        "SANDBOX_MAX_MEMORY_MB": "128",
        **extra,
    }


def start_api(env: dict[str, str]) -> Api:
    """`corral api` started and answering /healthz."""
    process = subprocess.Popen(
        [sys.executable, "-m", "corral", "api"], env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    found = threading.Event()
    port: list[int] = []

    def read() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                port.append(int(match.group(1)))
                found.set()
        found.set()

    threading.Thread(target=read, daemon=True).start()
    found.wait(START_PATIENCE_S)
    if not port:
        process.kill()
        process.wait()
        raise AssertionError(f"corral api did not start: {''.join(lines)}")
    api = Api(process, port[0], lines)
    deadline = time.monotonic() + START_PATIENCE_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if api.client.get("/healthz").status_code == 200:
                return api
        time.sleep(0.05)
    api.stop()
    raise AssertionError(f"corral api did not answer: {api.log()}")


@contextlib.contextmanager
def running_api(env: dict[str, str]) -> Iterator[Api]:
    """An API for the block; stopped with SIGTERM (exit 0), nothing of it left behind."""
    api = start_api(env)
    try:
        yield api
    finally:
        code = api.stop()
        left = [p for p in psutil.process_iter() if _session(p) == api.process.pid]
        assert not left, f"processes left behind: {left}"
    assert code == 0, api.log()


def _session(process: psutil.Process) -> int | None:
    with contextlib.suppress(psutil.Error, OSError):
        return os.getsid(process.pid)
    return None


@pytest.fixture(scope="module", params=["sqlite", "bullmq"])
def api(
    request: pytest.FixtureRequest, catalog: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    """One API with its inline worker, shared by the module's tests: on the embedded queue,
    and on BullMQ with the store on a freshly flushed database of conftest's Redis."""
    state = tmp_path_factory.mktemp("state")
    extra, url = {}, None
    if request.param == "bullmq":
        url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + "/4"
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()
        extra = {"CORRAL_REDIS_URL": url, "ENABLE_INLINE_WORKER": "true"}
    with running_api(_env(catalog, state, **extra)) as running:
        running.state = state  # type: ignore[attr-defined]
        running.redis_url = url  # type: ignore[attr-defined]
        yield running


def _base(service: http.server.ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{service.server_address[1]}"


def _workflow(workflow_id: str, *paths: str) -> dict[str, Any]:
    """Nodes n0, n1, … in a chain, each calling svc at one of `paths`."""
    nodes: list[dict[str, Any]] = []
    for index, path in enumerate(paths):
        node: dict[str, Any] = {"id": f"n{index}", "app": "svc", "function": "call",
                                "params": {"path": path}}  # fmt: skip
        if nodes:
            node["dependsOn"] = [nodes[-1]["id"]]
        nodes.append(node)
    return {"id": workflow_id, "nodes": nodes}


def _wait(check: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def _finished(api: Api, run_id: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = api.client.get(f"/api/runs/{run_id}").json()
        return run if run["status"] in ("succeeded", "failed", "cancelled") else None

    return _wait(check, f"run {run_id} finished")


def _connect(api: Api, service: http.server.ThreadingHTTPServer) -> httpx.Response:
    return api.client.put(
        "/api/connections/svc", json={"baseUrl": _base(service), "credentials": {"token": SECRET}}
    )


# -- the tests -----------------------------------------------------------------------------


def test_every_endpoint_but_healthz_wants_the_token(api: Api):
    """No token or a wrong one: 401 with a JSON error; /healthz answers anyone."""
    anonymous = httpx.Client(base_url=api.url, timeout=10)
    wrong = httpx.Client(base_url=api.url, timeout=10, headers={"authorization": "Bearer nope"})
    with anonymous, wrong:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        for client in (anonymous, wrong):
            for path in ("/openapi.json", "/api/runs", "/metrics", "/readyz"):
                answer = client.get(path)
                assert answer.status_code == 401, path
                assert answer.json()["error"]["type"] == "unauthorized"
                assert answer.headers["www-authenticate"] == "Bearer"
    assert api.client.get("/api/runs").status_code == 200


def test_the_openapi_document_lists_every_endpoint(api: Api):
    """/openapi.json is served and names each endpoint of DESIGN §10 with its models."""
    document = api.client.get("/openapi.json").json()
    paths = set(document["paths"])
    assert {
        "/api/sandbox/execute", "/api/connections/{app}", "/api/connections",
        "/api/workflows/{workflow_id}", "/api/workflows", "/api/workflows/{workflow_id}/runs",
        "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/cancel",
        "/api/runs/{run_id}/retry", "/api/breakers", "/api/breakers/{name}/reset",
        "/api/workers", "/api/registry/capabilities", "/healthz", "/readyz", "/metrics",
    } <= paths  # fmt: skip
    assert "RunView" in document["components"]["schemas"]


def test_sandbox_execute_answers_the_run_json_object(api: Api):
    """A good execution is ok with output, logs and usage; a failing one is ok: false with
    its error type; bad limits are a 422."""
    code = "def run(params, context):\n    log('doubling')\n    return params['n'] * 2\n"
    ok = api.client.post("/api/sandbox/execute", json={"code": code, "params": {"n": 21}})
    body = ok.json()
    assert ok.status_code == 200 and body["ok"] is True and body["output"] == 42
    assert body["logs"] == [{"level": "info", "message": "doubling"}]
    assert body["usage"]["wall_ms"] > 0 and body["executor"] == "process"
    failing = api.client.post(
        "/api/sandbox/execute", json={"code": "def run(params, context):\n    return 1 / 0\n"}
    ).json()
    assert (failing["ok"], failing["output"], failing["error"]["type"]) == (
        False,
        None,
        "code_error",
    )
    bad = api.client.post(
        "/api/sandbox/execute",
        json={"code": code, "limits": {"heartbeat_interval_ms": 100, "heartbeat_timeout_ms": 150}},
    )
    assert bad.status_code == 422 and bad.json()["error"]["type"] == "invalid_input"


def test_bad_requests_get_the_right_4xx_and_store_nothing(api: Api):
    """Malformed JSON 400, unknown ids 404, an invalid workflow 422, a taken run id 409;
    each with a JSON error, and no workflow stored half-way."""
    malformed = api.client.put(
        "/api/workflows/broken", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_json"
    for path in ("/api/runs/nope", "/api/workflows/nope"):
        answer = api.client.get(path)
        assert answer.status_code == 404 and answer.json()["error"]["type"] == "not_found"
    assert api.client.post("/api/runs/nope/cancel").status_code == 404
    assert api.client.post("/api/workflows/nope/runs", json={}).status_code == 404
    assert api.client.put("/api/connections/nope", json={}).status_code == 404
    invalid = api.client.put(
        "/api/workflows/broken",
        json={"id": "broken", "nodes": [{"id": "a", "app": "svc", "function": "nope"}]},
    )
    assert invalid.status_code == 422 and "nope" in invalid.json()["error"]["message"]
    cycle = api.client.put(
        "/api/workflows/broken",
        json={"nodes": [{"id": "a", "app": "svc", "function": "call", "params": {"path": "x"},
                         "dependsOn": ["a"]}]},
    )  # fmt: skip
    assert cycle.status_code == 422 and "cycle" in cycle.json()["error"]["message"]
    assert api.client.get("/api/workflows/broken").status_code == 404
    unknown = api.client.get("/api/runs", params={"status": "bogus"})
    assert unknown.status_code == 422 and unknown.json()["error"]["type"] == "invalid_input"
    ancient = api.client.get("/api/runs", params={"since": "-1.7976931348623155e+308"})
    assert ancient.status_code == 422 and ancient.json()["error"]["type"] == "invalid_input"


def test_an_oversized_body_is_413(catalog, tmp_path):
    """A body over CORRAL_API_MAX_BODY_BYTES is refused with 413 and nothing is stored."""
    env = _env(catalog, tmp_path / "state", CORRAL_API_MAX_BODY_BYTES="2000",
               ENABLE_INLINE_WORKER="false")  # fmt: skip
    with running_api(env) as small:
        big = {"id": "big", "nodes": [{"id": "a", "app": "svc", "function": "call",
                                       "params": {"path": "x" * 3000}}]}  # fmt: skip
        answer = small.client.put("/api/workflows/big", json=big)
        assert answer.status_code == 413
        assert answer.json()["error"]["type"] == "payload_too_large"
        assert "CORRAL_API_MAX_BODY_BYTES" in answer.json()["error"]["message"]
        assert small.client.get("/api/workflows/big").status_code == 404


def test_connections_keep_credentials_encrypted_and_never_show_them(api: Api, service):
    """A stored connection lists its credential names and key id, never the values; the
    state database and the API's log never hold the secret in clear."""
    stored = _connect(api, service)
    assert stored.status_code == 200
    view = stored.json()
    assert view["credential_names"] == ["token"] and view["key_id"] and SECRET not in stored.text
    listed = api.client.get("/api/connections")
    assert [c["app"] for c in listed.json()["connections"]] == ["svc"]
    assert SECRET not in listed.text
    assert SECRET.encode() not in _everything_stored(api)
    assert SECRET not in api.log()


def _everything_stored(api: Api) -> bytes:
    """Every byte of the API's state: its SQLite files, or every value on its Redis."""
    url = api.redis_url  # type: ignore[attr-defined]
    if url is None:
        files = sorted(api.state.glob("*.db*"))  # type: ignore[attr-defined]
        assert "records.db" in {p.name for p in files}
        return b"".join(p.read_bytes() for p in files)
    read = {
        b"string": lambda c, k: [c.get(k)],
        b"hash": lambda c, k: [v for pair in c.hgetall(k).items() for v in pair],
        b"list": lambda c, k: c.lrange(k, 0, -1),
        b"set": lambda c, k: list(c.smembers(k)),
        b"zset": lambda c, k: c.zrange(k, 0, -1),
        b"stream": lambda c, k: [repr(e).encode() for e in c.xrange(k)],
    }
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        values = [v for k in client.scan_iter() for v in read[client.type(k)](client, k)]
    assert any(b"key_id" in v for v in values)  # the stored connection is there
    return b"".join(values)


def test_a_stored_workflow_runs_with_the_stored_connection(api: Api, service):
    """PUT a workflow, POST a run: 202 with its id; the inline worker runs it with the
    decrypted connection; the run shows outputs, metadata and redacted logs."""
    _connect(api, service)
    assert (
        api.client.put("/api/workflows/wf", json=_workflow("wf", "ok/1", "ok/2")).status_code == 200
    )
    assert api.client.get("/api/workflows/wf").json()["nodes"][0]["params"] == {"path": "ok/1"}
    started = api.client.post("/api/workflows/wf/runs", json={"input": {}, "run_id": "run-1"})
    assert started.status_code == 202 and started.json() == {"run_id": "run-1", "status": "queued"}
    run = _finished(api, "run-1")
    assert run["status"] == "succeeded", run
    assert run["nodes"]["n1"]["output"] == {"path": "ok/2"}
    assert run["nodes"]["n0"]["metadata"]["executor"] == "bespoke"
    assert run["nodes"]["n0"]["logs"] == [
        {"level": "info", "message": "calling ok/1 as [redacted]"}
    ]
    assert run["nodes"]["n0"]["usage"]["cpu_ms"] >= 0
    assert ("ok/1", f"Bearer {SECRET}") in service.hits
    assert SECRET not in json.dumps(run)
    again = api.client.post("/api/workflows/wf/runs", json={"run_id": "run-1"})
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
    listed = {w["id"]: w for w in api.client.get("/api/workflows").json()["workflows"]}
    assert listed["wf"]["last_run"]["id"] == "run-1"


def test_runs_are_listed_newest_first_with_filters_and_a_cursor(api: Api, service):
    """GET /api/runs pages through runs newest first; filters by status and workflow."""
    _connect(api, service)
    api.client.put("/api/workflows/listed", json=_workflow("listed", "ok/l"))
    ids = [f"list-{n}" for n in range(5)]
    for run_id in ids:
        api.client.post("/api/workflows/listed/runs", json={"run_id": run_id})
    for run_id in ids:
        _finished(api, run_id)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"workflow": "listed", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = api.client.get("/api/runs", params=params).json()
        seen += [run["id"] for run in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    succeeded = api.client.get("/api/runs", params={"workflow": "listed", "status": "succeeded"})
    assert len(succeeded.json()["runs"]) == 5
    summary = succeeded.json()["runs"][0]
    assert summary["duration_s"] >= 0 and summary["error_type"] is None


def test_cancel_kills_a_running_run_and_retry_resumes_it(api: Api, service):
    """Cancel stops the node mid-call (200, cancelled); retry re-runs the same run id: the
    finished node replays, the cancelled one runs again."""
    _connect(api, service)
    api.client.put("/api/workflows/slow", json=_workflow("slow", "ok/s", "block/s"))
    api.client.post("/api/workflows/slow/runs", json={"run_id": "slow-1"})
    _wait(lambda: any(path == "block/s" for path, _ in service.hits), "the blocking node")
    cancelled = api.client.post("/api/runs/slow-1/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.client.post("/api/runs/slow-1/cancel").status_code == 409
    service.release.set()
    retried = api.client.post("/api/runs/slow-1/retry")
    assert retried.status_code == 202
    run = _finished(api, "slow-1")
    assert run["status"] == "succeeded" and run["attempts"] == 2
    assert run["nodes"]["n0"]["metadata"]["replayed"] is True
    assert api.client.post("/api/runs/slow-1/retry").status_code == 409


def test_get_run_with_wait_s_answers_once_the_run_finishes(api: Api, service):
    """GET /api/runs/ID?wait_s=N holds the answer until the run finishes (while its node
    blocks, it waits; released, it answers the finished run at once); a run that does not
    finish answers as it is after N seconds; a bad wait_s is 422."""
    _connect(api, service)
    api.client.put("/api/workflows/held", json=_workflow("held", "block/held"))
    api.client.post("/api/workflows/held/runs", json={"run_id": "held-1"})
    _wait(lambda: any(path == "block/held" for path, _ in service.hits), "the blocking node")
    started = time.monotonic()
    still = api.client.get("/api/runs/held-1", params={"wait_s": 0.5})
    assert still.status_code == 200 and still.json()["status"] == "running"
    assert time.monotonic() - started >= 0.5
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        waits = [
            pool.submit(api.client.get, "/api/runs/held-1", params={"wait_s": 20}) for _ in range(3)
        ]
        time.sleep(0.5)
        assert not any(w.done() for w in waits), "a wait answered before the run finished"
        released = time.monotonic()
        service.release.set()
        answers = [w.result(timeout=25) for w in waits]
    assert [a.json()["status"] for a in answers] == ["succeeded"] * 3
    assert time.monotonic() - released < 10
    finished = api.client.get("/api/runs/held-1", params={"wait_s": 20})
    assert finished.json()["status"] == "succeeded"
    for bad in ("-1", "31", "soon"):
        answer = api.client.get("/api/runs/held-1", params={"wait_s": bad})
        assert answer.status_code == 422 and answer.json()["error"]["type"] == "invalid_input"
    assert api.client.get("/api/runs/nope", params={"wait_s": 1}).status_code == 404


def test_start_run_with_wait_s_answers_the_finished_run(api: Api, service):
    """POST /api/workflows/ID/runs?wait_s=N queues the run and answers once it finished:
    200 with the run as GET gives it; a run still going after N seconds answers 202 with the
    run as it is; without wait_s the answer is the plain 202 {run_id, status}."""
    _connect(api, service)
    api.client.put("/api/workflows/quick", json=_workflow("quick", "ok/q"))
    done = api.client.post("/api/workflows/quick/runs", params={"wait_s": 20}, json={})
    assert done.status_code == 200, done.text
    body = done.json()
    assert body["status"] == "succeeded" and body["run"]["status"] == "succeeded"
    assert body["run"] == api.client.get(f"/api/runs/{body['run_id']}").json()
    plain = api.client.post("/api/workflows/quick/runs", json={})
    assert plain.status_code == 202 and set(plain.json()) == {"run_id", "status"}
    api.client.put("/api/workflows/held", json=_workflow("held", "block/held"))
    started = time.monotonic()
    held = api.client.post("/api/workflows/held/runs", params={"wait_s": 0.5}, json={})
    assert time.monotonic() - started >= 0.5
    assert held.status_code == 202 and held.json()["run"]["status"] in ("queued", "running")
    service.release.set()
    assert _finished(api, held.json()["run_id"])["status"] == "succeeded"
    answer = api.client.post("/api/workflows/quick/runs", params={"wait_s": "31"}, json={})
    assert answer.status_code == 422 and answer.json()["error"]["type"] == "invalid_input"


def test_breakers_are_listed_and_reset_by_hand(api: Api, service):
    """Failing calls open the node's breaker (threshold 2): it is listed open and in the
    metrics; a reset closes it."""
    _connect(api, service)
    api.client.put("/api/workflows/down", json=_workflow("down", "down/1"))
    for n in range(2):
        api.client.post("/api/workflows/down/runs", json={"run_id": f"down-{n}"})
        assert _finished(api, f"down-{n}")["status"] == "failed"
    listed = api.client.get("/api/breakers").json()["breakers"]
    assert [(b["state"], b["failures"]) for b in listed] == [("open", 2)]
    name = listed[0]["name"]
    assert name.startswith("svc/n0")
    assert f'corral_breaker_state{{breaker="{name}"}} 2.0' in api.client.get("/metrics").text
    reset = api.client.post(f"/api/breakers/{name}/reset")
    assert reset.status_code == 200 and reset.json()["state"] == "closed"
    assert api.client.get("/api/breakers").json()["breakers"] == []
    assert api.client.post(f"/api/breakers/{name}/reset").status_code == 404


def metric(text: str, sample: str) -> float:
    """The value of one sample (`name{labels}`, labels as Prometheus prints them) in a
    /metrics text; 0 when it is not there."""
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_workers_readiness_registry_and_metrics(api: Api, service):
    """The inline worker is listed fresh; /readyz passes every check; the registry is the
    capabilities map; /metrics has DESIGN's names and buckets and no run ids; a workflow
    node the worker runs counts as a sandbox execution, as an API execution does."""
    executions = 'corral_sandbox_executions_total{executor="process",outcome="ok"}'
    before = metric(api.client.get("/metrics").text, executions)
    _connect(api, service)
    api.client.put("/api/workflows/metered", json=_workflow("metered", "ok/m", "ok/n"))
    api.client.post("/api/workflows/metered/runs", json={"run_id": "metered-run-7"})
    assert _finished(api, "metered-run-7")["status"] == "succeeded"
    assert metric(api.client.get("/metrics").text, executions) == before + 2
    # A beat is fresh for 0.6 s here: looked at until it is (a loaded machine delays beats).
    workers = _wait(
        lambda: [w for w in api.client.get("/api/workers").json()["workers"] if w["fresh"]],
        "a fresh worker heartbeat",
    )
    assert len(workers) == 1 and workers[0]["pid"] > 0
    ready = _wait(
        lambda: (r := api.client.get("/readyz")).status_code == 200 and r, "/readyz ready"
    )
    assert ready.json()["ready"] is True
    assert ready.json()["checks"] == {"store": "ok", "keys": "ok", "queue": "ok", "worker": "ok"}
    assert ready.json()["deployment"].startswith(("sqlite:/", "redis://"))
    registry = api.client.get("/api/registry/capabilities").json()
    assert registry["svc"]["actions"]["call"]["executor"] == "bespoke"
    text = api.client.get("/metrics").text
    for name in (
        "corral_runs_total", "corral_run_duration_seconds_bucket", "corral_queue_jobs",
        "corral_run_queue_wait_seconds_bucket", "corral_lease_reclaims_total", "corral_workers",
        "corral_sandbox_executions_total",
    ):  # fmt: skip
        assert name in text, name
    assert 'corral_run_duration_seconds_bucket{le="1800.0"}' in text
    assert 'corral_run_duration_seconds_bucket{le="0.05"}' in text
    assert 'corral_runs_total{status="succeeded",workflow="metered"} 1.0' in text
    assert (
        'corral_node_duration_seconds_bucket{connector="svc",executor="bespoke",function="call",'
        'le="1800.0"' in text
    )
    assert "metered-run-7" not in text
    assert 'node="' not in text  # labelled by connector and function, never a node's id
    assert 'corral_node_attempts_total{connector="svc",function="call",outcome="ok"}' in text


def test_readiness_names_the_failing_checks(catalog, tmp_path):
    """Keys that cannot open the stored canary, and no worker: 503 naming both checks."""
    from cryptography.fernet import Fernet

    state = tmp_path / "state"
    first = _env(catalog, state, CORRAL_ENCRYPTION_KEYS=Fernet.generate_key().decode())
    with running_api(first) as api:
        assert api.client.get("/readyz").status_code == 200
    other = _env(catalog, state, CORRAL_ENCRYPTION_KEYS=Fernet.generate_key().decode(),
                 ENABLE_INLINE_WORKER="false")  # fmt: skip
    with running_api(other) as api:
        answer = api.client.get("/readyz")
        assert answer.status_code == 503
        checks = answer.json()["checks"]
        assert (checks["store"], checks["queue"]) == ("ok", "ok")
        assert "CORRAL_ENCRYPTION_KEYS" in checks["keys"]
        assert "corral worker" in checks["worker"]


def test_a_public_bind_without_a_token_is_refused(catalog, tmp_path):
    """CORRAL_API_HOST=0.0.0.0 without CORRAL_API_TOKEN: exit 2, one line naming both."""
    env = _env(catalog, tmp_path / "state", CORRAL_API_HOST="0.0.0.0")
    del env["CORRAL_API_TOKEN"]
    done = subprocess.run(
        [sys.executable, "-m", "corral", "api"], env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "CORRAL_API_HOST='0.0.0.0'" in done.stderr and "CORRAL_API_TOKEN" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@contextlib.contextmanager
def _api_on_private_redis(
    catalog: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Api, Callable[[], Any]]]:
    """A redis-server of the test's own, a ready API (inline worker) on it, and what starts
    that server again (on its port and data) once stopped."""
    port = free_port()
    data = tmp_path / "redis"
    data.mkdir()
    env = _env(catalog, tmp_path / "state", CORRAL_REDIS_URL=f"redis://127.0.0.1:{port}/0",
               ENABLE_INLINE_WORKER="true")  # fmt: skip
    with private_redis(data, port) as server, running_api(env) as api:
        _wait(lambda: api.client.get("/readyz").status_code == 200, "ready")
        yield server, api, lambda: private_redis(data, port)


def test_readiness_follows_redis_going_away_and_coming_back(catalog, tmp_path):
    """With the queue and store on Redis, /readyz is 503 naming the queue and the store
    while Redis is down, and ready again once it is back."""
    with _api_on_private_redis(catalog, tmp_path) as (server, api, again):
        stop(server)
        down = api.client.get("/readyz")
        assert down.status_code == 503
        checks = down.json()["checks"]
        assert "Redis at redis://127.0.0.1" in checks["queue"]
        assert "Redis at redis://127.0.0.1" in checks["store"]
        listing = api.client.get("/api/runs")
        assert listing.status_code == 503
        assert listing.json()["error"]["type"] == "unavailable"
        assert "Redis at redis://127.0.0.1" in listing.json()["error"]["message"]
        with again():
            _wait(lambda: api.client.get("/readyz").status_code == 200, "ready again")


def test_a_stopped_redis_fails_readiness_in_time_and_a_run_waits_for_it(catalog, tmp_path, service):
    """A Redis that holds its connections but answers nothing (SIGSTOP): /readyz answers
    503 within its check time-out, naming the store and the queue; a run started meanwhile
    waits, and finishes once Redis answers again (SIGCONT)."""
    with _api_on_private_redis(catalog, tmp_path) as (server, api, _):
        _connect(api, service)
        api.client.put("/api/workflows/paused", json=_workflow("paused", "ok/p"))
        server.send_signal(signal.SIGSTOP)
        try:
            began = time.monotonic()
            down = api.client.get("/readyz", timeout=30)
            took = time.monotonic() - began
            assert down.status_code == 503
            checks = down.json()["checks"]
            assert checks["store"] == checks["queue"] == "no answer within 5 s", checks
            assert 4.5 < took < 10, took  # the checks run side by side, 5 s each at most
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                started = pool.submit(
                    api.client.post, "/api/workflows/paused/runs", params={"wait_s": 30},
                    json={"run_id": "paused-1"}, timeout=60,
                )  # fmt: skip
                time.sleep(1)
                assert not started.done(), started.result().text
                server.send_signal(signal.SIGCONT)
                answer = started.result(timeout=45)
        finally:
            server.send_signal(signal.SIGCONT)
        assert answer.status_code == 200, answer.text
        assert answer.json()["run"]["status"] == "succeeded"
        _wait(lambda: api.client.get("/readyz").status_code == 200, "ready again")


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_or_schema_violation(catalog, tmp_path):
    """Property-based requests from the live /openapi.json (authenticated): no 500, no
    undocumented status, no response outside its schema."""
    schemathesis = Path(sys.executable).parent / "schemathesis"
    assert schemathesis.exists(), "schemathesis is missing: install corral's test extra"
    with running_api(_env(catalog, tmp_path / "state")) as api:
        done = subprocess.run(
            [str(schemathesis), "run", f"{api.url}/openapi.json",
             "-H", f"Authorization: Bearer {TOKEN}", "--seed", "1", "-w", "1",
             "--checks", "not_a_server_error,status_code_conformance,"
             "response_schema_conformance,content_type_conformance",
             "--phases", "coverage,fuzzing", "--max-examples", "25", "--max-time", "60"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,  # its cache goes there
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-6000:]


def test_a_workflow_with_a_bad_schedule_or_trigger_is_refused(api: Api):
    """A schedule the scheduler cannot fire, or a trigger that names an action: 422, and
    nothing stored; a good one is stored with them."""
    nodes = _workflow("timed", "ok/t")["nodes"]
    for extra in ({"schedule": {"cron": "every day"}},
                  {"trigger": {"app": "svc", "trigger": "call"}}):  # fmt: skip
        answer = api.client.put("/api/workflows/timed", json={"nodes": nodes, **extra})
        assert answer.status_code == 422, extra
        assert api.client.get("/api/workflows/timed").status_code == 404
    good = {"nodes": nodes, "schedule": {"cron": "*/15 * * * *", "timezone": "Europe/Paris"}}
    assert api.client.put("/api/workflows/timed", json=good).status_code == 200
    listed = {w["id"]: w for w in api.client.get("/api/workflows").json()["workflows"]}
    assert listed["timed"]["schedule"] == good["schedule"]
    assert api.client.delete("/api/workflows/timed").status_code == 204


def _sse(lines: Iterator[str]) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(id, event, data) of each server-sent event."""
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield int(fields["id"]), fields["event"], json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


def test_a_run_s_events_stream_as_it_runs_and_resume(api: Api, service):
    """GET /api/runs/ID/events streams the run's events while it runs (node started and
    finished, run finished) and ends after the last; Last-Event-ID resumes after one."""
    _connect(api, service)
    api.client.put("/api/workflows/streamed", json=_workflow("streamed", "ok/e", "block/e"))
    api.client.post("/api/workflows/streamed/runs", json={"run_id": "streamed-1"})
    seen: list[tuple[int, str, dict[str, Any]]] = []
    with api.client.stream("GET", "/api/runs/streamed-1/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for event in _sse(stream.iter_lines()):
            seen.append(event)
            if event[1] == "node.started" and event[2]["node"] == "n1":
                service.release.set()  # the stream was live while the run ran
    names = [(name, data.get("node")) for _, name, data in seen]
    assert names[0] == ("run.started", None)
    assert names.index(("node.started", "n0")) < names.index(("node.finished", "n0"))
    assert names.index(("node.finished", "n0")) < names.index(("node.started", "n1"))
    assert ("run.finished", None) in names
    assert [seq for seq, _, _ in seen] == list(range(1, len(seen) + 1))
    assert _finished(api, "streamed-1")["status"] == "succeeded"
    resumed = api.client.get("/api/runs/streamed-1/events", headers={"last-event-id": "2"})
    assert [seq for seq, _, _ in _sse(iter(resumed.text.splitlines()))] == [
        seq for seq, _, _ in seen if seq > 2
    ]
    assert api.client.get("/api/runs/nope/events").status_code == 404


def test_a_cancelled_run_s_live_stream_ends_with_its_finish(api: Api, service):
    """The live stream of a run cancelled mid-call ends with its `run.finished` (status
    cancelled): the worker writes that event with the cancelled record. Written after it,
    it came when the stream had already ended on the finished record (found by a review)."""
    _connect(api, service)
    api.client.put("/api/workflows/cut", json=_workflow("cut", "block/c"))
    api.client.post("/api/workflows/cut/runs", json={"run_id": "cut-1"})
    seen: list[tuple[int, str, dict[str, Any]]] = []
    with api.client.stream("GET", "/api/runs/cut-1/events") as stream:
        for event in _sse(stream.iter_lines()):
            seen.append(event)
            if event[1] == "node.started":
                assert api.client.post("/api/runs/cut-1/cancel").status_code == 200
    assert (seen[-1][1], seen[-1][2].get("status")) == ("run.finished", "cancelled"), seen
    assert [seq for seq, _, _ in seen] == list(range(1, len(seen) + 1))


def test_the_api_s_connections_do_not_wait_for_delayed_acks(clean_env):
    """Nagle's algorithm is off on every connection the API's socket accepts (asyncio does
    it only for a socket whose protocol says TCP): with it on, each answer after the first
    on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    import asyncio
    import socket

    from corral.config import load_settings
    from corral.service.api._serve import bind

    listener = bind(load_settings(CORRAL_API_HOST="127.0.0.1", CORRAL_API_PORT="0"))
    accepted: list[int] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                accepted.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Probe, sock=listener)
        try:
            port = listener.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if accepted:
                    break
                await asyncio.sleep(0.02)
            writer.close()
        finally:
            server.close()
            await server.wait_closed()

    try:
        asyncio.run(main())
    finally:
        listener.close()
    assert accepted and accepted[0] != 0
