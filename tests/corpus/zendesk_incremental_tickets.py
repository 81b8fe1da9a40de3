"""Zendesk's cursor-based incremental ticket export: `start_time` first, then `cursor`,
until `end_of_stream`; hours each ticket stayed open, and the state to resume from."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

from datetime import UTC, datetime, timedelta


def to_dt(value):
    return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def run(params, context):
    connection = context["connection"]
    url = connection["baseUrl"] + "/api/v2/incremental/tickets/cursor.json"
    creds = connection["credentials"]
    auth = {"Authorization": "Bearer " + creds["token"]}
    start = datetime.fromisoformat(params["start"]).astimezone(UTC)
    query = {"start_time": int(start.timestamp()), "per_page": 2}
    rows, pages = [], 0
    while True:
        body = http.get(url, params=query, headers=auth).raise_for_status().json()
        pages = pages + 1
        for ticket in body["tickets"]:
            opened = to_dt(ticket["created_at"])
            closed = to_dt(ticket["updated_at"]) if ticket["status"] == "solved" else None
            open_for = (closed - opened) if closed else None
            rows.append(
                {
                    "id": ticket["id"],
                    "hours_open": round(open_for / timedelta(hours=1), 2) if open_for else None,
                    "week": opened.isocalendar()[1],
                }
            )
        if body["end_of_stream"]:
            break
        query = {"cursor": body["after_cursor"]}
    return {"tickets": rows, "pages": pages, "state": {"cursor": body["after_cursor"]}}
