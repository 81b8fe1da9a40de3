"""GenericExecutor: manifest-driven HTTP, run inside the sandbox like any connector.

Host side builds the request description from the definition (DESIGN §8);
`GENERIC_SOURCE` is connector code that runs in NodeSandbox: it fills the
endpoint's path from the params, sends the rest as query (GET, DELETE, HEAD)
or JSON body, applies the auth from the connection's credentials, sends it
through the brokered `http` (so the egress policy, limits and heartbeat
apply), and normalises the response to `{"status", "headers", "data"}`. An
HTTP error status ends it as `http_error` carrying the status.
"""

from __future__ import annotations

from typing import Any

from corral.executors._catalog import Connector, Operation
from corral.executors._schema import CREDENTIAL_NAMES

ENTRY_POINT = "run"

GENERIC_SOURCE = (
    f"CREDENTIAL_NAMES = {CREDENTIAL_NAMES!r}\n"
    + """
import base64
import re
import urllib.parse

PLACEHOLDER = re.compile(r"[{]([A-Za-z][A-Za-z0-9_]*)[}]")
QUERY_METHODS = ("GET", "DELETE", "HEAD")


def credential(credentials, names):
    for name in names:
        value = credentials.get(name)
        if value:
            return str(value)
    raise ValueError("the connection's credentials need one of: " + ", ".join(names))


def authorise(auth, credentials, headers, query):
    kind = (auth or {}).get("type", "none")
    if kind == "none":
        return
    if kind == "bearer":
        token = credential(credentials, CREDENTIAL_NAMES["bearer"])
        headers["Authorization"] = "Bearer " + token
    elif kind == "basic":
        user = credential(credentials, CREDENTIAL_NAMES["basic"])
        password = str(credentials.get("password") or "")
        pair = (user + ":" + password).encode("utf-8")
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    elif kind == "header":
        value = credential(credentials, CREDENTIAL_NAMES["header"])
        headers[auth.get("name") or "X-API-Key"] = (auth.get("prefix") or "") + value
    elif kind == "query":
        query[auth.get("name") or "api_key"] = credential(credentials, CREDENTIAL_NAMES["query"])
    else:
        raise ValueError("unknown auth type " + repr(kind))


def run(params, context):
    request = context["request"]
    connection = context.get("connection") or {}
    base = (connection.get("baseUrl") or request.get("baseUrl") or "").rstrip("/")
    if not base:
        raise ValueError("no baseUrl: set it in the connector definition or the connection")
    rest = dict(params)
    used = []

    def fill(match):
        name = match.group(1)
        if name not in rest:
            raise ValueError("the endpoint needs the param " + repr(name))
        used.append(name)
        segment = urllib.parse.quote(str(rest[name]), safe="")
        if segment in (".", ".."):  # a dot segment would climb the path: send it encoded
            segment = segment.replace(".", "%2E")
        return segment

    path = PLACEHOLDER.sub(fill, request["endpoint"])
    for name in used:
        rest.pop(name)
    headers = {"Accept": "application/json"}
    headers.update(request.get("headers") or {})
    query = {}
    method = request["method"]
    body = None
    if method in QUERY_METHODS:
        for name, value in rest.items():
            if value is not None:
                query[name] = value
    elif rest:
        body = rest
    authorise(request.get("auth"), connection.get("credentials") or {}, headers, query)
    options = {"headers": headers, "params": query or None}
    if body is not None:
        options["json"] = body
    response = http.request(method, base + path, **options)
    response.raise_for_status()
    data = response.text
    if "json" in response.headers.get("content-type", "") and data:
        data = response.json()
    return {"status": response.status_code, "headers": response.headers, "data": data}
"""
)


def generic_request(connector: Connector, operation: Operation) -> dict[str, Any]:
    """What GENERIC_SOURCE needs to know of the definition: `context["request"]`."""
    headers = {**connector.headers, **(operation.definition.get("headers") or {})}
    return {
        "method": operation.method,
        "endpoint": operation.endpoint,
        "baseUrl": connector.base_url,
        "auth": connector.auth,
        "headers": headers,
    }
