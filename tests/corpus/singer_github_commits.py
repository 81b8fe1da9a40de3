"""A Singer tap for GitHub commits (tap-github's style): SCHEMA, RECORD and STATE messages,
Link-header pagination, a bookmark kept as the newest commit date."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import json
import re
from datetime import UTC, datetime

LINK_RE = re.compile(r'<([^>]+)>;\s*rel="([a-z]+)"')
DATE_FORMAT = "%Y-%m-%dT%H:%M:%SZ"

SCHEMA = {
    "type": "object",
    "properties": {
        "sha": {"type": "string"},
        "author": {"type": ["null", "string"]},
        "committed_at": {"type": "string", "format": "date-time"},
    },
}


def parse_link_header(value):
    return {rel: url for url, rel in LINK_RE.findall(value or "")}


def parse_dt(text):
    return datetime.strptime(text, DATE_FORMAT).replace(tzinfo=UTC)


def write_message(messages, kind, **fields):
    message = {"type": kind}
    message.update(fields)
    messages.append(json.loads(json.dumps(message)))


def run(params, context):
    connection = context["connection"]
    url = "{}/repos/{}/commits?per_page={}".format(
        connection["baseUrl"], params["repository"], params.get("per_page", 2)
    )
    headers = {
        "Authorization": "token " + connection["credentials"]["token"],
        "Accept": "application/vnd.github+json",
    }
    since = parse_dt(params["state"]["bookmarks"]["commits"]["since"])
    messages = []
    write_message(messages, "SCHEMA", stream="commits", schema=SCHEMA, key_properties=["sha"])
    bookmark = since
    while url:
        resp = http.get(url, headers=headers)
        resp.raise_for_status()
        for commit in resp.json():
            committed = parse_dt(commit["commit"]["author"]["date"])
            if committed <= since:
                continue
            record = {
                "sha": commit["sha"],
                "author": commit["commit"]["author"].get("name"),
                "committed_at": committed.isoformat(),
            }
            write_message(messages, "RECORD", stream="commits", record=record)
            bookmark = max(bookmark, committed)
        url = parse_link_header(resp.headers.get("link")).get("next")
    state = {"bookmarks": {"commits": {"since": bookmark.strftime(DATE_FORMAT)}}}
    write_message(messages, "STATE", value=state)
    return messages
