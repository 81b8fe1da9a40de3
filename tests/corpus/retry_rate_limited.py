"""A client that backs off on 429 Too Many Requests, honouring Retry-After, the way most
hand-written connectors do it."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import time


class RateLimitedClient:
    def __init__(self, base_url, token, max_retries=5):
        self.base_url = base_url
        self._token = token
        self.max_retries = max_retries
        self.attempts = 0
        self.statuses = []

    def get(self, path):
        while True:
            self.attempts += 1
            response = http.get(
                self.base_url + path, headers={"Authorization": "Bearer " + self._token}
            )
            self.statuses.append(response.status_code)
            try:
                return response.raise_for_status().json()
            except http.HTTPStatusError as exc:
                if exc.status_code != 429 or self.attempts > self.max_retries:
                    raise
                delay = float(exc.retry_after or 0.05)
                log("rate limited, retrying in", delay, "s")
                time.sleep(min(delay, 0.05))


def run(params, context):
    connection = context["connection"]
    client = RateLimitedClient(connection["baseUrl"], connection["credentials"]["token"])
    body = client.get("/flaky/" + params["request_id"] + "?fail=2&status=429")
    return {"attempts": client.attempts, "statuses": client.statuses, "items": body["items"]}
