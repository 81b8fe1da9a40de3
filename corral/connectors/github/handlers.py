"""GitHub's bespoke handlers: the GitHub REST API (https://docs.github.com/en/rest).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Each function serves the action of the same id in connector.json and returns
what GitHub returned (the issue, the comment). The connection arrives as
context["connection"] = {"baseUrl": ..., "credentials": {"token": ...}}.
"""

import time
import urllib.parse

#: connector.json's baseUrl; a connection's baseUrl (GitHub Enterprise Server) overrides it.
BASE_URL = "https://api.github.com"
API_VERSION = "2022-11-28"


def api_base(context):
    connection = context.get("connection") or {}
    return str(connection.get("baseUrl") or BASE_URL).rstrip("/")


def api_headers(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("token", "access_token", "api_key"):
        if credentials.get(name):
            return {
                "Accept": "application/vnd.github+json",
                "X-GitHub-Api-Version": API_VERSION,
                "Authorization": "Bearer " + str(credentials[name]),
            }
    raise ValueError(
        "the GitHub connection needs credentials.token (a personal access token or an "
        "installation access token)"
    )


def repo_path(params, *rest):
    parts = [params["owner"], params["repo"], *rest]
    return "/repos/" + "/".join(urllib.parse.quote(str(part), safe="") for part in parts)


def reason(response):
    """GitHub's error message and its field errors, as one line."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    if not isinstance(data, dict):
        return str(data)[:300]
    text = str(data.get("message") or "no message")
    details = []
    for error in data.get("errors") or []:
        if isinstance(error, dict):
            field = error.get("field")
            what = error.get("message") or error.get("code") or ""
            details.append((str(field) + ": " if field else "") + str(what))
        else:
            details.append(str(error))
    if details:
        text = text + " (" + "; ".join(details) + ")"
    return text


def checked(response, what):
    """The JSON body of a successful response; an http_error naming GitHub's reason otherwise.

    GitHub answers a spent primary rate limit with 403 (or 429) and
    x-ratelimit-remaining 0: that becomes a 429 whose Retry-After is the reset time,
    so the retry policy waits for it instead of giving up on a 403.
    """
    status = response.status_code
    if status < 400:
        return response.json()
    headers = response.headers
    retry_after = headers.get("retry-after")
    message = "GitHub " + what + " failed with HTTP " + str(status) + ": " + reason(response)
    if status in (403, 429) and (retry_after or headers.get("x-ratelimit-remaining") == "0"):
        if not retry_after and headers.get("x-ratelimit-reset", "").isdigit():
            retry_after = str(max(1, int(headers["x-ratelimit-reset"]) - int(time.time())))
        raise http.HTTPStatusError(message + " (rate limited)", 429, retry_after)
    raise http.HTTPStatusError(message, status, retry_after)


def create_issue(params, context):
    """POST /repos/{owner}/{repo}/issues: the new issue (number, html_url, ...)."""
    body = {"title": params["title"]}
    for name in ("body", "assignees", "labels", "milestone"):
        if name in params:
            body[name] = params[name]
    log("github: creating an issue in " + params["owner"] + "/" + params["repo"])
    response = http.post(
        api_base(context) + repo_path(params, "issues"), headers=api_headers(context), json=body
    )
    issue = checked(response, "create issue")
    log("github: created issue #" + str(issue.get("number")))
    return issue


def add_comment(params, context):
    """POST /repos/{owner}/{repo}/issues/{issue_number}/comments: the new comment."""
    url = api_base(context) + repo_path(params, "issues", params["issue_number"], "comments")
    log(
        "github: commenting on "
        + params["owner"]
        + "/"
        + params["repo"]
        + "#"
        + str(params["issue_number"])
    )
    response = http.post(url, headers=api_headers(context), json={"body": params["body"]})
    return checked(response, "add comment")
