"""The shipped connector catalog (`corral/connectors/`) end to end.

The real catalog (ConnectorFramework over SHIPPED_CATALOG), a real NodeSandbox on
each backend, IntegrationManager, and a real HTTP server on 127.0.0.1 that records
every request and answers the way the real API does. Each connection's baseUrl
points at that server (with the real API's path prefix, /v1 or /api), so the
test sees exactly what would have gone to GitHub, Slack, Stripe or Notion.
Nothing here sends a request anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import json
import re
import shutil
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import BACKENDS, running

import corral
from corral.config import load_settings
from corral.executors import (
    SHIPPED_CATALOG,
    ConnectorFramework,
    IntegrationManager,
    IntegrationResult,
    load_connector,
)
from corral.sandbox._policy import compile_connector

GITHUB_TOKEN = "ghp_c0rralT3stT0ken5a9b8c7d6e5f4a3b2c1d0e9"
SLACK_TOKEN = "xoxb-1111-2222-c0rralSlackT0ken9f8e"
STRIPE_KEY = "sk_test_51C0rralStr1peK3y7d6c5b4a"
NOTION_TOKEN = "secret_c0rralN0ti0nT0ken3e2d1c0b9a8"
HTTP_TOKEN = "hk_c0rralHttpT0ken0a1b2c3d"

DATABASE_ID = "d9824bdc-8445-4327-be8b-5b47500af6ce"
PAGE_ID = "3c90c3cc-0d44-4b50-8888-8dd25736052a"
SHIPPED_APPS = {"github", "slack", "stripe", "notion", "http"}
AUTH_TYPES = {"bearer", "basic", "header", "query", "none"}
PLACEHOLDER = re.compile(r"{([A-Za-z][A-Za-z0-9_]*)}")


# -- the fake API: a real server on 127.0.0.1 --------------------------------------------


@dataclass
class Seen:
    """One request the server got."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: str

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        pairs = urllib.parse.parse_qsl(self.body, keep_blank_values=True, strict_parsing=True)
        assert len({name for name, _ in pairs}) == len(pairs), f"repeated fields: {pairs}"
        return dict(pairs)


class _Handler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        server: Api = self.server  # type: ignore[assignment]
        length = int(self.headers.get("content-length") or 0)
        split = urllib.parse.urlsplit(self.path)
        seen = Seen(
            method=self.command,
            path=split.path,
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=self.rfile.read(length).decode() if length else "",
        )
        server.seen.append(seen)
        status, payload, headers = server.routes.get(
            (seen.method, seen.path), (404, {"message": "Not Found"}, {})
        )
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json; charset=utf-8")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


class Api(http.server.ThreadingHTTPServer):
    """Answers what `answer()` set up (404 otherwise) and keeps every request in `seen`."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.seen: list[Seen] = []
        self.routes: dict[tuple[str, str], tuple[int, Any, dict[str, str]]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def answer(
        self,
        method: str,
        path: str,
        payload: Any,
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.routes[(method, path)] = (status, payload, headers or {})

    def only(self) -> Seen:
        """The one request the server got."""
        assert len(self.seen) == 1, [(s.method, s.path) for s in self.seen]
        return self.seen[0]

    def handle_error(self, request: object, client_address: object) -> None:
        pass


def _serve() -> Iterator[Api]:
    with running(Api()) as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def api() -> Iterator[Api]:
    yield from _serve()


@pytest.fixture
def other_api() -> Iterator[Api]:
    """A second server: another origin (another port)."""
    yield from _serve()


# -- the real catalog, sandbox and IntegrationManager ----------------------------------


@pytest.fixture(scope="module")
def framework() -> ConnectorFramework:
    return ConnectorFramework([SHIPPED_CATALOG])


@pytest.fixture(params=BACKENDS)
def manager(request: pytest.FixtureRequest, framework) -> Iterator[IntegrationManager]:
    """IntegrationManager over the shipped catalog and a sandbox that may reach 127.0.0.1."""
    with corral.NodeSandbox(
        executor=request.param,
        limits=corral.Limits(max_memory_mb=64),
        settings=load_settings(CORRAL_EGRESS_ALLOW="127.0.0.1"),
    ) as sandbox:
        yield IntegrationManager(framework, sandbox)


@pytest.fixture(autouse=True)
def generic_off() -> Iterator[None]:
    """The flag is off unless a test turns it on, whatever the environment says."""
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=False):
        yield


def run(
    manager: IntegrationManager,
    app: str,
    function: str,
    params: dict[str, Any],
    connection: dict[str, Any] | None,
) -> IntegrationResult:
    return asyncio.run(manager.execute(app, function, params, connection))


def github(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url, "credentials": {"token": GITHUB_TOKEN}}


def slack(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url + "/api", "credentials": {"token": SLACK_TOKEN}}


def stripe(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url + "/v1", "credentials": {"api_key": STRIPE_KEY}}


def notion(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url + "/v1", "credentials": {"token": NOTION_TOKEN}}


def stripe_basic() -> str:
    return "Basic " + base64.b64encode(f"{STRIPE_KEY}:".encode()).decode()


def assert_no_secret(secret: str, *things: Any) -> None:
    """`secret` appears in none of: results (output, logs), errors (message, logs), text."""
    for thing in things:
        if isinstance(thing, IntegrationResult):
            texts = [json.dumps(thing.output), *(e.message for e in thing.execution.logs)]
        elif isinstance(thing, corral.SandboxError):
            texts = [thing.message, str(thing), *(e.message for e in thing.logs)]
        else:
            texts = [json.dumps(thing)]
        for text in texts:
            assert secret not in text, text
            assert base64.b64encode(f"{secret}:".encode()).decode() not in text, text


def assert_not_supported_without_flag(manager, api, app, function, params, connection) -> None:
    """With GENERIC_EXECUTOR_ENABLED off a generic-only function runs nothing."""
    with pytest.raises(corral.NotSupported) as caught:
        run(manager, app, function, params, connection)
    assert caught.value.type == "not_supported"
    assert "GENERIC_EXECUTOR_ENABLED" in caught.value.message
    assert api.seen == []


def assert_generic(result: IntegrationResult, status: int = 200) -> None:
    assert result.executor == "generic"
    assert result.fallback_reason == "no bespoke handler"
    assert result.output["status"] == status


ISSUE = {
    "id": 1296269,
    "number": 1347,
    "title": "Found a bug",
    "state": "open",
    "html_url": "https://github.com/acme/web/issues/1347",
    "labels": [{"id": 208045946, "name": "bug"}],
    "updated_at": "2024-05-01T10:00:00Z",
}


# -- GitHub -------------------------------------------------------------------------------


def test_github_create_issue_sends_what_the_rest_api_expects(manager, api):
    """create_issue (bespoke): POST /repos/{owner}/{repo}/issues, bearer token, GitHub's
    media type and API version, a JSON body of the issue fields; returns the issue. It
    stays bespoke with the flag on (its generic fallback is only a fallback)."""
    api.answer("POST", "/repos/acme.io/web-app/issues", ISSUE, status=201)
    params = {
        "owner": "acme.io",
        "repo": "web-app",
        "title": "Found a bug",
        "body": "I'm having a problem with this.",
        "labels": ["bug"],
        "assignees": ["octocat"],
    }
    result = run(manager, "github", "create_issue", params, github(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/repos/acme.io/web-app/issues", {})
    assert seen.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert seen.headers["accept"] == "application/vnd.github+json"
    assert seen.headers["x-github-api-version"] == "2022-11-28"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {k: v for k, v in params.items() if k not in ("owner", "repo")}
    assert result.output == ISSUE
    assert (result.executor, result.fallback_reason) == ("bespoke", None)
    assert_no_secret(GITHUB_TOKEN, result)

    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        again = run(manager, "github", "create_issue", params, github(api))
    assert again.executor == "bespoke" and again.output == ISSUE


def test_github_add_comment(manager, api):
    """add_comment (bespoke): POST .../issues/{issue_number}/comments with {"body": ...}."""
    comment = {"id": 1, "body": "Me too", "html_url": "https://github.com/acme/web/issues/7#c1"}
    api.answer("POST", "/repos/acme/web/issues/7/comments", comment, status=201)
    result = run(
        manager,
        "github",
        "add_comment",
        {"owner": "acme", "repo": "web", "issue_number": 7, "body": "Me too"},
        github(api),
    )
    seen = api.only()
    assert (seen.method, seen.path) == ("POST", "/repos/acme/web/issues/7/comments")
    assert seen.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
    assert seen.headers["x-github-api-version"] == "2022-11-28"
    assert seen.json() == {"body": "Me too"}
    assert result.output == comment


def test_github_errors_name_githubs_reason_and_rate_limits_are_retryable(manager, api):
    """A 422 ends as http_error 422 naming GitHub's message and field errors; a spent rate
    limit (403 with x-ratelimit-remaining 0) becomes a retryable 429 with a Retry-After."""
    api.answer(
        "POST",
        "/repos/acme/web/issues",
        {
            "message": "Validation Failed",
            "errors": [{"resource": "Issue", "code": "invalid", "field": "assignees"}],
            "documentation_url": "https://docs.github.com/rest/issues/issues#create-an-issue",
        },
        status=422,
    )
    params = {"owner": "acme", "repo": "web", "title": "x", "assignees": ["ghost"]}
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "github", "create_issue", params, github(api))
    assert caught.value.status == 422
    assert "Validation Failed" in caught.value.message and "assignees" in caught.value.message
    assert_no_secret(GITHUB_TOKEN, caught.value)

    api.answer(
        "POST",
        "/repos/acme/web/issues",
        {"message": "API rate limit exceeded for user ID 1."},
        status=403,
        headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": "4102444800"},
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "github", "create_issue", params, github(api))
    assert caught.value.status == 429
    assert "rate limit" in caught.value.message
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0


def test_github_generic_only_functions(manager, api):
    """get_issue, list_issues, update_issue and the new_issue trigger have no bespoke
    handler: not_supported with the flag off; with it on the generic path sends the
    right request with the definition's headers and the bearer token."""
    issue_params = {"owner": "acme", "repo": "web", "issue_number": 1347}
    list_params = {"owner": "acme", "repo": "web", "state": "open", "labels": "bug", "per_page": 5}
    update = {**issue_params, "state": "closed", "state_reason": "completed"}
    since = {"owner": "acme", "repo": "web", "since": "2024-05-01T00:00:00Z", "sort": "updated"}
    for function, params in [
        ("get_issue", issue_params),
        ("list_issues", list_params),
        ("update_issue", update),
        ("new_issue", since),
    ]:
        assert_not_supported_without_flag(manager, api, "github", function, params, github(api))

    api.answer("GET", "/repos/acme/web/issues/1347", ISSUE)
    api.answer("GET", "/repos/acme/web/issues", [ISSUE])
    api.answer("PATCH", "/repos/acme/web/issues/1347", {**ISSUE, "state": "closed"})
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        got = run(manager, "github", "get_issue", issue_params, github(api))
        listed = run(manager, "github", "list_issues", list_params, github(api))
        updated = run(manager, "github", "update_issue", update, github(api))
        polled = run(manager, "github", "new_issue", since, github(api))
    get, lst, patch, poll = api.seen
    for seen in api.seen:
        assert seen.headers["authorization"] == f"Bearer {GITHUB_TOKEN}"
        assert seen.headers["accept"] == "application/vnd.github+json"
        assert seen.headers["x-github-api-version"] == "2022-11-28"
    assert (get.method, get.path, get.query) == ("GET", "/repos/acme/web/issues/1347", {})
    assert get.body == ""
    assert (lst.method, lst.path, lst.body) == ("GET", "/repos/acme/web/issues", "")
    assert lst.query == {"state": ["open"], "labels": ["bug"], "per_page": ["5"]}
    assert (patch.method, patch.path) == ("PATCH", "/repos/acme/web/issues/1347")
    assert patch.headers["content-type"] == "application/json"
    assert patch.json() == {"state": "closed", "state_reason": "completed"}
    assert (poll.method, poll.path) == ("GET", "/repos/acme/web/issues")
    assert poll.query == {"since": ["2024-05-01T00:00:00Z"], "sort": ["updated"]}
    for result in (got, listed, updated, polled):
        assert_generic(result)
        assert_no_secret(GITHUB_TOKEN, result)
    assert got.output["data"] == ISSUE and listed.output["data"] == [ISSUE]
    assert updated.output["data"]["state"] == "closed"
    assert polled.output["data"] == [ISSUE]


def without_handlers(manager: IntegrationManager, app: str, catalog: Path) -> IntegrationManager:
    """An IntegrationManager over a copy of `app`'s definition with no handlers.py, on the
    same sandbox: what the generic path alone sends."""
    (catalog / app).mkdir()
    shutil.copy(SHIPPED_CATALOG / app / "connector.json", catalog / app)
    bare = IntegrationManager(ConnectorFramework([catalog]), manager.sandbox)
    assert bare.framework.connector(app).handlers_source is None
    return bare


def test_github_generic_fallback_sends_the_same_request(manager, api, tmp_path):
    """create_issue and add_comment declare `fallback: generic`: the generic path, run from
    the same definition with no handlers.py, sends the same request as the handler."""
    bare = without_handlers(manager, "github", tmp_path)
    api.answer("POST", "/repos/acme/web/issues", ISSUE, status=201)
    api.answer("POST", "/repos/acme/web/issues/7/comments", {"id": 1}, status=201)
    issue = {"owner": "acme", "repo": "web", "title": "Found a bug", "labels": ["bug"]}
    comment = {"owner": "acme", "repo": "web", "issue_number": 7, "body": "Me too"}
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        calls = [("create_issue", issue), ("add_comment", comment)]
        bespoke = [run(manager, "github", f, p, github(api)) for f, p in calls]
        generic = [run(bare, "github", f, p, github(api)) for f, p in calls]
    assert [r.executor for r in bespoke + generic] == ["bespoke"] * 2 + ["generic"] * 2
    for by_handler, by_manifest in zip(api.seen[:2], api.seen[2:], strict=True):
        assert (by_handler.method, by_handler.path) == (by_manifest.method, by_manifest.path)
        assert by_handler.json() == by_manifest.json()
        for name in ("authorization", "accept", "x-github-api-version", "content-type"):
            assert by_handler.headers[name] == by_manifest.headers[name], name
    assert generic[0].output["data"] == bespoke[0].output == ISSUE


# -- Slack --------------------------------------------------------------------------------


def test_slack_post_message(manager, api):
    """post_message (bespoke): POST /api/chat.postMessage, bearer token, a JSON body with
    Slack's charset; returns Slack's answer."""
    answer = {
        "ok": True,
        "channel": "C123ABC456",
        "ts": "1503435956.000247",
        "message": {"text": "Deploy finished", "type": "message", "ts": "1503435956.000247"},
    }
    api.answer("POST", "/api/chat.postMessage", answer)
    params = {"channel": "C123ABC456", "text": "Deploy finished", "thread_ts": "1503435900.000100"}
    result = run(manager, "slack", "post_message", params, slack(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/api/chat.postMessage", {})
    assert seen.headers["authorization"] == f"Bearer {SLACK_TOKEN}"
    assert seen.headers["content-type"] == "application/json; charset=utf-8"
    assert seen.json() == params
    assert result.output == answer and result.executor == "bespoke"
    assert_no_secret(SLACK_TOKEN, result)


def test_slack_ok_false_is_a_failure_naming_slacks_error(manager, api):
    """Slack answers HTTP 200 {"ok": false, "error": ...}: the call fails, and the message
    names the method and the error (and the scope Slack wanted); ratelimited (429) and
    Slack's transient errors end as retryable http_errors."""
    params = {"channel": "#nowhere", "text": "hello"}
    api.answer("POST", "/api/chat.postMessage", {"ok": False, "error": "channel_not_found"})
    with pytest.raises(corral.CodeError) as caught:
        run(manager, "slack", "post_message", params, slack(api))
    assert "SlackError" in caught.value.message
    assert "chat.postMessage failed: channel_not_found" in caught.value.message
    assert_no_secret(SLACK_TOKEN, caught.value)

    api.answer(
        "POST",
        "/api/chat.postMessage",
        {"ok": False, "error": "missing_scope", "needed": "chat:write", "provided": "users:read"},
    )
    with pytest.raises(corral.CodeError) as caught:
        run(manager, "slack", "post_message", params, slack(api))
    assert "missing_scope" in caught.value.message and "chat:write" in caught.value.message

    api.answer(
        "POST",
        "/api/chat.postMessage",
        {"ok": False, "error": "ratelimited"},
        status=429,
        headers={"retry-after": "30"},
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "slack", "post_message", params, slack(api))
    assert caught.value.status == 429 and caught.value.retry_after_s == 30

    api.answer("POST", "/api/chat.postMessage", {"ok": False, "error": "service_unavailable"})
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "slack", "post_message", params, slack(api))
    assert caught.value.status == 503 and "service_unavailable" in caught.value.message


def test_slack_update_message(manager, api):
    """update_message (bespoke): POST /api/chat.update with channel, ts and the new text."""
    api.answer("POST", "/api/chat.update", {"ok": True, "channel": "C1", "ts": "1.2", "text": "b"})
    params = {"channel": "C1", "ts": "1.2", "text": "b"}
    result = run(manager, "slack", "update_message", params, slack(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.json()) == ("POST", "/api/chat.update", params)
    assert result.output["ok"] is True


def test_slack_list_channels_is_generic(manager, api):
    """list_channels (generic only): GET /api/conversations.list with the query params."""
    params = {"types": "public_channel,private_channel", "exclude_archived": True, "limit": 2}
    assert_not_supported_without_flag(manager, api, "slack", "list_channels", params, slack(api))
    answer = {
        "ok": True,
        "channels": [{"id": "C012AB3CD", "name": "general", "is_channel": True}],
        "response_metadata": {"next_cursor": "dGVhbTpDMDYxRkE1UEI="},
    }
    api.answer("GET", "/api/conversations.list", answer)
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        result = run(manager, "slack", "list_channels", params, slack(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.body) == ("GET", "/api/conversations.list", "")
    assert seen.query == {
        "types": ["public_channel,private_channel"],
        "exclude_archived": ["true"],
        "limit": ["2"],
    }
    assert seen.headers["authorization"] == f"Bearer {SLACK_TOKEN}"
    assert_generic(result)
    assert result.output["data"] == answer


# -- Stripe -------------------------------------------------------------------------------

CUSTOMER = {"id": "cus_NffrFeUfNV2Hib", "object": "customer", "email": "jenny@example.com"}
INTENT = {
    "id": "pi_3MtwBwLkdIwHu7ix28a3tqPa",
    "object": "payment_intent",
    "amount": 2000,
    "currency": "usd",
    "status": "requires_payment_method",
}


def test_stripe_create_customer_is_form_encoded(manager, api):
    """create_customer (bespoke): POST /v1/customers, the secret key as the Basic user, a
    form body (not JSON) with nested params in brackets, the Idempotency-Key header."""
    api.answer("POST", "/v1/customers", CUSTOMER)
    params = {
        "email": "jenny@example.com",
        "name": "Jenny Rosen",
        "metadata": {"order_id": "6735", "source": "corral"},
        "address": {"line1": "Unter den Linden 1", "city": "Berlin", "country": "DE"},
        "idempotency_key": "KG5LxwFBepaKHyUD",
    }
    result = run(manager, "stripe", "create_customer", params, stripe(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/v1/customers", {})
    assert seen.headers["authorization"] == stripe_basic()
    assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
    assert seen.headers["idempotency-key"] == "KG5LxwFBepaKHyUD"
    assert not seen.body.lstrip().startswith("{")
    assert seen.form() == {
        "email": "jenny@example.com",
        "name": "Jenny Rosen",
        "metadata[order_id]": "6735",
        "metadata[source]": "corral",
        "address[line1]": "Unter den Linden 1",
        "address[city]": "Berlin",
        "address[country]": "DE",
    }
    assert result.output == CUSTOMER and result.executor == "bespoke"
    assert_no_secret(STRIPE_KEY, result)


def test_stripe_create_payment_intent(manager, api):
    """create_payment_intent (bespoke): amounts as integers, booleans as true/false,
    nested objects and arrays in Stripe's bracket notation."""
    api.answer("POST", "/v1/payment_intents", INTENT)
    automatic = {
        "amount": 2000,
        "currency": "usd",
        "customer": "cus_NffrFeUfNV2Hib",
        "automatic_payment_methods": {"enabled": True},
        "metadata": {"order": "A-1"},
    }
    listed = {
        "amount": 1099,
        "currency": "eur",
        "payment_method_types": ["card", "sepa_debit"],
        "capture_method": "manual",
        "confirm": False,
    }
    first = run(manager, "stripe", "create_payment_intent", automatic, stripe(api))
    run(manager, "stripe", "create_payment_intent", listed, stripe(api))
    one, two = api.seen
    for seen in (one, two):
        assert (seen.method, seen.path) == ("POST", "/v1/payment_intents")
        assert seen.headers["authorization"] == stripe_basic()
        assert seen.headers["content-type"] == "application/x-www-form-urlencoded"
        assert "idempotency-key" not in seen.headers
    assert one.form() == {
        "amount": "2000",
        "currency": "usd",
        "customer": "cus_NffrFeUfNV2Hib",
        "automatic_payment_methods[enabled]": "true",
        "metadata[order]": "A-1",
    }
    assert two.form() == {
        "amount": "1099",
        "currency": "eur",
        "payment_method_types[0]": "card",
        "payment_method_types[1]": "sepa_debit",
        "capture_method": "manual",
        "confirm": "false",
    }
    assert first.output == INTENT


def test_stripe_errors_name_stripes_error_and_never_the_key(manager, api):
    """A decline ends as http_error 402 naming Stripe's type, decline code and message; an
    error message that quotes the key (as a bad-key answer can) reaches nobody unmasked."""
    api.answer(
        "POST",
        "/v1/payment_intents",
        {
            "error": {
                "type": "card_error",
                "code": "card_declined",
                "decline_code": "insufficient_funds",
                "message": "Your card has insufficient funds.",
            }
        },
        status=402,
    )
    params = {"amount": 2000, "currency": "usd", "payment_method": "pm_card_visa", "confirm": True}
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "stripe", "create_payment_intent", params, stripe(api))
    assert caught.value.status == 402
    for part in ("card_error", "insufficient_funds", "Your card has insufficient funds."):
        assert part in caught.value.message

    api.answer(
        "POST",
        "/v1/customers",
        {"error": {"type": "invalid_request_error", "message": f"Invalid API Key: {STRIPE_KEY}"}},
        status=401,
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "stripe", "create_customer", {"email": "a@b.co"}, stripe(api))
    assert caught.value.status == 401
    assert "invalid_request_error" in caught.value.message
    assert "[redacted]" in caught.value.message
    assert_no_secret(STRIPE_KEY, caught.value)


def test_stripe_reads_are_generic(manager, api):
    """retrieve_customer and list_customers (generic only): GETs with the same Basic auth,
    params as query, no body."""
    one = {"customer_id": "cus_NffrFeUfNV2Hib"}
    page = {"email": "jenny@example.com", "limit": 3}
    assert_not_supported_without_flag(manager, api, "stripe", "retrieve_customer", one, stripe(api))
    assert_not_supported_without_flag(manager, api, "stripe", "list_customers", page, stripe(api))
    api.answer("GET", "/v1/customers/cus_NffrFeUfNV2Hib", CUSTOMER)
    listing = {"object": "list", "url": "/v1/customers", "has_more": False, "data": [CUSTOMER]}
    api.answer("GET", "/v1/customers", listing)
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        got = run(manager, "stripe", "retrieve_customer", one, stripe(api))
        listed = run(manager, "stripe", "list_customers", page, stripe(api))
    get, lst = api.seen
    assert (get.method, get.path, get.query) == ("GET", "/v1/customers/cus_NffrFeUfNV2Hib", {})
    assert get.body == ""
    assert (lst.method, lst.path, lst.body) == ("GET", "/v1/customers", "")
    assert lst.query == {"email": ["jenny@example.com"], "limit": ["3"]}
    for seen in (get, lst):
        assert seen.headers["authorization"] == stripe_basic()
    assert_generic(got)
    assert_generic(listed)
    assert got.output["data"] == CUSTOMER and listed.output["data"] == listing
    assert_no_secret(STRIPE_KEY, got, listed)


# -- Notion -------------------------------------------------------------------------------

PAGE = {"object": "page", "id": "59833787-2cf9-4fdf-8782-e53db20768a5", "url": "https://n.so/p"}


def _paragraph(*chunks: str) -> dict[str, Any]:
    rich = [{"type": "text", "text": {"content": chunk}} for chunk in chunks]
    return {"object": "block", "type": "paragraph", "paragraph": {"rich_text": rich}}


def test_notion_create_page_in_a_database(manager, api):
    """create_page (bespoke): POST /v1/pages with the bearer token and Notion-Version
    2022-06-28; `title` fills the database's title property, `content` becomes
    paragraph blocks after the given children."""
    api.answer("POST", "/v1/pages", PAGE)
    heading = {"object": "block", "type": "heading_2", "heading_2": _paragraph("Plan")["paragraph"]}
    params = {
        "parent_database_id": DATABASE_ID,
        "title": "Q3 launch",
        "properties": {"Status": {"select": {"name": "In progress"}}},
        "children": [heading],
        "content": "First paragraph.\n\nSecond paragraph.\n",
        "icon_emoji": "🚀",
        "cover_url": "https://upload.wikimedia.org/cover.jpg",
    }
    result = run(manager, "notion", "create_page", params, notion(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/v1/pages", {})
    assert seen.headers["authorization"] == f"Bearer {NOTION_TOKEN}"
    assert seen.headers["notion-version"] == "2022-06-28"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {
        "parent": {"database_id": DATABASE_ID},
        "properties": {
            "Status": {"select": {"name": "In progress"}},
            "Name": {"title": [{"type": "text", "text": {"content": "Q3 launch"}}]},
        },
        "children": [heading, _paragraph("First paragraph."), _paragraph("Second paragraph.")],
        "icon": {"type": "emoji", "emoji": "🚀"},
        "cover": {
            "type": "external",
            "external": {"url": "https://upload.wikimedia.org/cover.jpg"},
        },
    }
    assert result.output == PAGE and result.executor == "bespoke"
    assert_no_secret(NOTION_TOKEN, result)


def test_notion_create_page_under_a_page_splits_long_text(manager, api):
    """Under a page the title property is `title`; text past Notion's 2000 characters per
    rich text object is split; Notion's error codes end as http_error naming them."""
    api.answer("POST", "/v1/pages", PAGE)
    text = "x" * 2500
    params = {"parent_page_id": PAGE_ID.replace("-", ""), "title": "Notes", "content": text}
    run(manager, "notion", "create_page", params, notion(api))
    assert api.only().json() == {
        "parent": {"page_id": PAGE_ID.replace("-", "")},
        "properties": {"title": {"title": [{"type": "text", "text": {"content": "Notes"}}]}},
        "children": [_paragraph("x" * 2000, "x" * 500)],
    }

    api.answer(
        "POST",
        "/v1/pages",
        {
            "object": "error",
            "status": 400,
            "code": "validation_error",
            "message": "body failed validation: body.parent.page_id should be a valid uuid",
        },
        status=400,
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "notion", "create_page", params, notion(api))
    assert caught.value.status == 400
    assert "validation_error" in caught.value.message
    assert "body.parent.page_id should be a valid uuid" in caught.value.message
    assert_no_secret(NOTION_TOKEN, caught.value)


def test_notion_query_database_and_retrieve_page_are_generic(manager, api):
    """query_database (POST with a JSON body) and retrieve_page (GET) through the generic
    path, with the definition's Notion-Version header."""
    query = {
        "database_id": DATABASE_ID,
        "filter": {"property": "Done", "checkbox": {"equals": False}},
        "sorts": [{"timestamp": "created_time", "direction": "descending"}],
        "page_size": 10,
    }
    page = {"page_id": PAGE_ID}
    assert_not_supported_without_flag(manager, api, "notion", "query_database", query, notion(api))
    assert_not_supported_without_flag(manager, api, "notion", "retrieve_page", page, notion(api))
    listing = {"object": "list", "results": [PAGE], "next_cursor": None, "has_more": False}
    api.answer("POST", f"/v1/databases/{DATABASE_ID}/query", listing)
    api.answer("GET", f"/v1/pages/{PAGE_ID}", PAGE)
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        queried = run(manager, "notion", "query_database", query, notion(api))
        got = run(manager, "notion", "retrieve_page", page, notion(api))
    post, get = api.seen
    assert (post.method, post.path) == ("POST", f"/v1/databases/{DATABASE_ID}/query")
    assert post.headers["content-type"] == "application/json"
    assert post.json() == {k: v for k, v in query.items() if k != "database_id"}
    assert (get.method, get.path, get.query, get.body) == ("GET", f"/v1/pages/{PAGE_ID}", {}, "")
    for seen in (post, get):
        assert seen.headers["authorization"] == f"Bearer {NOTION_TOKEN}"
        assert seen.headers["notion-version"] == "2022-06-28"
    assert_generic(queried)
    assert_generic(got)
    assert queried.output["data"] == listing and got.output["data"] == PAGE


# -- HTTP request -------------------------------------------------------------------------


def test_http_request_sends_what_it_is_given(manager, api):
    """request (bespoke): method, headers, query (booleans as true/false, lists repeated)
    and a JSON body reach the URL; the output is {status, headers, data}."""
    api.answer("POST", "/hooks/deploy", {"received": True}, status=202, headers={"x-id": "7"})
    params = {
        "url": api.url + "/hooks/deploy",
        "method": "POST",
        "headers": {"X-Source": "corral"},
        "query": {"dry_run": True, "n": 3, "tag": ["a", "b"]},
        "body": {"service": "web", "version": "1.2.3"},
    }
    result = run(manager, "http", "request", params, None)
    seen = api.only()
    assert (seen.method, seen.path) == ("POST", "/hooks/deploy")
    assert seen.query == {"dry_run": ["true"], "n": ["3"], "tag": ["a", "b"]}
    assert seen.headers["x-source"] == "corral"
    assert seen.headers["content-type"] == "application/json"
    assert "authorization" not in seen.headers
    assert seen.json() == {"service": "web", "version": "1.2.3"}
    assert result.executor == "bespoke"
    assert result.output["status"] == 202
    assert result.output["headers"]["x-id"] == "7"
    assert result.output["data"] == {"received": True}


def test_http_request_form_text_and_errors(manager, api):
    """body_type form sends a form; a string body goes as is; a 404 fails as http_error
    404 unless fail_on_error is false."""
    api.answer("PUT", "/form", {"ok": True})
    api.answer("POST", "/text", "plain answer")
    form_params = {"url": api.url + "/form", "method": "PUT", "body": {"a": "1", "b": False}}
    run(manager, "http", "request", {**form_params, "body_type": "form"}, None)
    text_params = {"url": api.url + "/text", "method": "POST", "body": "raw <xml/>"}
    xml = {"headers": {"Content-Type": "application/xml"}}
    text = run(manager, "http", "request", {**text_params, **xml}, None)
    form, raw = api.seen
    assert form.headers["content-type"] == "application/x-www-form-urlencoded"
    assert form.form() == {"a": "1", "b": "false"}
    assert (raw.headers["content-type"], raw.body) == ("application/xml", "raw <xml/>")
    assert text.output["data"] == "plain answer"  # JSON content type, not JSON: kept as text

    with pytest.raises(corral.HttpError) as caught:
        run(manager, "http", "request", {"url": api.url + "/missing"}, None)
    assert caught.value.status == 404
    lenient = {"url": api.url + "/missing", "fail_on_error": False}
    kept = run(manager, "http", "request", lenient, None)
    assert kept.output["status"] == 404 and kept.output["data"] == {"message": "Not Found"}


def test_http_credentials_go_only_to_the_connection_origin(manager, api, other_api):
    """A relative url resolves against the connection's baseUrl and carries its token; an
    absolute url on another origin gets no credentials, whatever the params say."""
    api.answer("GET", "/v2/things", {"things": []})
    other_api.answer("GET", "/collect", {})
    connection = {"baseUrl": api.url + "/v2", "credentials": {"token": HTTP_TOKEN}}
    mine = run(manager, "http", "request", {"url": "things"}, connection)
    theirs = run(manager, "http", "request", {"url": other_api.url + "/collect"}, connection)
    assert api.only().path == "/v2/things"
    assert api.only().headers["authorization"] == f"Bearer {HTTP_TOKEN}"
    assert "authorization" not in other_api.only().headers
    assert HTTP_TOKEN not in json.dumps(other_api.only().__dict__)
    assert any("not sent" in entry.message for entry in theirs.execution.logs)
    assert_no_secret(HTTP_TOKEN, mine, theirs)

    basic = {"baseUrl": api.url, "credentials": {"username": "bot", "password": HTTP_TOKEN}}
    run(manager, "http", "request", {"url": "/v2/things"}, basic)
    expected = "Basic " + base64.b64encode(f"bot:{HTTP_TOKEN}".encode()).decode()
    assert api.seen[-1].headers["authorization"] == expected


def test_http_relative_url_without_base_fails_before_any_request(manager, api):
    """A relative url with no baseUrl to resolve it against is the caller's error."""
    with pytest.raises(corral.CodeError) as caught:
        run(manager, "http", "request", {"url": "/things"}, None)
    assert "absolute" in caught.value.message
    assert api.seen == []


# -- the params contract ------------------------------------------------------------------

INVALID = [
    ("github", "create_issue", {"owner": "acme", "repo": "web"}, "'title' is a required"),
    ("github", "create_issue", {"owner": "acme", "repo": "web", "title": "x", "titel": "y"},
     "titel"),
    ("github", "get_issue", {"owner": "acme", "repo": "web", "issue_number": "7"},
     "is not of type 'integer'"),
    ("github", "list_issues", {"owner": "acme", "repo": "web", "state": "opened"}, "opened"),
    ("slack", "post_message", {"channel": "C1"}, "params"),
    ("slack", "post_message", {"channel": "C1", "text": "x", "thread_ts": "yesterday"},
     "thread_ts"),
    ("stripe", "create_payment_intent", {"amount": 2000, "currency": "USD"}, "currency"),
    ("stripe", "create_payment_intent", {"amount": "20.00", "currency": "usd"}, "amount"),
    ("stripe", "create_customer", {"metadata": {"order": 42}}, "metadata"),
    ("notion", "create_page", {"parent_database_id": DATABASE_ID, "parent_page_id": PAGE_ID},
     "params"),
    ("notion", "create_page", {"title": "orphan"}, "params"),
    ("http", "request", {"url": "http://127.0.0.1/", "method": "FETCH"}, "FETCH"),
]  # fmt: skip


def test_schema_violations_are_invalid_input_before_any_request(manager, api):
    """A payload that breaks an action's params schema is invalid_input naming the problem,
    and nothing runs: the server sees no request, even with the generic path on."""
    connections = {"github": github(api), "slack": slack(api), "stripe": stripe(api)}
    connections.update(notion=notion(api), http=None)
    for flag in (False, True):
        with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=flag):
            for app, function, params, named in INVALID:
                with pytest.raises(corral.InvalidInput) as caught:
                    run(manager, app, function, params, connections[app])
                assert caught.value.type == "invalid_input"
                assert f"{app}.{function}" in caught.value.message
                assert named in caught.value.message, caught.value.message
    assert api.seen == []


# -- the catalog itself -------------------------------------------------------------------


def _app_folders() -> list[Path]:
    return sorted(p for p in SHIPPED_CATALOG.iterdir() if (p / "connector.json").is_file())


def test_every_shipped_definition_loads_and_is_well_formed():
    """Every app loads; each action and trigger has a Python id, runtimes and fallback,
    a params schema that is a valid JSON Schema (draft 2020-12) for an object, path
    placeholders that are required params; something can run each of them; a fallback
    of "generic" has a handler and HTTP metadata; triggers say how to dedupe; every
    handlers.py compiles under the sandbox's policy."""
    folders = _app_folders()
    assert {p.name for p in folders} >= SHIPPED_APPS
    for folder in folders:
        connector = load_connector(folder)
        raw = json.loads((folder / "connector.json").read_text())
        assert connector.id == folder.name and connector.name
        assert (connector.auth or {}).get("type", "none") in AUTH_TYPES, folder
        if connector.base_url is not None:
            assert connector.base_url.startswith("https://"), connector.base_url
        if connector.handlers_source is not None:
            _, error_type, message = compile_connector(connector.handlers_source)
            assert error_type is None, f"{folder}/handlers.py: {message}"
        operations = [*connector.actions.values(), *connector.triggers.values()]
        assert operations, folder
        for kind in ("actions", "triggers"):
            for item in raw.get(kind, []):
                where = f"{connector.id}.{item['id']}"
                assert item["id"].isidentifier(), where
                assert item.get("runtimes") == ["python"], where
                assert "fallback" in item and item["fallback"] in (None, "generic"), where
        for op in operations:
            where = f"{connector.id}.{op.id}"
            schema = op.params_schema
            jsonschema.Draft202012Validator.check_schema(schema)
            assert schema.get("type") == "object", where
            assert isinstance(schema.get("required"), list), where
            assert set(schema["required"]) <= set(schema.get("properties", {})), where
            assert schema.get("additionalProperties") is False, where
            has_handler = connector.handler(op.id) is not None
            assert has_handler or op.has_http_metadata, f"{where}: nothing can run it"
            if op.fallback == "generic":
                assert has_handler and op.has_http_metadata, where
            if op.endpoint is not None:
                assert op.endpoint.startswith("/"), where
                for name in PLACEHOLDER.findall(op.endpoint):
                    assert name in schema["required"], f"{where}: {{{name}}} is not required"
            if op.kind == "trigger":
                dedupe = op.dedupe or {}
                assert dedupe.get("strategy") == "cursor", where
                assert dedupe.get("cursor", "").startswith("$."), where
                assert dedupe.get("key", "").startswith("$."), where


def test_the_catalog_says_which_functions_are_bespoke():
    """The split the catalog promises: bespoke where the API needs code (form bodies,
    Slack's ok:false, Notion's shorthands, arbitrary URLs), generic for plain reads."""
    framework = ConnectorFramework([SHIPPED_CATALOG])
    bespoke = {}
    for app in SHIPPED_APPS:
        connector = framework.connector(app)
        functions = [*connector.actions, *connector.triggers]
        bespoke[app] = sorted(f for f in functions if connector.handler(f) is not None)
    assert bespoke == {
        "github": ["add_comment", "create_issue"],
        "slack": ["post_message", "update_message"],
        "stripe": ["create_customer", "create_payment_intent"],
        "notion": ["create_page"],
        "http": ["request"],
    }
