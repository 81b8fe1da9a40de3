"""The shipped catalog's GitLab, Jira Cloud, SendGrid and PagerDuty apps end to end.

As in test_connectors: the real catalog, a real NodeSandbox on each backend,
IntegrationManager, and a real HTTP server on 127.0.0.1 (`Api`) that records
every request and answers the way the real API does. Each connection's baseUrl
points at that server with the real API's path prefix (/api/v4, /v3), so the
test sees exactly what would have gone to the API. Nothing here sends a
request anywhere but 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_connectors import (  # the same server, catalog and sandbox fixtures
    Api,
    api,  # noqa: F401
    assert_generic,
    assert_no_secret,
    assert_not_supported_without_flag,
    framework,  # noqa: F401
    generic_off,  # noqa: F401
    manager,  # noqa: F401
    run,
    without_handlers,
)

import corral
from corral.executors import SHIPPED_CATALOG
from corral.runtime import SqliteStore, TriggerPoller, capabilities

GITLAB_TOKEN = "glpat-c0rralGitLabT0ken4f3e2d1c"
JIRA_EMAIL = "automation@acme.example"
JIRA_TOKEN = "ATATT3xC0rralJiraT0ken9a8b7c6d5e"
SENDGRID_KEY = "SG.c0rralSendGrid.K3y1a2b3c4d5e6f7"
PD_ROUTING_KEY = "R0UT1NGc0rralPagerDutyK3y1234567"  # 32 characters, as PagerDuty's are
PD_API_KEY = "u+c0rralPdRestK3y-9f8e"

NEW_APPS = ("gitlab", "jira", "sendgrid", "pagerduty")


def gitlab(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url + "/api/v4", "credentials": {"token": GITLAB_TOKEN}}


def jira(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url, "credentials": {"username": JIRA_EMAIL, "password": JIRA_TOKEN}}


def sendgrid(api: Api) -> dict[str, Any]:
    return {"baseUrl": api.url + "/v3", "credentials": {"api_key": SENDGRID_KEY}}


def pagerduty(api: Api) -> dict[str, Any]:
    credentials = {"routing_key": PD_ROUTING_KEY, "api_key": PD_API_KEY}
    return {"baseUrl": api.url, "credentials": credentials}


def jira_basic() -> str:
    return "Basic " + base64.b64encode(f"{JIRA_EMAIL}:{JIRA_TOKEN}".encode()).decode()


def paragraph(*content: dict[str, Any]) -> dict[str, Any]:
    return {"type": "paragraph", "content": list(content)}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


HARD_BREAK = {"type": "hardBreak"}


# -- GitLab -------------------------------------------------------------------------------

GL_ISSUE = {
    "id": 84,
    "iid": 14,
    "project_id": 4,
    "title": "Checkout fails on Safari",
    "state": "opened",
    "labels": ["bug", "frontend"],
    "web_url": "https://gitlab.com/acme/web-app/-/issues/14",
    "updated_at": "2024-05-01T10:00:00.000Z",
}


def test_gitlab_create_issue_sends_what_the_api_expects(manager, api):
    """create_issue (bespoke): POST /api/v4/projects/<URL-encoded path>/issues, bearer token,
    a JSON body of the issue fields; returns the issue, and stays bespoke with the flag on."""
    api.answer("POST", "/api/v4/projects/acme%2Fweb-app/issues", GL_ISSUE, status=201)
    params = {
        "id": "acme/web-app",
        "title": "Checkout fails on Safari",
        "description": "Steps:\n1. open /cart",
        "labels": "bug,frontend",
        "assignee_ids": [12],
        "due_date": "2024-06-30",
        "confidential": False,
        "issue_type": "incident",
    }
    result = run(manager, "gitlab", "create_issue", params, gitlab(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == (
        "POST",
        "/api/v4/projects/acme%2Fweb-app/issues",
        {},
    )
    assert seen.headers["authorization"] == f"Bearer {GITLAB_TOKEN}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {k: v for k, v in params.items() if k != "id"}
    assert result.output == GL_ISSUE
    assert (result.executor, result.fallback_reason) == ("bespoke", None)
    assert any("created issue #14" in entry.message for entry in result.execution.logs)
    assert_no_secret(GITLAB_TOKEN, result)

    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        again = run(manager, "gitlab", "create_issue", params, gitlab(api))
    assert again.executor == "bespoke" and again.output == GL_ISSUE


def test_gitlab_add_note(manager, api):
    """add_note (bespoke): POST .../projects/{id}/issues/{issue_iid}/notes with the body and
    the internal flag; a numeric project id goes as is."""
    note = {"id": 302, "body": "Reproduced on 17.4", "internal": True, "noteable_iid": 14}
    api.answer("POST", "/api/v4/projects/4/issues/14/notes", note, status=201)
    params = {"id": 4, "issue_iid": 14, "body": "Reproduced on 17.4", "internal": True}
    result = run(manager, "gitlab", "add_note", params, gitlab(api))
    seen = api.only()
    assert (seen.method, seen.path) == ("POST", "/api/v4/projects/4/issues/14/notes")
    assert seen.headers["authorization"] == f"Bearer {GITLAB_TOKEN}"
    assert seen.json() == {"body": "Reproduced on 17.4", "internal": True}
    assert result.output == note and result.executor == "bespoke"


def test_gitlab_errors_name_gitlabs_reason_and_never_the_token(manager, api):
    """GitLab's error shapes end as http_error with GitLab's status: field errors
    ({"message": {field: [..]}}), plain messages, OAuth errors (with a body that quotes
    the token, redacted); a 429 keeps its Retry-After, so it is retried as GitLab asks."""
    path = "/api/v4/projects/acme%2Fweb-app/issues"
    params = {"id": "acme/web-app", "title": "x", "labels": "bug"}
    cases = [
        (400, {"message": {"labels": ["is invalid"], "title": ["is too long"]}}, {},
         ["labels is invalid", "title is too long"]),
        (404, {"message": "404 Project Not Found"}, {}, ["404 Project Not Found"]),
        (401, {"error": "invalid_token", "error_description": f"Token {GITLAB_TOKEN} was revoked"},
         {}, ["invalid_token", "was revoked", "[redacted]"]),
        (429, {"message": "Retry later"}, {"retry-after": "30"}, ["Retry later"]),
    ]  # fmt: skip
    for status, body, headers, named in cases:
        api.answer("POST", path, body, status=status, headers=headers)
        with pytest.raises(corral.HttpError) as caught:
            run(manager, "gitlab", "create_issue", params, gitlab(api))
        assert caught.value.status == status
        assert "GitLab create issue failed" in caught.value.message
        for part in named:
            assert part in caught.value.message, caught.value.message
        assert_no_secret(GITLAB_TOKEN, caught.value)
    assert caught.value.retry_after_s == 30


def test_gitlab_generic_only_functions(manager, api):
    """get_project, list_projects and the new_issue trigger have no bespoke handler:
    not_supported with the flag off; with it on the generic path sends the request GitLab
    documents (project path URL-encoded, params as query, bearer token)."""
    one = {"id": "acme/web-app", "statistics": True}
    page = {"membership": True, "order_by": "last_activity_at", "per_page": 20}
    poll = {"id": 4, "state": "opened", "updated_after": "2024-05-01T00:00:00Z"}
    for function, params in [("get_project", one), ("list_projects", page), ("new_issue", poll)]:
        assert_not_supported_without_flag(manager, api, "gitlab", function, params, gitlab(api))

    project = {"id": 4, "path_with_namespace": "acme/web-app"}
    api.answer("GET", "/api/v4/projects/acme%2Fweb-app", project)
    api.answer("GET", "/api/v4/projects", [project])
    api.answer("GET", "/api/v4/projects/4/issues", [GL_ISSUE])
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        got = run(manager, "gitlab", "get_project", one, gitlab(api))
        listed = run(manager, "gitlab", "list_projects", page, gitlab(api))
        polled = run(manager, "gitlab", "new_issue", poll, gitlab(api))
    get, lst, issues = api.seen
    for seen in api.seen:
        assert seen.method == "GET" and seen.body == ""
        assert seen.headers["authorization"] == f"Bearer {GITLAB_TOKEN}"
    assert (get.path, get.query) == ("/api/v4/projects/acme%2Fweb-app", {"statistics": ["true"]})
    assert lst.path == "/api/v4/projects"
    assert lst.query == {
        "membership": ["true"],
        "order_by": ["last_activity_at"],
        "per_page": ["20"],
    }
    assert issues.path == "/api/v4/projects/4/issues"
    assert issues.query == {"state": ["opened"], "updated_after": ["2024-05-01T00:00:00Z"]}
    for result in (got, listed, polled):
        assert_generic(result)
        assert_no_secret(GITLAB_TOKEN, result)
    assert got.output["data"] == project and listed.output["data"] == [project]
    assert polled.output["data"] == [GL_ISSUE]


def test_gitlab_generic_fallback_sends_the_same_request(manager, api, tmp_path):
    """create_issue and add_note declare `fallback: generic`: the generic path, run from
    the same definition with no handlers.py, sends the same request as the handler."""
    bare = without_handlers(manager, "gitlab", tmp_path)
    api.answer("POST", "/api/v4/projects/acme%2Fweb-app/issues", GL_ISSUE, status=201)
    api.answer("POST", "/api/v4/projects/acme%2Fweb-app/issues/14/notes", {"id": 1}, status=201)
    issue = {"id": "acme/web-app", "title": "Checkout fails", "labels": "bug"}
    note = {"id": "acme/web-app", "issue_iid": 14, "body": "Me too", "internal": False}
    calls = [("create_issue", issue), ("add_note", note)]
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        bespoke = [run(manager, "gitlab", f, p, gitlab(api)) for f, p in calls]
        generic = [run(bare, "gitlab", f, p, gitlab(api)) for f, p in calls]
    assert [r.executor for r in bespoke + generic] == ["bespoke"] * 2 + ["generic"] * 2
    for by_handler, by_manifest in zip(api.seen[:2], api.seen[2:], strict=True):
        assert (by_handler.method, by_handler.path) == (by_manifest.method, by_manifest.path)
        assert by_handler.json() == by_manifest.json()
        for name in ("authorization", "accept", "content-type"):
            assert by_handler.headers[name] == by_manifest.headers[name], name
    assert generic[0].output["data"] == bespoke[0].output == GL_ISSUE


def test_gitlab_new_issue_trigger_asks_only_for_what_changed(manager, api, tmp_path):
    """Polling new_issue: the first poll is a baseline; the next one sends the stored
    cursor (the newest updated_at) as updated_after, and only the issue that is new or
    changed since is delivered (the one GitLab repeats at the cursor instant is not)."""
    older = {**GL_ISSUE, "id": 83, "iid": 13, "updated_at": "2024-05-01T09:00:00.000Z"}
    newest = {**GL_ISSUE, "id": 84, "iid": 14, "updated_at": "2024-05-01T11:30:00.000Z"}
    fresh = {**GL_ISSUE, "id": 85, "iid": 15, "updated_at": "2024-05-01T12:00:00.000Z"}
    path = "/api/v4/projects/acme%2Fweb-app/issues"
    params = {"id": "acme/web-app", "order_by": "updated_at", "sort": "desc"}

    async def poll_twice() -> tuple[corral.runtime.TriggerPoll, corral.runtime.TriggerPoll]:
        async with SqliteStore(tmp_path / "corral.db") as store:
            poller = TriggerPoller(manager, store)
            api.answer("GET", path, [newest, older])
            first = await poller.poll("gitlab", "new_issue", params, gitlab(api))
            await poller.commit(first)
            api.answer("GET", path, [fresh, newest])
            second = await poller.poll("gitlab", "new_issue", params, gitlab(api))
            return first, second

    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        first, second = asyncio.run(poll_twice())
    assert first.baseline and first.new == [] and len(first.returned) == 2
    assert first.cursor == "2024-05-01T11:30:00.000Z"
    before, after = api.seen
    assert "updated_after" not in before.query
    assert after.query == {
        "order_by": ["updated_at"],
        "sort": ["desc"],
        "updated_after": ["2024-05-01T11:30:00.000Z"],
    }
    assert [item.value for item in second.new] == [fresh]
    assert [item.key for item in second.new] == ["85"]
    assert second.cursor == "2024-05-01T12:00:00.000Z"


# -- Jira Cloud ---------------------------------------------------------------------------

JIRA_CREATED = {
    "id": "10000",
    "key": "ED-24",
    "self": "https://acme.atlassian.net/rest/api/3/issue/10000",
}


def test_jira_create_issue_sends_adf_built_from_plain_text(manager, api):
    """create_issue (bespoke): POST /rest/api/3/issue with HTTP Basic (email, API token) and
    {"fields": ...}: keys and names as Jira's references, the description as an Atlassian
    Document Format document (paragraphs on blank lines, hard breaks on line breaks), extra
    `fields` as given; returns Jira's answer plus the issue's page."""
    api.answer("POST", "/rest/api/3/issue", JIRA_CREATED, status=201)
    params = {
        "project": "ED",
        "issue_type": "Bug",
        "summary": "Checkout fails on Safari",
        "description": "Steps to reproduce:\n1. open /cart\n2. pay\r\n\n  \nSeen on 17.4.",
        "labels": ["checkout", "safari"],
        "priority": "High",
        "assignee_account_id": "5b10ac8d82e05b22cc7d4ef5",
        "parent": "ED-1",
        "components": ["Web"],
        "due_date": "2024-06-30",
        "fields": {"customfield_10010": {"value": "Customer"}},
    }
    result = run(manager, "jira", "create_issue", params, jira(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/rest/api/3/issue", {})
    assert seen.headers["authorization"] == jira_basic()
    assert seen.headers["accept"] == "application/json"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {
        "fields": {
            "project": {"key": "ED"},
            "issuetype": {"name": "Bug"},
            "summary": "Checkout fails on Safari",
            "description": {
                "type": "doc",
                "version": 1,
                "content": [
                    paragraph(
                        text("Steps to reproduce:"),
                        HARD_BREAK,
                        text("1. open /cart"),
                        HARD_BREAK,
                        text("2. pay"),
                    ),
                    paragraph(text("Seen on 17.4.")),
                ],
            },
            "labels": ["checkout", "safari"],
            "priority": {"name": "High"},
            "assignee": {"accountId": "5b10ac8d82e05b22cc7d4ef5"},
            "parent": {"key": "ED-1"},
            "components": [{"name": "Web"}],
            "duedate": "2024-06-30",
            "customfield_10010": {"value": "Customer"},
        }
    }
    assert result.output == {**JIRA_CREATED, "url": api.url + "/browse/ED-24"}
    assert result.executor == "bespoke"
    assert_no_secret(JIRA_TOKEN, result)

    numeric = {"project": "10000", "issue_type": "10001", "summary": "By ids"}
    run(manager, "jira", "create_issue", numeric, jira(api))
    assert api.seen[-1].json() == {
        "fields": {"project": {"id": "10000"}, "issuetype": {"id": "10001"}, "summary": "By ids"}
    }


def test_jira_add_comment(manager, api):
    """add_comment (bespoke): POST /rest/api/3/issue/{issueIdOrKey}/comment, the plain-text
    body as an ADF document, the visibility restriction as given."""
    comment = {
        "id": "10010",
        "self": "https://acme.atlassian.net/rest/api/3/issue/10000/comment/10010",
    }
    api.answer("POST", "/rest/api/3/issue/ED-24/comment", comment, status=201)
    params = {
        "issueIdOrKey": "ED-24",
        "body": "Fixed in 2.3.1.\n\nPlease retest.",
        "visibility": {"type": "role", "value": "Developers"},
    }
    result = run(manager, "jira", "add_comment", params, jira(api))
    seen = api.only()
    assert (seen.method, seen.path) == ("POST", "/rest/api/3/issue/ED-24/comment")
    assert seen.headers["authorization"] == jira_basic()
    assert seen.json() == {
        "body": {
            "type": "doc",
            "version": 1,
            "content": [paragraph(text("Fixed in 2.3.1.")), paragraph(text("Please retest."))],
        },
        "visibility": {"type": "role", "value": "Developers"},
    }
    assert result.output == comment and result.executor == "bespoke"


def test_jira_errors_name_jiras_reason(manager, api):
    """Jira's ErrorCollection ({"errorMessages": [...], "errors": {field: message}}) and
    its plain-text 401 (with X-Seraph-LoginReason) end as http_error naming them; neither
    the API token nor the email reaches the error."""
    params = {"project": "ED", "issue_type": "Bug", "summary": "x"}
    cases = [
        (400, {"errorMessages": [], "errors": {"issuetype": "Specify a valid issue type"}}, {},
         ["issuetype: Specify a valid issue type"]),
        (404, {"errorMessages": ["Issue does not exist or you do not have permission to see it."],
               "errors": {}}, {}, ["Issue does not exist"]),
        (401, "Client must be authenticated to access this resource.",
         {"x-seraph-loginreason": "AUTHENTICATED_FAILED"},
         ["Client must be authenticated", "AUTHENTICATED_FAILED"]),
    ]  # fmt: skip
    for status, body, headers, named in cases:
        api.answer("POST", "/rest/api/3/issue", body, status=status, headers=headers)
        with pytest.raises(corral.HttpError) as caught:
            run(manager, "jira", "create_issue", params, jira(api))
        assert caught.value.status == status
        assert "Jira create issue failed" in caught.value.message
        for part in named:
            assert part in caught.value.message, caught.value.message
        assert_no_secret(JIRA_TOKEN, caught.value)
        assert_no_secret(JIRA_EMAIL, caught.value)


def test_jira_refuses_what_it_cannot_send_before_any_request(manager, api):
    """A field given both as a param and in `fields`, a connection without the site's
    baseUrl, or one without the API token: a clear code_error, and nothing is sent."""
    twice = {"project": "ED", "issue_type": "Bug", "summary": "x", "fields": {"labels": ["a"]}}
    twice["labels"] = ["b"]
    no_site = {"credentials": {"username": JIRA_EMAIL, "password": JIRA_TOKEN}}
    no_token = {"baseUrl": api.url, "credentials": {"username": JIRA_EMAIL}}
    params = {"project": "ED", "issue_type": "Bug", "summary": "x"}
    for call, connection, named in [
        (twice, jira(api), "'labels' is given twice"),
        (params, no_site, "needs a baseUrl"),
        (params, no_token, "credentials.password"),
    ]:
        with pytest.raises(corral.CodeError) as caught:
            run(manager, "jira", "create_issue", call, connection)
        assert named in caught.value.message, caught.value.message
        assert_no_secret(JIRA_TOKEN, caught.value)
    assert api.seen == []


def test_jira_get_issue_is_generic(manager, api):
    """get_issue (generic only): GET /rest/api/3/issue/{issueIdOrKey} with fields and
    expand as query and the same Basic auth as the handlers."""
    params = {"issueIdOrKey": "ED-24", "fields": "summary,status", "expand": "names"}
    assert_not_supported_without_flag(manager, api, "jira", "get_issue", params, jira(api))
    issue = {"id": "10000", "key": "ED-24", "fields": {"summary": "Checkout fails"}}
    api.answer("GET", "/rest/api/3/issue/ED-24", issue)
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        result = run(manager, "jira", "get_issue", params, jira(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.body) == ("GET", "/rest/api/3/issue/ED-24", "")
    assert seen.query == {"fields": ["summary,status"], "expand": ["names"]}
    assert seen.headers["authorization"] == jira_basic()
    assert_generic(result)
    assert result.output["data"] == issue
    assert_no_secret(JIRA_TOKEN, result)


# -- SendGrid -----------------------------------------------------------------------------


def test_sendgrid_send_mail_builds_the_mail_send_request(manager, api):
    """send_mail (bespoke): POST /v3/mail/send with the bearer key and one personalization
    (to, cc, bcc), text/plain before text/html; SendGrid's 202 with no body becomes
    {"accepted": true, "status": 202, "message_id": <X-Message-Id>}."""
    api.answer("POST", "/v3/mail/send", "", status=202, headers={"x-message-id": "W9d4Qp1sTnK"})
    params = {
        "from": {"email": "alerts@acme.example", "name": "Acme Alerts"},
        "to": ["ops@acme.example", {"email": "cto@acme.example", "name": "CTO"}],
        "cc": ["audit@acme.example"],
        "bcc": ["archive@acme.example"],
        "reply_to": "support@acme.example",
        "subject": "Deploy finished",
        "text": "web 1.2.3 is live",
        "html": "<p>web <b>1.2.3</b> is live</p>",
        "categories": ["deploys"],
        "custom_args": {"run_id": "r-42"},
    }
    result = run(manager, "sendgrid", "send_mail", params, sendgrid(api))
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/v3/mail/send", {})
    assert seen.headers["authorization"] == f"Bearer {SENDGRID_KEY}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {
        "personalizations": [
            {
                "to": [{"email": "ops@acme.example"}, {"email": "cto@acme.example", "name": "CTO"}],
                "cc": [{"email": "audit@acme.example"}],
                "bcc": [{"email": "archive@acme.example"}],
            }
        ],
        "from": {"email": "alerts@acme.example", "name": "Acme Alerts"},
        "reply_to": {"email": "support@acme.example"},
        "subject": "Deploy finished",
        "content": [
            {"type": "text/plain", "value": "web 1.2.3 is live"},
            {"type": "text/html", "value": "<p>web <b>1.2.3</b> is live</p>"},
        ],
        "categories": ["deploys"],
        "custom_args": {"run_id": "r-42"},
    }
    assert result.output == {"accepted": True, "status": 202, "message_id": "W9d4Qp1sTnK"}
    assert result.executor == "bespoke"
    assert_no_secret(SENDGRID_KEY, result)


def test_sendgrid_dynamic_template_in_sandbox_mode(manager, api):
    """A dynamic template needs no subject or content: template_id at the top, its data in
    the personalization; sandbox_mode becomes mail_settings (SendGrid answers 200 there)."""
    api.answer("POST", "/v3/mail/send", "", status=200)
    template = "d-" + "0123456789abcdef" * 2
    params = {
        "from": "alerts@acme.example",
        "to": ["ops@acme.example"],
        "template_id": template,
        "dynamic_template_data": {"service": "web", "version": "1.2.3"},
        "sandbox_mode": True,
    }
    result = run(manager, "sendgrid", "send_mail", params, sendgrid(api))
    assert api.only().json() == {
        "personalizations": [
            {
                "to": [{"email": "ops@acme.example"}],
                "dynamic_template_data": {"service": "web", "version": "1.2.3"},
            }
        ],
        "from": {"email": "alerts@acme.example"},
        "template_id": template,
        "mail_settings": {"sandbox_mode": {"enable": True}},
    }
    assert result.output == {"accepted": True, "status": 200, "message_id": None}


def test_sendgrid_errors_name_sendgrids_errors(manager, api):
    """SendGrid's {"errors": [{"message", "field"}]} ends as http_error naming each message
    and field; a 429 takes its wait from X-RateLimit-Reset; an address repeated across
    to and cc is refused before anything is sent."""
    params = {"from": "a@acme.example", "to": ["b@acme.example"], "subject": "s", "text": "t"}
    api.answer(
        "POST",
        "/v3/mail/send",
        {
            "errors": [
                {
                    "message": "The from address does not match a verified Sender Identity.",
                    "field": "from",
                    "help": None,
                }
            ]
        },
        status=403,
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "sendgrid", "send_mail", params, sendgrid(api))
    assert caught.value.status == 403
    assert "does not match a verified Sender Identity. (field from)" in caught.value.message
    assert_no_secret(SENDGRID_KEY, caught.value)

    reset = "4102444800"  # 2100-01-01: far enough ahead that the wait is positive
    api.answer(
        "POST",
        "/v3/mail/send",
        {"errors": [{"field": None, "message": "too many requests"}]},
        status=429,
        headers={"x-ratelimit-reset": reset},
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "sendgrid", "send_mail", params, sendgrid(api))
    assert caught.value.status == 429 and "too many requests" in caught.value.message
    assert caught.value.retry_after_s is not None and caught.value.retry_after_s > 0

    sent = len(api.seen)
    twice = {**params, "cc": ["B@acme.example"]}
    with pytest.raises(corral.CodeError) as refused:
        run(manager, "sendgrid", "send_mail", twice, sendgrid(api))
    assert "once across to, cc and bcc" in refused.value.message
    assert len(api.seen) == sent


# -- PagerDuty ----------------------------------------------------------------------------

PD_ACCEPTED = {"status": "success", "message": "Event processed", "dedup_key": "web-5xx-rate"}


def test_pagerduty_trigger_event_carries_the_routing_key_from_the_connection(manager, api):
    """send_event trigger (bespoke): POST /v2/enqueue with routing_key from the connection's
    credentials (no Authorization header), the PD-CEF fields under `payload`, links and
    client beside it; returns PagerDuty's answer, the routing key nowhere in it."""
    api.answer("POST", "/pd/v2/enqueue", PD_ACCEPTED, status=202)
    params = {
        "event_action": "trigger",
        "dedup_key": "web-5xx-rate",
        "summary": "5xx rate above 5% on web",
        "source": "web-01.acme.example",
        "severity": "critical",
        "component": "nginx",
        "group": "web",
        "class": "error rate",
        "custom_details": {"rate": 0.07},
        "links": [{"href": "https://grafana.acme.example/d/web", "text": "Dashboard"}],
        "client": "corral",
    }
    connection = {**pagerduty(api), "baseUrl": api.url + "/pd"}
    result = run(manager, "pagerduty", "send_event", params, connection)
    seen = api.only()
    assert (seen.method, seen.path, seen.query) == ("POST", "/pd/v2/enqueue", {})
    assert "authorization" not in seen.headers
    assert seen.headers["content-type"] == "application/json"
    assert seen.json() == {
        "routing_key": PD_ROUTING_KEY,
        "event_action": "trigger",
        "dedup_key": "web-5xx-rate",
        "links": [{"href": "https://grafana.acme.example/d/web", "text": "Dashboard"}],
        "client": "corral",
        "payload": {
            "summary": "5xx rate above 5% on web",
            "source": "web-01.acme.example",
            "severity": "critical",
            "component": "nginx",
            "group": "web",
            "class": "error rate",
            "custom_details": {"rate": 0.07},
        },
    }
    assert result.output == PD_ACCEPTED and result.executor == "bespoke"
    assert_no_secret(PD_ROUTING_KEY, result)
    assert_no_secret(PD_API_KEY, result)


def test_pagerduty_acknowledge_and_resolve_send_only_the_dedup_key(manager, api):
    """acknowledge and resolve carry routing_key, event_action and dedup_key only; payload
    fields given with them are left out, and the log says so."""
    api.answer("POST", "/v2/enqueue", PD_ACCEPTED, status=202)
    ack = {"event_action": "acknowledge", "dedup_key": "web-5xx-rate"}
    resolve = {"event_action": "resolve", "dedup_key": "web-5xx-rate", "summary": "fixed"}
    run(manager, "pagerduty", "send_event", ack, pagerduty(api))
    resolved = run(manager, "pagerduty", "send_event", resolve, pagerduty(api))
    first, second = api.seen
    assert first.json() == {**ack, "routing_key": PD_ROUTING_KEY}
    assert second.json() == {
        "routing_key": PD_ROUTING_KEY,
        "event_action": "resolve",
        "dedup_key": "web-5xx-rate",
    }
    assert any("trigger events only" in entry.message for entry in resolved.execution.logs)


def test_pagerduty_errors_name_pagerdutys_reason(manager, api):
    """PagerDuty's {"status", "message", "errors"} ends as http_error naming them (a 429 is
    kept as 429, which is retried); without a routing key nothing is sent."""
    params = {"event_action": "resolve", "dedup_key": "web-5xx-rate"}
    api.answer(
        "POST",
        "/v2/enqueue",
        {
            "status": "invalid event",
            "message": "Event object is invalid",
            "errors": ["Length of 'routing_key' is incorrect (should be 32 characters)"],
        },
        status=400,
    )
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "pagerduty", "send_event", params, pagerduty(api))
    assert caught.value.status == 400
    for part in ("resolve event failed", "invalid event: Event object is invalid",
                 "Length of 'routing_key' is incorrect"):  # fmt: skip
        assert part in caught.value.message, caught.value.message
    assert_no_secret(PD_ROUTING_KEY, caught.value)

    api.answer("POST", "/v2/enqueue", {"status": "throttle event", "message": "Too many"}, 429)
    with pytest.raises(corral.HttpError) as caught:
        run(manager, "pagerduty", "send_event", params, pagerduty(api))
    assert caught.value.status == 429 and "throttle event" in caught.value.message

    sent = len(api.seen)
    rest_only = {"baseUrl": api.url, "credentials": {"api_key": PD_API_KEY}}
    with pytest.raises(corral.CodeError) as refused:
        run(manager, "pagerduty", "send_event", params, rest_only)
    assert "credentials.routing_key" in refused.value.message
    assert len(api.seen) == sent


def test_pagerduty_list_incidents_is_generic_with_token_auth(manager, api):
    """list_incidents (generic only): GET /incidents with PagerDuty's array params
    (statuses[] repeated), `Authorization: Token token=<api_key>` and the v2 media type."""
    params = {"statuses[]": ["triggered", "acknowledged"], "urgencies[]": ["high"], "limit": 25}
    connection = pagerduty(api)
    assert_not_supported_without_flag(
        manager, api, "pagerduty", "list_incidents", params, connection
    )
    listing = {"incidents": [{"id": "PT4KHLK", "status": "triggered"}], "more": False}
    api.answer("GET", "/incidents", listing)
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        result = run(manager, "pagerduty", "list_incidents", params, connection)
    seen = api.only()
    assert (seen.method, seen.path, seen.body) == ("GET", "/incidents", "")
    assert seen.query == {
        "statuses[]": ["triggered", "acknowledged"],
        "urgencies[]": ["high"],
        "limit": ["25"],
    }
    assert seen.headers["authorization"] == f"Token token={PD_API_KEY}"
    assert seen.headers["accept"] == "application/vnd.pagerduty+json;version=2"
    assert_generic(result)
    assert result.output["data"] == listing
    assert_no_secret(PD_API_KEY, result)
    assert_no_secret(PD_ROUTING_KEY, result)


# -- the params contract ------------------------------------------------------------------

TEMPLATE = "d-" + "0" * 32
INVALID = [
    ("gitlab", "create_issue", {"id": "acme/web"}, "'title' is a required"),
    ("gitlab", "create_issue", {"id": "web", "title": "x"}, "params['id']"),
    ("gitlab", "create_issue", {"id": 4, "title": "x", "labels": ["bug"]}, "params['labels']"),
    ("gitlab", "add_note", {"id": 4, "issue_iid": 0, "body": "x"}, "params['issue_iid']"),
    ("gitlab", "new_issue", {"id": 4, "updated_after": "yesterday"}, "yesterday"),
    ("gitlab", "list_projects", {"per_page": 500}, "500"),
    ("jira", "create_issue", {"project": "ED", "summary": "x"}, "'issue_type' is a required"),
    ("jira", "create_issue", {"project": "ED", "issue_type": "Bug", "summary": "a\nb"},
     "params['summary']"),
    ("jira", "add_comment", {"issueIdOrKey": "ED 24", "body": "x"}, "ED 24"),
    ("jira", "add_comment", {"issueIdOrKey": "ED-24", "body": "  \n "}, "params['body']"),
    ("jira", "get_issue", {"issueIdOrKey": "ED-24", "expand": ""}, "params['expand']"),
    ("sendgrid", "send_mail", {"from": "a@b.co", "to": ["c@d.co"], "subject": "no body"},
     "params"),
    ("sendgrid", "send_mail", {"from": "a@b.co", "to": ["not-an-address"], "template_id": TEMPLATE},
     "params['to'][0]"),
    ("sendgrid", "send_mail", {"to": ["c@d.co"], "template_id": TEMPLATE}, "'from' is a required"),
    ("pagerduty", "send_event", {"event_action": "trigger", "summary": "x", "source": "y"},
     "'severity' is a required"),
    ("pagerduty", "send_event", {"event_action": "resolve"}, "'dedup_key' is a required"),
    ("pagerduty", "send_event", {"event_action": "resolve", "dedup_key": "k",
                                 "routing_key": PD_ROUTING_KEY[::-1]}, "routing_key"),
    ("pagerduty", "list_incidents", {"statuses[]": ["open"]}, "open"),
]  # fmt: skip


def test_schema_violations_are_invalid_input_before_any_request(manager, api):
    """A payload that breaks a function's params schema is invalid_input naming the problem,
    and nothing runs: the server sees no request, with the generic path on or off."""
    connections = {
        "gitlab": gitlab(api),
        "jira": jira(api),
        "sendgrid": sendgrid(api),
        "pagerduty": pagerduty(api),
    }
    for flag in (False, True):
        with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=flag):
            for app, function, params, named in INVALID:
                with pytest.raises(corral.InvalidInput) as caught:
                    run(manager, app, function, params, connections[app])
                assert caught.value.type == "invalid_input"
                assert f"{app}.{function}" in caught.value.message
                assert named in caught.value.message, caught.value.message
    assert api.seen == []


# -- the catalog --------------------------------------------------------------------------


def test_the_new_apps_say_which_functions_are_bespoke(framework):
    """The split these apps promise: bespoke where the API needs code (ADF, Mail Send's
    shape and empty 202, the events host and routing key, GitLab's error shapes), generic
    for plain reads and the GitLab trigger."""
    split = {}
    for app in NEW_APPS:
        connector = framework.connector(app)
        functions = [*connector.actions, *connector.triggers]
        split[app] = {f: connector.handler(f) is not None for f in functions}
    assert split == {
        "gitlab": {"create_issue": True, "add_note": True, "get_project": False,
                   "list_projects": False, "new_issue": False},
        "jira": {"create_issue": True, "add_comment": True, "get_issue": False},
        "sendgrid": {"send_mail": True},
        "pagerduty": {"send_event": True, "list_incidents": False},
    }  # fmt: skip
    trigger = framework.connector("gitlab").operation("new_issue")
    assert trigger.dedupe == {
        "strategy": "cursor",
        "cursor": "$.updated_at",
        "key": "$.id",
        "param": "updated_after",
    }


def test_the_registry_lists_generic_only_functions_only_with_the_flag(framework):
    """With the flag off the registry lists the new apps' bespoke functions only; with it
    on their generic reads too. send_event has no HTTP metadata (the generic path could
    not reach the events host): it never gets a generic fallback."""
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=False):
        off = capabilities(framework)
    with corral.FLAGS.override(GENERIC_EXECUTOR_ENABLED=True):
        on = capabilities(framework)
    assert set(off["gitlab"]["actions"]) == {"create_issue", "add_note"}
    assert off["gitlab"]["triggers"] == {}
    assert set(off["jira"]["actions"]) == {"create_issue", "add_comment"}
    assert set(off["pagerduty"]["actions"]) == {"send_event"}
    assert set(on["gitlab"]["actions"]) == {"create_issue", "add_note", "get_project",
                                             "list_projects"}  # fmt: skip
    assert on["gitlab"]["triggers"]["new_issue"]["executor"] == "generic"
    assert on["jira"]["actions"]["get_issue"]["executor"] == "generic"
    assert on["pagerduty"]["actions"]["list_incidents"]["executor"] == "generic"
    assert on["pagerduty"]["actions"]["send_event"] == {
        "runtimes": ["python"],
        "executor": "bespoke",
        "fallback": None,
    }


def test_the_shipped_catalog_passes_validate_and_both_checks():
    """At least eight apps ship, and `corral catalog validate`, `backfill-actions --check`
    and `seed-trigger-fallbacks --check` all exit 0 on the shipped catalog."""
    folders = Path(SHIPPED_CATALOG).iterdir()
    apps = sorted(p.name for p in folders if (p / "connector.json").is_file())
    assert len(apps) >= 8 and set(NEW_APPS) <= set(apps)
    for command in (
        ["validate"],
        ["backfill-actions", "--check"],
        ["seed-trigger-fallbacks", "--check"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "corral", "catalog", *command],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, (command, done.stdout, done.stderr)
        if command == ["validate"]:
            assert f"{len(apps)} apps checked" in done.stdout and "all valid" in done.stdout
