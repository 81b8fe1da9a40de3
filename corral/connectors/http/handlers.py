"""The generic HTTP request app: one request to a URL the egress policy allows.

Connector code: it runs in corral's sandbox, where `http` and `log` are provided;
the deployment's egress policy decides where a request may go. The connection
is optional. Its credentials go only to its baseUrl's origin (scheme, host and
port): a URL that a workflow builds from untrusted input cannot carry them to
another host.
"""

import base64
import urllib.parse


def origin(url):
    parts = urllib.parse.urlsplit(url)
    return (parts.scheme.lower(), parts.netloc.lower())


def resolve(url, base):
    """`url` when absolute; else `url` relative to the connection's baseUrl."""
    if url.lower().startswith(("http://", "https://")):
        return url
    if not base:
        raise ValueError(
            "url must be an absolute http:// or https:// URL (the connection has no baseUrl "
            "to resolve " + repr(url[:200]) + " against)"
        )
    return base.rstrip("/") + "/" + url.lstrip("/")


def authorise(headers, credentials):
    """The connection's credentials as an Authorization header, unless one is set."""
    if any(name.lower() == "authorization" for name in headers):
        return
    if credentials.get("token"):
        headers["Authorization"] = "Bearer " + str(credentials["token"])
    elif credentials.get("username"):
        pair = str(credentials["username"]) + ":" + str(credentials.get("password") or "")
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode("utf-8")).decode("ascii")


def text_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def decoded(response):
    """The response body: parsed JSON when it says it is JSON (and is), else text."""
    if "json" in response.headers.get("content-type", "").lower() and response.text:
        try:
            return response.json()
        except ValueError:
            return response.text
    return response.text


def request(params, context):
    """Send the request; {"status", "headers", "data"}."""
    connection = context.get("connection") or {}
    base = str(connection.get("baseUrl") or "")
    url = resolve(params["url"], base)
    method = params.get("method") or "GET"
    headers = dict(params.get("headers") or {})
    credentials = connection.get("credentials") or {}
    if credentials:
        if base and origin(url) == origin(base):
            authorise(headers, credentials)
        else:
            log("http: the connection's credentials were not sent: the url is not on its baseUrl")
    options = {"headers": headers}
    query = params.get("query")
    if query:
        options["params"] = {
            name: [text_value(item) for item in value]
            if isinstance(value, list)
            else text_value(value)
            for name, value in query.items()
        }
    body = params.get("body")
    if body is not None:
        body_type = params.get("body_type") or ("text" if isinstance(body, str) else "json")
        if body_type == "json":
            options["json"] = body
        elif body_type == "form":
            if not isinstance(body, dict):
                raise ValueError("body_type form needs body to be an object of fields")
            options["data"] = {name: text_value(value) for name, value in body.items()}
        else:
            if not isinstance(body, str):
                raise ValueError("body_type text needs body to be a string")
            options["data"] = body
    if params.get("timeout_s"):
        options["timeout"] = params["timeout_s"]
    response = http.request(method, url, **options)
    log("http: " + method + " " + url.split("?")[0] + " answered " + str(response.status_code))
    if params.get("fail_on_error", True):
        response.raise_for_status()
    return {"status": response.status_code, "headers": response.headers, "data": decoded(response)}
