"""GitLab's bespoke handlers: the GitLab REST API v4 (https://docs.gitlab.com/api/rest/).

Connector code: it runs in corral's sandbox, where `http` and `log` are provided.
Each function serves the action of the same id in connector.json, sends the
request the generic path would send from the definition, and returns what
GitLab returned (the issue, the note); what it adds is failures that name
GitLab's reason. The connection arrives as context["connection"] =
{"baseUrl": ..., "credentials": {"token": ...}}.
"""

import urllib.parse

#: connector.json's baseUrl; a connection's baseUrl (a self-managed instance) overrides it.
BASE_URL = "https://gitlab.com/api/v4"


def api_base(context):
    connection = context.get("connection") or {}
    return str(connection.get("baseUrl") or BASE_URL).rstrip("/")


def api_headers(context):
    credentials = (context.get("connection") or {}).get("credentials") or {}
    for name in ("token", "access_token", "api_key"):  # what the generic path's bearer reads
        if credentials.get(name):
            return {
                "Accept": "application/json",
                "Authorization": "Bearer " + str(credentials[name]),
            }
    raise ValueError(
        "the GitLab connection needs credentials.token (a personal, project or group access "
        "token with the api scope, or an OAuth token)"
    )


def project_path(params, *rest):
    """/projects/<id>/...: a project path such as group/project is one segment, URL-encoded."""
    parts = [params["id"], *rest]
    return "/projects/" + "/".join(urllib.parse.quote(str(part), safe="") for part in parts)


def describe(value):
    """GitLab's `message`, which is a string, a list, or {field: [problems]}, as one line."""
    if isinstance(value, dict):
        details = []
        for field, problems in value.items():
            if isinstance(problems, list):
                problems = ", ".join(str(problem) for problem in problems)
            details.append(str(field) + " " + str(problems))
        return "; ".join(details)
    if isinstance(value, list):
        return "; ".join(str(item) for item in value)
    return str(value)


def reason(response):
    """What GitLab said went wrong: `message`, or `error` (and its OAuth description)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300] or "no body"
    if not isinstance(data, dict):
        return str(data)[:300]
    if data.get("message"):
        return describe(data["message"])
    if data.get("error"):
        text = describe(data["error"])
        if data.get("error_description"):
            text = text + ": " + str(data["error_description"])
        return text
    return str(data)[:300]


def checked(response, what):
    """The JSON body of a successful response; an http_error naming GitLab's reason otherwise
    (a 429 keeps its Retry-After, so the retry policy waits as GitLab asks)."""
    status = response.status_code
    if status < 400:
        return response.json()
    raise http.HTTPStatusError(
        "GitLab " + what + " failed with HTTP " + str(status) + ": " + reason(response),
        status,
        response.headers.get("retry-after"),
    )


def create_issue(params, context):
    """POST /projects/{id}/issues: the new issue (id, iid, web_url, ...)."""
    body = {name: value for name, value in params.items() if name != "id"}
    log("gitlab: creating an issue in project " + str(params["id"]))
    response = http.post(
        api_base(context) + project_path(params, "issues"), headers=api_headers(context), json=body
    )
    issue = checked(response, "create issue")
    log("gitlab: created issue #" + str(issue.get("iid")) + " (" + str(issue.get("web_url")) + ")")
    return issue


def add_note(params, context):
    """POST /projects/{id}/issues/{issue_iid}/notes: the new note."""
    body = {"body": params["body"]}
    if "internal" in params:
        body["internal"] = params["internal"]
    url = api_base(context) + project_path(params, "issues", params["issue_iid"], "notes")
    log("gitlab: adding a note to " + str(params["id"]) + "#" + str(params["issue_iid"]))
    response = http.post(url, headers=api_headers(context), json=body)
    return checked(response, "add note")
