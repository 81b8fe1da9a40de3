"""Jira Cloud's bespoke handlers: the Jira Cloud platform REST API v3
(https://developer.atlassian.com/cloud/jira/platform/rest/v3/intro/).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Version 3 takes rich text (an issue's description, a comment's body) only in
the Atlassian Document Format (ADF,
https://developer.atlassian.com/cloud/jira/platform/apis/document/structure/):
`document` builds it from plain text. The connection is the site and an
account: {"baseUrl": "https://your-domain.atlassian.net", "credentials":
{"username": "<email>", "password": "<API token>"}}, sent as HTTP Basic.
"""

import base64
import re
import urllib.parse

#: Blank lines (spaces allowed), one or more, end a paragraph.
PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t]*\n)+")
NUMERIC_ID = re.compile(r"^[0-9]+$")


def site(context):
    """The site's URL: Jira Cloud has one per customer, so the connection must name it."""
    base = str((context.get("connection") or {}).get("baseUrl") or "").rstrip("/")
    if not base:
        raise ValueError(
            "the Jira connection needs a baseUrl: the site, such as "
            "https://your-domain.atlassian.net"
        )
    return base


def api_headers(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    email = credentials.get("username") or credentials.get("user")
    token = credentials.get("password")
    if not email or not token:
        raise ValueError(
            "the Jira connection needs credentials.username (the Atlassian account's email) "
            "and credentials.password (an API token from "
            "https://id.atlassian.com/manage-profile/security/api-tokens)"
        )
    pair = (str(email) + ":" + str(token)).encode("utf-8")
    return {
        "Authorization": "Basic " + base64.b64encode(pair).decode("ascii"),
        "Accept": "application/json",
    }


def document(text):
    """Plain text as an ADF document: paragraphs split on blank lines, line breaks kept."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = []
    for part in PARAGRAPH_BREAK.split(text):
        lines = part.strip("\n").split("\n")
        if not "".join(lines).strip():
            continue
        content = []
        for index, line in enumerate(lines):
            if index:
                content.append({"type": "hardBreak"})
            if line:  # ADF refuses an empty text node
                content.append({"type": "text", "text": line})
        paragraphs.append({"type": "paragraph", "content": content})
    return {"type": "doc", "version": 1, "content": paragraphs}


def reference(value, name="name"):
    """Jira's way to point at a thing: {"id": ...} for a numeric id, else {name: value}."""
    value = str(value)
    return {"id": value} if NUMERIC_ID.match(value) else {name: value}


def reason(response):
    """Jira's errorMessages and field errors, as one line."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        text = response.text.strip()[:300] or "no body"
    else:
        parts = [str(message) for message in data.get("errorMessages") or []]
        errors = data.get("errors")
        if isinstance(errors, dict):
            parts.extend(str(field) + ": " + str(message) for field, message in errors.items())
        text = "; ".join(parts) or str(data)[:300]
    login = response.headers.get("x-seraph-loginreason")
    if login:  # why Jira refused the login (AUTHENTICATED_FAILED, AUTHENTICATION_DENIED, ...)
        text = text + " (login: " + login + ")"
    return text


def checked(response, what):
    """The JSON body of a successful response; an http_error naming Jira's reason otherwise."""
    status = response.status_code
    if status < 400:
        return response.json()
    raise http.HTTPStatusError(
        "Jira " + what + " failed with HTTP " + str(status) + ": " + reason(response),
        status,
        response.headers.get("retry-after"),
    )


def issue_fields(params):
    """The `fields` object of a create request, from the params."""
    fields = {
        "project": reference(params["project"], "key"),
        "issuetype": reference(params["issue_type"]),
        "summary": params["summary"],
    }
    if params.get("description"):
        fields["description"] = document(params["description"])
    if "labels" in params:
        fields["labels"] = params["labels"]
    if params.get("priority"):
        fields["priority"] = reference(params["priority"])
    if params.get("assignee_account_id"):
        fields["assignee"] = {"accountId": params["assignee_account_id"]}
    if params.get("parent"):
        fields["parent"] = reference(params["parent"], "key")
    if "components" in params:
        fields["components"] = [{"name": name} for name in params["components"]]
    if params.get("due_date"):
        fields["duedate"] = params["due_date"]
    for name, value in (params.get("fields") or {}).items():
        if name in fields:
            raise ValueError(
                "the field " + repr(name) + " is given twice: as a param and in `fields`"
            )
        fields[name] = value
    return fields


def create_issue(params, context):
    """POST /rest/api/3/issue: Jira's answer (id, key, self) and url, the issue's page."""
    base = site(context)
    body = {"fields": issue_fields(params)}
    log("jira: creating a " + params["issue_type"] + " in project " + params["project"])
    response = http.post(base + "/rest/api/3/issue", headers=api_headers(context), json=body)
    created = checked(response, "create issue")
    if isinstance(created, dict) and created.get("key"):
        created["url"] = base + "/browse/" + str(created["key"])
        log("jira: created " + str(created["key"]))
    return created


def add_comment(params, context):
    """POST /rest/api/3/issue/{issueIdOrKey}/comment: the comment (id, body, author, ...)."""
    body = {"body": document(params["body"])}
    if params.get("visibility"):
        body["visibility"] = params["visibility"]
    issue = urllib.parse.quote(params["issueIdOrKey"], safe="")
    url = site(context) + "/rest/api/3/issue/" + issue + "/comment"
    log("jira: commenting on " + params["issueIdOrKey"])
    response = http.post(url, headers=api_headers(context), json=body)
    return checked(response, "add comment")
