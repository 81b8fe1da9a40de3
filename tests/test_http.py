"""The `http` capability end to end: connector code in a real sandbox child, the host's
broker, and a real HTTP server on 127.0.0.1 (allowed explicitly: loopback is refused
by default, and that refusal is tested too)."""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator

import pytest
from conftest import BACKENDS

import corral
from corral import Limits, NodeSandbox
from corral.config import load_settings

SECRET = "tok-5ecret-9f8e7d"


class _Handler(http.server.BaseHTTPRequestHandler):
    """/echo answers what it got; /status/N answers N; /slow sleeps; /secret leaks SECRET."""

    def _answer(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        status = 200
        if self.path.startswith("/status/"):
            status = int(self.path.rsplit("/", 1)[1])
        if self.path == "/slow":
            time.sleep(3)
        payload = {
            "method": self.command,
            "path": self.path,
            "auth": self.headers.get("authorization"),
            "body": body,
        }
        if self.path == "/secret":
            payload["leak"] = SECRET
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("x-served-by", "corral-test")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args: object) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away (a timed-out execution) is expected here


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    """A real HTTP server on 127.0.0.1; `.hits` lists the paths it served."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.hits = []  # type: ignore[attr-defined]
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


def _sandbox(executor: str, **env: str) -> NodeSandbox:
    return NodeSandbox(
        executor=executor, limits=Limits(max_memory_mb=64), settings=load_settings(**env)
    )


@pytest.fixture(params=BACKENDS)
def allowed(request: pytest.FixtureRequest) -> Iterator[NodeSandbox]:
    """A sandbox whose egress policy lets 127.0.0.1 through."""
    with _sandbox(request.param, CORRAL_EGRESS_ALLOW="127.0.0.1") as sandbox:
        yield sandbox


def _url(server: http.server.ThreadingHTTPServer, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def test_get_and_post_with_json(allowed, server):
    """A GET with params and headers and a POST with a JSON body reach the server; the
    response has status_code, headers, text and json()."""
    code = f"""
def run(params, context):
    got = http.get({_url(server, "/echo")!r}, params={{"q": "a b"}},
                   headers={{"Authorization": "Bearer x"}})
    posted = http.post({_url(server, "/echo")!r}, json={{"n": 1}})
    return [got.status_code, got.headers["x-served-by"], got.json(), posted.json()["body"],
            posted.ok, posted.text == posted.text.strip()]
"""
    status, served_by, echoed, body, ok, _ = allowed.execute_sync(code).output
    assert (status, served_by, ok) == (200, "corral-test", True)
    assert echoed["path"] == "/echo?q=a+b" and echoed["auth"] == "Bearer x"
    assert json.loads(body) == {"n": 1}


def test_an_uncaught_http_error_carries_its_status(allowed, server):
    """raise_for_status() on a 503 left uncaught ends as http_error with status 503."""
    code = (
        "def run(params, context):\n"
        f"    http.get({_url(server, '/status/503')!r}).raise_for_status()\n"
    )
    with pytest.raises(corral.HttpError) as caught:
        allowed.execute_sync(code)
    assert caught.value.type == "http_error" and caught.value.status == 503
    assert caught.value.to_dict()["status"] == 503


def test_a_caught_http_error_is_the_codes_business(allowed, server):
    """The code may handle a 404 itself; raise_for_status() passes a 200 through."""
    code = f"""
def run(params, context):
    try:
        http.get({_url(server, "/status/404")!r}).raise_for_status()
    except Exception as exc:
        return [exc.status_code, http.get({_url(server, "/echo")!r}).raise_for_status().status_code]
"""
    assert allowed.execute_sync(code).output == [404, 200]


@pytest.mark.parametrize("backend", BACKENDS)
def test_loopback_is_refused_by_default_even_when_caught(backend, server):
    """Without CORRAL_EGRESS_ALLOW the host's loopback is refused: policy_violation naming
    the rule although the code caught it, and the server saw nothing."""
    code = f"""
def run(params, context):
    for url in [{_url(server, "/a")!r}, "http://2130706433:{server.server_address[1]}/b",
                "http://[::ffff:127.0.0.1]:{server.server_address[1]}/c"]:
        try:
            http.get(url)
        except Exception:
            pass
    return "carried on"
"""
    with _sandbox(backend) as sandbox, pytest.raises(corral.PolicyViolation) as caught:
        sandbox.execute_sync(code)
    assert "loopback" in caught.value.message and "CORRAL_EGRESS_ALLOW" in caught.value.message
    assert server.hits == []  # type: ignore[attr-defined]


def test_the_request_cap_is_a_policy_violation(backend, server):
    """More requests than CORRAL_HTTP_MAX_REQUESTS in one execution: policy_violation."""
    code = f"""
def run(params, context):
    for _ in range(5):
        http.get({_url(server, "/echo")!r})
"""
    with (
        _sandbox(backend, CORRAL_EGRESS_ALLOW="127.0.0.1", CORRAL_HTTP_MAX_REQUESTS="3") as box,
        pytest.raises(corral.PolicyViolation, match="CORRAL_HTTP_MAX_REQUESTS"),
    ):
        box.execute_sync(code)
    assert len(server.hits) == 3  # type: ignore[attr-defined]


def test_secrets_in_responses_are_masked_everywhere(allowed, server):
    """A secret the server sends back is masked in the output and the logs, also encoded."""
    code = f"""
import base64
def run(params, context):
    leak = http.get({_url(server, "/secret")!r}).json()["leak"]
    log("plain", leak, "b64", base64.b64encode(leak.encode()).decode())
    return {{"leak": leak}}
"""
    result = allowed.execute_sync(code, secrets=[SECRET])
    everything = json.dumps(result.output) + json.dumps([e.message for e in result.logs])
    assert SECRET not in everything
    assert base64.b64encode(SECRET.encode()).decode()[:16] not in everything
    assert "[redacted]" in everything


def test_a_request_outliving_the_execution_leaves_the_next_one_clean(allowed, server):
    """An execution that times out while waiting for a response ends as timeout; the next
    one (on the same worker, for the worker backend) gets its own response, not the old."""
    slow = f"def run(params, context):\n    return http.get({_url(server, '/slow')!r}).json()\n"
    with pytest.raises(corral.ExecutionTimeout):
        allowed.execute_sync(slow, timeout_ms=500)
    quick = f"def run(params, context):\n    return http.get({_url(server, '/echo')!r}).json()\n"
    assert allowed.execute_sync(quick).output["path"] == "/echo"


def test_a_request_without_response_left_uncaught_is_an_http_error_without_status(allowed, server):
    """A connection failure the code does not catch: http_error with status None."""
    code = "def run(params, context):\n    http.get('http://127.0.0.1:1/')\n"
    with pytest.raises(corral.HttpError) as caught:
        allowed.execute_sync(code)
    assert caught.value.status is None and "127.0.0.1:1" in caught.value.message


def test_broker_errors_reach_the_code_as_exceptions(allowed, server):
    """A malformed request is a ValueError (the code's mistake: uncaught, a code_error that
    is not retried); an unreachable port is an http.HTTPError the code can catch."""
    code = """
def run(params, context):
    seen = []
    for url in ["file:///etc/passwd", "http://127.0.0.1:1/"]:
        try:
            http.get(url)
        except http.HTTPError as exc:
            seen.append(["HTTPError", str(exc)])
        except ValueError as exc:
            seen.append(["ValueError", str(exc)])
    return seen
"""
    (kind, scheme), (unreachable, refused) = allowed.execute_sync(code).output
    assert kind == "ValueError" and "http and https" in scheme and "file:" in scheme
    assert unreachable == "HTTPError"
    assert "127.0.0.1:1" in refused or "connect" in refused.lower()
    with pytest.raises(corral.CodeError, match="http and https"):
        allowed.execute_sync("def run(params, context):\n    http.get('gopher://x/')\n")
