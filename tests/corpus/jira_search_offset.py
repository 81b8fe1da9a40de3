"""Jira's issue search with startAt/maxResults/total offset paging; pages counted in a
`finally`, issues ordered by priority then key."""
# ruff: noqa: F821  (`http` and `log` are provided by the sandbox)

import base64

PRIORITY_ORDER = {"Highest": 0, "High": 1, "Medium": 2, "Low": 3, "Lowest": 4}


def search(base_url, auth, jql, page_size=3):
    start_at = 0
    while True:
        body = (
            http.get(
                base_url + "/rest/api/3/search",
                params={
                    "jql": jql,
                    "startAt": start_at,
                    "maxResults": page_size,
                    "fields": "summary,status,priority",
                },
                headers={"Authorization": auth},
            )
            .raise_for_status()
            .json()
        )
        yield body["issues"]
        start_at = body["startAt"] + len(body["issues"])
        if start_at >= body["total"]:
            return


def run(params, context):
    connection = context["connection"]
    creds = connection["credentials"]
    auth = (
        "Basic " + base64.b64encode((creds["email"] + ":" + creds["api_token"]).encode()).decode()
    )
    issues, pages = [], 0
    try:
        for page in search(connection["baseUrl"], auth, params["jql"]):
            pages = pages + 1
            issues.extend(page)
    except http.HTTPStatusError as exc:
        return {"error": exc.status_code}
    finally:
        log("read", pages, "pages")
    rows = [
        {
            "key": i["key"],
            "status": i["fields"]["status"]["name"],
            "priority": i["fields"]["priority"]["name"],
        }
        for i in issues
    ]
    rows.sort(key=lambda r: (PRIORITY_ORDER.get(r["priority"], 99), int(r["key"].split("-")[1])))
    return {
        "issues": rows,
        "pages": pages,
        "open": [r["key"] for r in rows if r["status"] != "Done"],
    }
