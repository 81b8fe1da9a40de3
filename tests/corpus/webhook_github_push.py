"""A GitHub push webhook: check X-Hub-Signature-256, then reshape the push into what the
next step of the workflow wants."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import hashlib
import hmac
import json
from collections import Counter


def valid_signature(secret, body, header):
    digest = hmac.new(secret.encode("utf-8"), body.encode("utf-8"), hashlib.sha256)
    return hmac.compare_digest("sha256=" + digest.hexdigest(), header or "")


def run(params, context):
    connection = context["connection"]
    delivery = http.get(connection["baseUrl"] + "/webhooks/github")
    body = delivery.text
    if delivery.headers.get("x-github-event") != "push":
        return {"skipped": delivery.headers.get("x-github-event")}
    if not valid_signature(
        connection["credentials"]["webhook_secret"],
        body,
        delivery.headers.get("x-hub-signature-256"),
    ):
        raise ValueError("bad signature")
    parsed = 0
    try:
        push = json.loads(body)
        parsed = 1
    except ValueError as exc:
        return {"error": str(exc)}
    finally:
        log("payload parsed:", bool(parsed))
    authors = Counter(c["author"]["username"] for c in push["commits"])
    return {
        "branch": push["ref"].rsplit("/", 1)[-1],
        "commits": [
            {"id": c["id"][:7], "title": c["message"].splitlines()[0]} for c in push["commits"]
        ],
        "authors": dict(authors.most_common()),
        "forced": push["forced"],
    }
