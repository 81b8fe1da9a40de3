"""A retry decorator with exponential backoff around a flaky report endpoint (503 twice).
functools.wraps is not in corral's functools view, so the decorator is plain closures."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import time

RETRYABLE = (429, 500, 502, 503, 504)


def retry(times=4, base_delay=0.01, factor=2):
    def decorator(func):
        delays = []

        def wrapper(*args, **kwargs):
            attempt = 0
            while True:
                attempt += 1
                try:
                    return func(*args, **kwargs), attempt, list(delays)
                except http.HTTPStatusError as exc:
                    if exc.status_code not in RETRYABLE or attempt >= times:
                        raise
                except http.HTTPError:
                    if attempt >= times:
                        raise
                delay = base_delay * factor ** (attempt - 1)
                delays.append(delay)
                time.sleep(delay)

        return wrapper

    return decorator


@retry(times=5)
def fetch_report(url, token):
    response = http.get(url, headers={"Authorization": "Bearer " + token})
    return response.raise_for_status().json()


def run(params, context):
    connection = context["connection"]
    url = connection["baseUrl"] + "/flaky/" + params["request_id"] + "?fail=2&status=503"
    report, attempts, delays = fetch_report(url, connection["credentials"]["token"])
    return {"items": report["items"], "attempts": attempts, "delays": delays}
