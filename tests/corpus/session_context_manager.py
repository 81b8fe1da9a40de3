"""A session object used as a context manager: it sets default headers, counts requests and
records on __exit__ whether the block ended with an error."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)


class ApiSession:
    def __init__(self, base_url, token):
        self.base_url = base_url
        self.headers = {"Authorization": "Bearer " + token, "User-Agent": "corral-corpus/1.0"}
        self.sent = 0
        self.closed = False
        self.error = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.closed = True
        self.error = None if exc is None else getattr(exc, "status_code", str(exc))
        return False

    def request(self, method, path, **kwargs):
        headers = dict(self.headers, **kwargs.pop("headers", {}))
        self.sent += 1
        return http.request(method, self.base_url + path, headers=headers, **kwargs)


def run(params, context):
    connection = context["connection"]
    session = ApiSession(connection["baseUrl"], connection["credentials"]["token"])
    with session as s:
        created = s.request("POST", "/echo/tasks", json={"title": params["title"]}).json()
        fetched = s.request("GET", "/echo/tasks/1", headers={"X-Trace": "abc"}).json()
    try:
        with session as s:
            s.request("GET", "/status/404").raise_for_status()
    except http.HTTPStatusError:
        pass
    return {
        "sent": session.sent,
        "closed": session.closed,
        "error": session.error,
        "created": created["json"],
        "agent": fetched["headers"]["user-agent"],
        "trace": fetched["headers"]["x-trace"],
    }
